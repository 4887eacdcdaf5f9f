#!/usr/bin/env bash
# CUDA backend checks and timings, for a machine with an NVIDIA GPU and a CUDA build of secureinfer (CMake found
# nvcc: `cmake -S . -B build && cmake --build build -j`):
#
#   scripts/bench-cuda.sh [BUILD_DIR [OUT_DIR]]      (defaults: build, bench-cuda-out)
#
# 1. test_backend_ops: every op of the cuda backend bit-exact (f32: within its bound) against the reference;
# 2. stories260K greedy tokens with --backend cuda equal those with --backend cpu, in every preset;
# 3. bench_backend_ops on the cuda backend (model shapes, decode and prefill; bytes/s of weights streamed);
# 4. secureinfer bench on random-weight stories110M and TinyLlama-1.1B: every preset on cpu and cuda, JSON + SVG.
# The models come from $SI_SHARED_DIR (default ../shared). Without libseccomp the worker cannot start: the presets
# then run the trusted core in-process (reported as such).
set -uo pipefail
build=${1:-build}
out=${2:-bench-cuda-out}
shared=${SI_SHARED_DIR:-../shared}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
step() { echo; echo "== $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
nproc
host=worker
if ldd "$build/secureinfer-worker" 2>/dev/null | grep -q "not found"; then
    echo "worker cannot start here (missing libraries); the presets use --host inprocess"
    host=inprocess
fi

step "test_backend_ops"
"$build/tests/test_backend_ops" 2>&1 | tail -25 | tee "$out/test_backend_ops.txt" || status=1
grep -q "PASSED" "$out/test_backend_ops.txt" && ! grep -q "FAILED" "$out/test_backend_ops.txt" || status=1

step "same tokens on cpu and cuda"
model=(-m "$shared/models/stories260K.bin" --tokenizer "$shared/models/tok512.bin" -p "Once upon a time" -n 48 --temp 0)
for mode in secureinfer gpu-only enclave-only; do
    a=$("$build/secureinfer" run "${model[@]}" --mode "$mode" --host "$host" --backend cpu 2>/dev/null)
    b=$("$build/secureinfer" run "${model[@]}" --mode "$mode" --host "$host" --backend cuda 2>"$tmp/run-$mode.err")
    if [ -n "$a" ] && [ "$a" == "$b" ]; then echo "$mode: identical"; else echo "$mode: DIFFERENT"; echo "cpu:  $a"; echo "cuda: $b"; cat "$tmp/run-$mode.err"; status=1; fi
done

step "bench_backend_ops (cuda)"
"$build/bench/bench_backend_ops" --benchmark_filter='^cuda/.*threads:1/' --benchmark_min_time=0.1 \
    --benchmark_format=console 2>&1 | tee "$out/bench_backend_ops.txt" | grep -E "_T(1|64)/" | head -80

step "the enclave host's cost: stories110m decode through the worker process (pinned: the default with cuda; factors sealed instead of kept; not pinned; spinning, sealed units sent ahead) and in-process"
for h in "--host $host" "--host $host --precompute-inside 0" "--host $host --pin-cpu off" \
         "--host $host --pin-cpu off --spin-us 100 --precompute-inside 0" "--host inprocess"; do
    echo "$h"
    "$build/secureinfer" bench --shape stories110m -p 0 -n 64 -r 3 $h --modes gpu-only,secureinfer-offline \
        --backends cuda 2>&1 | grep tg64
done

step "secureinfer bench stories110m"
"$build/secureinfer" bench --shape stories110m -p 128 -n 64 -r 3 --host "$host" \
    --modes gpu-only,secureinfer,secureinfer-offline,enclave-only --backends cpu,cuda \
    --json "$out/bench-stories110m.json" --plot "$out/bench-stories110m.svg" 2>&1

step "secureinfer bench tinyllama"
"$build/secureinfer" bench --shape tinyllama -p 64 -n 32 -r 3 --host "$host" \
    --modes gpu-only,secureinfer,secureinfer-offline,enclave-only --backends cuda \
    --json "$out/bench-tinyllama.json" --plot "$out/bench-tinyllama.svg" 2>&1
exit $status
