#!/usr/bin/env bash
# Regenerates tests/data/quants/*.qf, the dequantisation fixtures of tests/test_quants.cpp, with llama.cpp's own
# ggml: scripts/quant-fixtures/gen.cpp is compiled against the ggml headers and linked with libggml-base.a from the
# build scripts/llamacpp.sh makes (built on demand), so the reference values come from ggml's quantiser and its
# reference dequantisation, not from this project's code. The committed fixtures let the tests run without llama.cpp.
#   scripts/gen-quant-fixtures.sh [OUTPUT_DIR]   (default tests/data/quants)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-tests/data/quants}
# SI_LLAMACPP_BIN: the bin directory of an existing llama.cpp build (its source tree must be scripts/llamacpp.sh srcdir)
bin=${SI_LLAMACPP_BIN:-$(scripts/llamacpp.sh build)}
src=$(scripts/llamacpp.sh srcdir)
lib="$(dirname "$bin")/ggml/src"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
g++ -std=c++17 -O2 -I"$src/ggml/include" scripts/quant-fixtures/gen.cpp "$lib/libggml-base.a" -fopenmp -lpthread -lm \
  -o "$work/gen-quant-fixtures"
mkdir -p "$out"
"$work/gen-quant-fixtures" "$out"

# A model file written by llama-quantize itself: stories260K with its feed-forward width padded from 172 to 256
# (convert --pad-hidden; the same function), so that ffn_down is stored in k-quants (Q4_K, Q6_K) while the
# 64-wide matrices fall back to Q5_0 / Q8_0 as llama-quantize does. Beside it, llama.cpp's greedy continuation
# of BOS (32 tokens) on that file, which tests/test_quants.cpp expects every preset to reproduce.
shared=${SI_SHARED_DIR:-../shared}
[ -x build/secureinfer ] || { cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j"$(nproc)" --target secureinfer_cli; }
build/secureinfer convert -m "$shared/models/stories260K.bin" --tokenizer "$shared/models/tok512.bin" --pad-hidden 256 \
  --name stories260K-h256 -o "$work/pad.gguf" 2>/dev/null
model="$out/stories260K-h256-Q4_K_M.gguf"
"$bin/llama-quantize" "$work/pad.gguf" "$model" Q4_K_M 1 >/dev/null 2>&1
"$bin/llama-completion" -m "$model" -p "" -n 32 --temp 0 -s 1 -t 1 -no-cnv --no-display-prompt --no-warmup \
  --simple-io </dev/null 2>/dev/null | tr -d '\r' | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' > "${model%.gguf}.llamacpp.txt"
echo "$model"
