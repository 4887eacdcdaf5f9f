#!/usr/bin/env bash
# Builds secureinfer and runs the main job: generation with the bundled default model (stories260K).
# Extra arguments are passed to `secureinfer run`, e.g. scripts/run.sh -p "Once upon a time" --temp 0.
# The build's output goes to build/build.log (shown when the build fails); a terminal sees one progress line.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --build-only
mkdir -p build
log=build/build.log
tty=0
[ -t 2 ] && tty=1
start=$(date +%s)
# One line on stderr, redrawn in place on a terminal: the build's percentage and the step it is at.
show() {
  local line pct=""
  while IFS= read -r line; do
    printf '%s\n' "$line" >>"$log"
    if [[ "$line" =~ ^\[\ *([0-9]+)%\] ]]; then pct=${BASH_REMATCH[1]}; fi
    [ $tty -eq 1 ] && [ -n "$pct" ] && printf '\r\033[Kbuilding secureinfer: %3s%%' "$pct" >&2
  done
  return 0
}
: >"$log"
if ! { cmake -S . -B build -DCMAKE_BUILD_TYPE=Release &&
       cmake --build build -j"$(nproc)" --target secureinfer_cli; } 2>&1 | show; then  # (pipefail: cmake's status)
  [ $tty -eq 1 ] && printf '\r\033[K' >&2
  echo "building secureinfer failed; the build's output (build/build.log) ends:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
if [ $tty -eq 1 ]; then
  printf '\r\033[Kbuilt secureinfer in %ss (log: build/build.log)\n' "$(( $(date +%s) - start ))" >&2
fi
shared=${SI_SHARED_DIR:-../shared}
exec build/secureinfer run -m "$shared/models/stories260K.bin" --tokenizer "$shared/models/tok512.bin" "$@"
