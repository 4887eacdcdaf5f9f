#!/usr/bin/env bash
# Perplexity cost of llama.cpp's quantisation presets, measured by llama.cpp and by secureinfer on the same files.
# The model is the real stories260K with its feed-forward width padded from 172 to 256 (convert --pad-hidden: the
# same function) so that llama-quantize stores ffn_down in k-quants; the files are written by llama-quantize. The
# two tools score differently (llama-perplexity scores the second half of each window, secureinfer every token
# after BOS), so each is compared with its own number on the f32 file: the table reports both perplexities and
# each one's change relative to f32.
#   scripts/ppl-vs-llamacpp.sh [--ctx 256] [--chunks 40] [--threads 2] [--quants "Q8_0 Q6_K Q5_K_M Q4_K_M Q4_0"]
#                              [--modes "secureinfer plain"]
# llama.cpp runs with --no-repack (the repacked AMX path crashes on CPUs with AMX; scoring is not timed).
# secureinfer modes: any preset (secureinfer, gpu-only, enclave-only: the enclave scores the windows) or plain
# (plaintext engine; quantised files run with --weights native, f32 with f32 weights).
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SI_SHARED_DIR:-../shared}
text=${SI_PPL_TEXT:-$shared/data/tinystories_val.txt}
ctx=256 chunks=40 threads=$(nproc) quants="Q8_0 Q6_K Q5_K_M Q4_K_M Q4_0" modes="secureinfer plain"
while [ $# -gt 0 ]; do
  case "$1" in
    --ctx) ctx=$2; shift 2 ;;
    --chunks) chunks=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --quants) quants=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "ppl-vs-llamacpp: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ -x build/secureinfer ] || { cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j"$(nproc)" --target secureinfer_cli; }
bin=${SI_LLAMACPP_BIN:-$(scripts/llamacpp.sh build)}  # SI_LLAMACPP_BIN: an existing llama.cpp bin directory
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

build/secureinfer convert -m "$shared/models/stories260K.bin" --tokenizer "$shared/models/tok512.bin" --pad-hidden 256 \
  -o "$work/F32.gguf" 2>/dev/null
for q in $quants; do "$bin/llama-quantize" "$work/F32.gguf" "$work/$q.gguf" "$q" 1 >/dev/null 2>&1; done

llama_ppl() {
  # llama-perplexity prints the running estimate after every chunk ("[N]x"); after chunk N it is the final PPL of
  # --chunks N. Its asynchronous log loses the last lines when the process exits first (exit status 0, common on a
  # loaded machine), so it runs one chunk more and reads the estimate after chunk N, which is printed while the
  # extra chunk computes.
  local out p="" try
  for try in 1 2 3; do
    out=$("$bin/llama-perplexity" -m "$1" -f "$text" -c "$ctx" -b "$ctx" --chunks "$((chunks + 1))" -t "$threads" \
          --no-repack </dev/null 2>&1) || true
    p=$(printf '%s\n' "$out" | grep -o "\[$chunks\][0-9.]*" | head -1 | sed 's/.*\]//')
    [ -n "$p" ] && break
    echo "ppl-vs-llamacpp: no result from llama-perplexity on $(basename "$1") (try $try)" >&2
  done
  echo "${p:-nan}"
}

ours_ppl() {  # file, mode
  local w=()
  [ "$2" = plain ] && { [ "$(basename "$1")" = F32.gguf ] && w=(--weights f32) || w=(--weights native); }
  build/secureinfer perplexity -m "$1" -f "$text" --ctx "$ctx" --chunks "$chunks" -t "$threads" --mode "$2" "${w[@]}" \
    2>/dev/null | sed -n 's/.*ppl=\([0-9.]*\).*/\1/p'
}

declare -A P
for f in F32 $quants; do
  P[llama,$f]=$(llama_ppl "$work/$f.gguf")
  for m in $modes; do P[$m,$f]=$(ours_ppl "$work/$f.gguf" "$m"); done
  echo "ppl-vs-llamacpp: $f done" >&2
done

head="| file | llama.cpp PPL | change |"
sep="|---|---|---|"
for m in $modes; do head="$head secureinfer $m PPL | change |"; sep="$sep---|---|"; done
echo "$head"
echo "$sep"
for f in F32 $quants; do
  row="| $f | ${P[llama,$f]} | $(awk -v a="${P[llama,$f]}" -v b="${P[llama,F32]}" 'BEGIN {printf "%+.2f%%", (a / b - 1) * 100}') |"
  for m in $modes; do
    row="$row ${P[$m,$f]} | $(awk -v a="${P[$m,$f]}" -v b="${P[$m,F32]}" 'BEGIN {printf "%+.2f%%", (a / b - 1) * 100}') |"
  done
  echo "$row"
done
echo "(stories260K padded to hidden 256, $(basename "$text"), windows of $ctx tokens, $chunks chunks, $threads threads)"
