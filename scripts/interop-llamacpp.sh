#!/usr/bin/env bash
# GGUF interoperability with llama.cpp, both ways, on stories260K (greedy, 64 tokens from BOS):
#   1. a GGUF written by `secureinfer convert` (f32 and q8_0) generates the same text in llama.cpp as in secureinfer;
#   2. a GGUF written by llama.cpp's own converter (llama-convert-llama2c-to-ggml) generates the same text in
#      secureinfer as in llama.cpp;
#   3. files written by llama-quantize in the presets users download (Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0) run in
#      every partition preset; the text of each is compared with llama.cpp's on the same file. stories260K's
#      feed-forward width (172) is padded to 256 first (convert --pad-hidden, the same function) so that ffn_down
#      is stored in k-quants. A difference here is reported, not fatal: llama.cpp multiplies by 8-bit quantised
#      activations, secureinfer's presets by the dequantised weights in their own arithmetic, and a near tie in
#      the greedy choice can go either way (SI_INTEROP_STRICT=1 makes it fatal).
# Exits non-zero on the first mismatch. Builds llama.cpp with scripts/llamacpp.sh when needed.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SI_SHARED_DIR:-../shared}
n=${SI_INTEROP_TOKENS:-64}
[ -x build/secureinfer ] || { cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j"$(nproc)" --target secureinfer_cli; }
bin=${SI_LLAMACPP_BIN:-$(scripts/llamacpp.sh build)}  # SI_LLAMACPP_BIN: an existing llama.cpp bin directory
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

llama_text() {  # greedy continuation of BOS by llama.cpp
  "$bin/llama-completion" -m "$1" -p "" -n "$n" --temp 0 -s 1 -t 1 -no-cnv --no-display-prompt --no-warmup \
    --simple-io </dev/null 2>/dev/null | tr -d '\r' | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//'
}
ours_text() {
  build/secureinfer run -m "$1" -n "$n" --temp 0 -t 1 | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//'
}
compare() {  # name, file
  local a b
  a=$(llama_text "$2")
  b=$(ours_text "$2")
  if [ "$a" != "$b" ]; then
    printf 'interop: MISMATCH on %s\n  llama.cpp:   %s\n  secureinfer: %s\n' "$1" "$a" "$b" >&2
    exit 1
  fi
  printf 'interop: %-44s identical: %s\n' "$1" "$(printf '%s' "$a" | head -c 70)..."
}

for t in f32 q8_0; do
  build/secureinfer convert -m "$shared/models/stories260K.bin" --tokenizer "$shared/models/tok512.bin" \
    --outtype "$t" -o "$work/ours-$t.gguf" 2>/dev/null
  compare "secureinfer convert --outtype $t" "$work/ours-$t.gguf"
done
"$bin/llama-convert-llama2c-to-ggml" --copy-vocab-from-model "$shared/models/tok512.bin" \
  --llama2c-model "$shared/models/stories260K.bin" --llama2c-output-model "$work/llamacpp.gguf" >/dev/null 2>&1
compare "llama-convert-llama2c-to-ggml" "$work/llamacpp.gguf"
"$bin/llama-quantize" "$work/llamacpp.gguf" "$work/llamacpp-q8_0.gguf" Q8_0 1 >/dev/null 2>&1
compare "llama-convert-llama2c-to-ggml + llama-quantize Q8_0" "$work/llamacpp-q8_0.gguf"
build/secureinfer convert -m "$shared/models/stories260K.bin" --tokenizer "$shared/models/tok512.bin" --pad-hidden 256 \
  -o "$work/pad.gguf" 2>/dev/null
diffs=0
for q in Q4_K_M Q5_K_M Q6_K Q8_0 Q4_0; do
  "$bin/llama-quantize" "$work/pad.gguf" "$work/pad-$q.gguf" "$q" 1 >/dev/null 2>&1
  types=$(build/secureinfer info "$work/pad-$q.gguf" 2>/dev/null | awk 'NF == 6 && $2 ~ /^(Q|F|IQ|BF)/ {print $2}' | sort | uniq -c | tr -s ' ' | tr '\n' ',')
  a=$(llama_text "$work/pad-$q.gguf")
  for m in secureinfer gpu-only enclave-only plain; do
    b=$(build/secureinfer run -m "$work/pad-$q.gguf" -n "$n" --temp 0 -t 1 --mode "$m" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//')
    if [ "$a" = "$b" ]; then
      printf 'interop: llama-quantize %-7s --mode %-12s identical to llama.cpp (types:%s)\n' "$q" "$m" "$types"
    else
      diffs=$((diffs + 1))
      printf 'interop: llama-quantize %-7s --mode %-12s DIFFERS from llama.cpp after %s common characters\n' "$q" "$m" \
        "$(python3 -c 'import os,sys; a,b=sys.argv[1:]; print(len(os.path.commonprefix([a,b])))' "$a" "$b")"
    fi
  done
done
if [ "$diffs" -gt 0 ] && [ "${SI_INTEROP_STRICT:-0}" = 1 ]; then echo "interop: $diffs quantised runs differ" >&2; exit 1; fi
echo "interop: converted files identical; llama-quantize files: $diffs of 20 runs differ from llama.cpp's text"
