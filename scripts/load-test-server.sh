#!/usr/bin/env bash
# Load test of `secureinfer serve`: builds, starts the server with stories260K on a free loopback port, runs
# si-load-test against it (default: 8 clients, 256 requests, max_tokens 8, half of them streamed), prints throughput
# and p50/p90/p99 latency, and stops the server with SIGTERM. Arguments go to si-load-test, e.g.
#   scripts/load-test-server.sh --clients 8 --requests 400 --max-tokens 16 --stream all
# SERVE_ARGS adds options to `secureinfer serve`, e.g. SERVE_ARGS="--parallel 2 --mode enclave-only".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
build=${SI_BUILD_DIR:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)" --target secureinfer_cli si-load-test >/dev/null
shared=${SI_SHARED_DIR:-../shared}
log=$(mktemp)
# shellcheck disable=SC2086
"$build/secureinfer" serve -m "$shared/models/stories260K.bin" --tokenizer "$shared/models/tok512.bin" --port 0 \
  ${SERVE_ARGS:-} 2>"$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 600); do
  grep -q "listening on" "$log" && break
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.05
done
url=$(grep -o 'http://[0-9.]*:[0-9]*' "$log" | head -n 1)
grep "listening on" "$log"
echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
"$build/si-load-test" --url "$url" "$@"
