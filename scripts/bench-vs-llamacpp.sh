#!/usr/bin/env bash
# Speed of secureinfer's plaintext engine against llama.cpp's llama-bench on the same GGUF files: a random-weight
# model of a real shape (default stories110m), f32 and Q8_0, prefill (-p) and decode (-n), alternating the two
# engines within every repetition; prints one markdown table of medians and ratios.
#   scripts/bench-vs-llamacpp.sh [--shape stories110m] [--reps 5] [--threads 2] [-p 512] [-n 128] [--quants "Q4_0 Q4_K_M"]
# --quants: instead of f32 and q8_0, files written by llama-quantize from the f32 file in these presets, run by
# secureinfer's plaintext engine with --weights native (the blocks read as stored).
# Builds secureinfer (build/) and llama.cpp (scripts/llamacpp.sh) when needed.
set -euo pipefail
cd "$(dirname "$0")/.."
shape=stories110m reps=5 threads=$(nproc) pp=512 tg=128 quants=""
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) shape=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    -p) pp=$2; shift 2 ;;
    -n) tg=$2; shift 2 ;;
    --quants) quants=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "bench-vs-llamacpp: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
vocab=../shared/models/llama2_tokenizer.bin
[ -x build/secureinfer ] || { cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j"$(nproc)" --target secureinfer_cli; }
bin=${SI_LLAMACPP_BIN:-$(scripts/llamacpp.sh build)}  # SI_LLAMACPP_BIN: an existing llama.cpp bin directory
work=${SI_BENCH_DIR:-/tmp/secureinfer-bench}
mkdir -p "$work"
types="f32 q8_0"
[ -n "$quants" ] && types="$quants"
for t in f32 q8_0; do
  f="$work/$shape-$t.gguf"
  [ -f "$f" ] || build/secureinfer convert --random-shape "$shape" --tokenizer "$vocab" --outtype "$t" -o "$f"
done
for t in $quants; do
  f="$work/$shape-$t.gguf"
  [ -f "$f" ] || "$bin/llama-quantize" "$work/$shape-f32.gguf" "$f" "$t" >/dev/null 2>&1
done
# secureinfer's weight format for a file type
ours_of() { case "$1" in f32) echo f32 ;; q8_0) echo int8 ;; *) echo native ;; esac; }

results="$work/results.tsv"
: > "$results"
for r in $(seq 1 "$reps"); do
  for t in $types; do
    f="$work/$shape-$t.gguf"
    ours=$(ours_of "$t")
    "$bin/llama-bench" -m "$f" -p "$pp" -n "$tg" -t "$threads" -r 1 -o jsonl 2>/dev/null |
      sed -n 's/.*"n_prompt": \([0-9]*\), "n_gen": \([0-9]*\).*"avg_ts": \([0-9.e+]*\).*/\1 \2 \3/p' |
      while read -r np ng ts; do
        if [ "$np" -gt 0 ]; then echo -e "llama.cpp\t$t\tpp$pp\t$ts"; else echo -e "llama.cpp\t$t\ttg$tg\t$ts"; fi
      done >> "$results"
    build/secureinfer bench -m "$f" -p "$pp" -n "$tg" -r 1 -t "$threads" --weights "$ours" 2>/dev/null |
      awk -F'|' -v t="$t" 'NR>2 {gsub(/ /,"",$5); gsub(/ /,"",$6); print "secureinfer\t" t "\t" $5 "\t" $6}' >> "$results"
    echo "bench-vs-llamacpp: repetition $r/$reps, $t done" >&2
  done
done

echo "| shape | weights | test | llama.cpp t/s | secureinfer t/s | ratio |"
echo "|---|---|---|---|---|---|"
for t in $types; do
  for test in "pp$pp" "tg$tg"; do
    med() { awk -F'\t' -v e="$1" -v t="$t" -v x="$test" '$1==e && $2==t && $3==x {print $4}' "$results" | sort -g |
            awk '{a[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
    l=$(med llama.cpp) s=$(med secureinfer)
    case "$t" in f32) ours="f32" ;; q8_0) ours="q8_0 file, int8 engine" ;; *) ours="$t file, native engine" ;; esac
    awk -v sh="$shape" -v w="$ours" -v x="$test" -v l="$l" -v s="$s" 'BEGIN {printf "| %s | %s | %s | %.2f | %.2f | %.2f |\n", sh, w, x, l, s, s/l}'
  done
done
echo "($reps repetitions each, alternating, $threads threads, medians; raw: $results)"
