#!/usr/bin/env bash
# Builds secureinfer and runs the main job: generation with the bundled default model (stories260K).
# Extra arguments are passed to `secureinfer run`, e.g. scripts/run.sh -p "Once upon a time" --temp 0.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target secureinfer_cli >/dev/null
shared=${SI_SHARED_DIR:-../shared}
exec build/secureinfer run -m "$shared/models/stories260K.bin" --tokenizer "$shared/models/tok512.bin" "$@"
