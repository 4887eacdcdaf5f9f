#!/usr/bin/env bash
# Regenerates the reference private adapter adapters/austen-r8.gguf (and its training curve adapters/austen-r8.tsv)
# from the public base model stories260K and the five Austen novels other than Persuasion, which stays held out.
# Deterministic: the same build gives a bit-identical adapter for any thread count. See docs/TRAINING.md.
#
# Usage: scripts/train-reference-adapter.sh [BUILD_DIR]   (default: build; run from the repository root)
set -euo pipefail

BUILD="${1:-build}"
SHARED="${SI_SHARED_DIR:-../shared}"
BIN="$BUILD/secureinfer"
[ -x "$BIN" ] || { echo "error: $BIN not found; build first: cmake -S . -B $BUILD && cmake --build $BUILD --target secureinfer_cli" >&2; exit 1; }

D="$SHARED/data"
exec "$BIN" finetune \
  -m "$SHARED/models/stories260K.bin" --tokenizer "$SHARED/models/tok512.bin" \
  --data "$D/austen_emma.txt" "$D/austen_mansfield_park.txt" "$D/austen_northanger_abbey.txt" \
         "$D/austen_pride_and_prejudice.txt" "$D/austen_sense_and_sensibility.txt" \
  --lora-rank 8 --lora-alpha 16 --lora-targets q,k,v,o,w1,w2,w3 \
  --steps 1000 --batch 8 --ctx 256 --lr 5e-3 --warmup 50 --min-lr-ratio 0.1 --grad-clip 1 --seed 1 \
  --eval-fraction 0.02 --eval-every 100 --eval-windows 0 \
  --name austen-r8 --log adapters/austen-r8.tsv -o adapters/austen-r8.gguf
