#!/usr/bin/env bash
# Regenerates tests/data/quants/*.qf, the dequantisation fixtures of tests/test_quants.cpp, with llama.cpp's own
# ggml: scripts/quant-fixtures/gen.cpp is compiled against the ggml headers and linked with libggml-base.a from the
# build scripts/llamacpp.sh makes (built on demand), so the reference values come from ggml's quantiser and its
# reference dequantisation, not from this project's code. The committed fixtures let the tests run without llama.cpp.
#   scripts/gen-quant-fixtures.sh [OUTPUT_DIR]   (default tests/data/quants)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-tests/data/quants}
scripts/llamacpp.sh build >/dev/null
src=$(scripts/llamacpp.sh srcdir)
lib="$(dirname "$(scripts/llamacpp.sh bindir)")/ggml/src"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
g++ -std=c++17 -O2 -I"$src/ggml/include" scripts/quant-fixtures/gen.cpp "$lib/libggml-base.a" -fopenmp -lpthread -lm \
  -o "$work/gen-quant-fixtures"
mkdir -p "$out"
"$work/gen-quant-fixtures" "$out"
