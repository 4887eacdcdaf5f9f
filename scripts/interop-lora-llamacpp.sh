#!/usr/bin/env bash
# LoRA adapter interoperability with llama.cpp: the reference adapter (adapters/austen-r8.gguf) loads in llama.cpp
# and its greedy continuations there match secureinfer's plaintext engine with --lora (the adapter merged into the
# f32 weights), at adapter scale 1 from BOS and at scale 0.5 after a prompt. llama.cpp counts -n differently after a
# prompt, so its text must be a prefix of ours. Exits non-zero on the first mismatch.
# Builds llama.cpp with scripts/llamacpp.sh when needed. Usage: scripts/interop-lora-llamacpp.sh [ADAPTER]
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SI_SHARED_DIR:-../shared}
adapter=${1:-adapters/austen-r8.gguf}
n=${SI_INTEROP_TOKENS:-64}
[ -x build/secureinfer ] || { cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j"$(nproc)" --target secureinfer_cli; }
bin=$(scripts/llamacpp.sh build)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
build/secureinfer convert -m "$shared/models/stories260K.bin" --tokenizer "$shared/models/tok512.bin" --outtype f32 \
  -o "$work/base.gguf" 2>/dev/null

trim() { tr -d '\r' | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//'; }
check() {  # name, prompt, scale
  local a b
  a=$("$bin/llama-completion" -m "$work/base.gguf" --lora-scaled "$adapter:$3" -p "$2" -n "$n" --temp 0 -s 1 -t 1 -no-cnv \
      --no-display-prompt --no-warmup --simple-io </dev/null 2>/dev/null | trim)
  b=$(build/secureinfer run -m "$work/base.gguf" --lora "$adapter" --lora-scale "$3" -p "$2" -n "$((n + 8))" --temp 0 -t 1 --mode plain | trim)
  case "$b" in
    "$a"*) [ -n "$a" ] && printf 'interop-lora: %-28s identical: %s...\n' "$1" "$(printf '%s' "$a" | tr '\n' ' ' | head -c 60)" && return ;;
  esac
  printf 'interop-lora: MISMATCH on %s\n  llama.cpp:   %s\n  secureinfer: %s\n' "$1" "$a" "$b" >&2
  exit 1
}
check "scale 1, from BOS" "" 1
check "scale 0.5, prompt" "Elizabeth" 0.5
echo "interop-lora: all identical"
