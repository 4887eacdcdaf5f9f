#!/usr/bin/env bash
# Serving throughput of `secureinfer serve` (gpu-only and secureinfer presets, N sequence slots of one context)
# against llama.cpp's `llama-server --parallel N` on the same GGUF file, driven by the same load generator
# (si-load-test: C clients, /v1/completions, greedy, not streamed). The three servers alternate inside every
# repetition; prints one markdown table of medians and the ratios to llama-server.
#   scripts/bench-server-vs-llamacpp.sh [--shape stories110m] [--outtype q8_0] [--parallel 4] [--clients 4]
#                                       [--requests 48] [--max-tokens 32] [--reps 3] [--threads 2]
# The file is a random-weight model of the shape, written by `convert` as q8_0 (default) or f32: with q8_0 both
# engines read one byte per weight (secureinfer's presets turn the blocks into per-row int8 weights).
# Builds secureinfer (build/) and llama.cpp (scripts/llamacpp.sh, which builds llama-server) when needed;
# SI_LLAMACPP_BIN names an existing llama.cpp bin directory instead.
set -euo pipefail
cd "$(dirname "$0")/.."
shape=stories110m outtype=q8_0 parallel=4 clients=4 requests=48 max_tokens=32 reps=3 threads=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) shape=$2; shift 2 ;;
    --outtype) outtype=$2; shift 2 ;;
    --parallel) parallel=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "bench-server-vs-llamacpp: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
vocab=../shared/models/llama2_tokenizer.bin
[ -x build/secureinfer ] && [ -x build/si-load-test ] || {
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build -j"$(nproc)" --target secureinfer_cli si-load-test
}
bin=${SI_LLAMACPP_BIN:-$(scripts/llamacpp.sh build)}
[ -x "$bin/llama-server" ] || { echo "bench-server-vs-llamacpp: $bin/llama-server is missing" >&2; exit 1; }
work=${SI_BENCH_DIR:-/tmp/secureinfer-bench}
mkdir -p "$work"
model="$work/$shape-$outtype.gguf"
[ -f "$model" ] || build/secureinfer convert --random-shape "$shape" --tokenizer "$vocab" --outtype "$outtype" -o "$model"
ctx=256

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# run_one NAME: starts that server, waits for it, runs the load, prints "tokens/s requests/s p50 failed", stops it.
run_one() {
  local name=$1 port log pid
  port=$(free_port)
  log="$work/server-$name.log"
  case "$name" in
    llama-server)
      "$bin/llama-server" -m "$model" -t "$threads" --parallel "$parallel" -c $((ctx * parallel)) \
        --host 127.0.0.1 --port "$port" >"$log" 2>&1 & ;;
    gpu-only|secureinfer)
      build/secureinfer serve -m "$model" --mode "$name" -t "$threads" --parallel "$parallel" -c "$ctx" \
        --port "$port" --no-progress >"$log" 2>&1 & ;;
  esac
  pid=$!
  for _ in $(seq 1200); do
    curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { echo "bench-server-vs-llamacpp: $name did not start:" >&2; tail -5 "$log" >&2; exit 1; }
    sleep 0.1
  done
  local out
  out=$(build/si-load-test --url "http://127.0.0.1:$port" --clients "$clients" --requests "$requests" \
        --max-tokens "$max_tokens" --temperature 0 --stream none || true)
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local tps rps p50 failed
  tps=$(sed -n 's/^throughput [0-9.]* requests\/s, \([0-9.]*\) generated tokens\/s/\1/p' <<<"$out")
  rps=$(sed -n 's/^throughput \([0-9.]*\) requests\/s.*/\1/p' <<<"$out")
  p50=$(sed -n 's/^latency ms: p50 \([0-9.]*\),.*/\1/p' <<<"$out")
  failed=$(sed -n 's/.* \([0-9]*\) failed in .*/\1/p' <<<"$out")
  [ -n "$tps" ] || { echo "bench-server-vs-llamacpp: no result from $name:" >&2; echo "$out" >&2; exit 1; }
  echo "$tps $rps $p50 $failed"
}

names=(llama-server gpu-only secureinfer)
declare -A results
echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); model $model; parallel $parallel," \
     "clients $clients, requests $requests, max_tokens $max_tokens, threads $threads" >&2
for r in $(seq "$reps"); do
  for n in "${names[@]}"; do
    res=$(run_one "$n")
    echo "rep $r $n: $res (tokens/s requests/s p50-ms failed)" >&2
    results[$n]+="$res;"
  done
done

median() { tr ' ' '\n' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
col() { tr ';' '\n' | awk -v c="$1" 'NF {print $c}' | tr '\n' ' '; }
base=$(col 1 <<<"${results[llama-server]}" | median)
echo
echo "| server | generated tokens/s (median of $reps) | requests/s | p50 latency ms | failed (all reps) | tokens/s vs llama-server |"
echo "|---|---|---|---|---|---|"
for n in "${names[@]}"; do
  tps=$(col 1 <<<"${results[$n]}" | median)
  rps=$(col 2 <<<"${results[$n]}" | median)
  p50=$(col 3 <<<"${results[$n]}" | median)
  failed=$(col 4 <<<"${results[$n]}" | tr ' ' '\n' | awk '{s += $1} END {print s + 0}')
  echo "| $n | $tps | $rps | $p50 | $failed | $(awk -v a="$tps" -v b="$base" 'BEGIN {printf "%.2fx", a / b}') |"
done
