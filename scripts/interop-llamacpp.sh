#!/usr/bin/env bash
# GGUF interoperability with llama.cpp, both ways, on stories260K (greedy, 64 tokens from BOS):
#   1. a GGUF written by `secureinfer convert` (f32 and q8_0) generates the same text in llama.cpp as in secureinfer;
#   2. a GGUF written by llama.cpp's own converter (llama-convert-llama2c-to-ggml) generates the same text in
#      secureinfer as in llama.cpp.
# Exits non-zero on the first mismatch. Builds llama.cpp with scripts/llamacpp.sh when needed.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SI_SHARED_DIR:-../shared}
n=${SI_INTEROP_TOKENS:-64}
[ -x build/secureinfer ] || { cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j"$(nproc)" --target secureinfer_cli; }
bin=$(scripts/llamacpp.sh build)
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
echo "interop: all identical"
