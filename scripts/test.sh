#!/usr/bin/env bash
# Builds and runs every test: the Release build, the same suite under AddressSanitizer + UndefinedBehaviorSanitizer,
# and a short libFuzzer run of the GGUF parser. Installs the Debian packages it needs first.
#   scripts/test.sh            everything
#   SI_FUZZ_SECONDS=0 scripts/test.sh   skip the fuzzing run
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs=$(nproc)
fuzz_seconds=${SI_FUZZ_SECONDS:-60}

bash scripts/install-deps.sh

step() { printf '\n== %s ==\n' "$*"; }

step "Release build"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DSI_TESTS=ON >/dev/null
cmake --build build -j"$jobs"
step "Release tests"
ctest --test-dir build --output-on-failure -j"$jobs"

step "ASan + UBSan build"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSI_SANITIZE=ON -DSI_TESTS=ON >/dev/null
cmake --build build-asan -j"$jobs"
step "ASan + UBSan tests"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j"$jobs"

if [ "$fuzz_seconds" -gt 0 ] && [ -f fuzz/CMakeLists.txt ]; then
  step "libFuzzer: GGUF parser, ${fuzz_seconds}s"
  CC=clang CXX=clang++ cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSI_FUZZ=ON -DSI_TESTS=OFF >/dev/null
  cmake --build build-fuzz -j"$jobs" --target fuzz_gguf
  mkdir -p build-fuzz/corpus
  build-fuzz/fuzz/fuzz_gguf -max_total_time="$fuzz_seconds" -max_len=65536 -rss_limit_mb=2048 \
    build-fuzz/corpus "$root/fuzz/corpus/gguf" 2>&1 | tail -n 3
fi
step "all tests passed"
