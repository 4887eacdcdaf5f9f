#!/usr/bin/env bash
# Scale-out on one machine (docs/DEPLOYMENT.md): one keyserver, three `secureinfer serve` instances of a protected
# package, each attesting to the keyserver on its own before it obtains the model key, and haproxy in front of
# them with /health checks. Runs the load test through haproxy, SIGKILLs one instance in the middle of it, and
# checks that no accepted request was lost except those running on the killed instance, and that those failed
# with a clear error. Exits 1 when the check fails.
#   scripts/scale-out.sh [--requests 600] [--clients 6] [--max-tokens 48]
# SI_BUILD_DIR (default build) holds secureinfer and si-load-test; they are built when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
requests=600 clients=6 max_tokens=48
while [ $# -gt 0 ]; do
  case "$1" in
    --requests) requests=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    *) echo "usage: scripts/scale-out.sh [--requests N] [--clients C] [--max-tokens T]" >&2; exit 2 ;;
  esac
done
build=${SI_BUILD_DIR:-build}
shared=${SI_SHARED_DIR:-../shared}
si="$root/$build/secureinfer"
if [ ! -x "$si" ] || [ ! -x "$root/$build/si-load-test" ]; then
  bash scripts/install-deps.sh
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" -j"$(nproc)" --target secureinfer_cli si-load-test >/dev/null
fi
command -v haproxy >/dev/null || { echo "scale-out: haproxy is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # LOG PATTERN PID: until the log has the pattern; fails when the process exits first
  for _ in $(seq 1200); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { echo "scale-out: a process failed to start:" >&2; cat "$1" >&2; exit 1; }
    sleep 0.05
  done
  echo "scale-out: timed out waiting for '$2' in $1" >&2
  exit 1
}
t0=$(date +%s.%N)

# The owner: a key and a package (stories260K with the Austen adapter as its secret), and the keyserver that
# releases the key only to this registered device running the measured worker.
"$si" keygen -o "$work/owner.key" 2>/dev/null
"$si" pack --base "$shared/models/stories260K.bin" --tokenizer "$shared/models/tok512.bin" \
  --lora adapters/austen-r8.gguf --key-file "$work/owner.key" -o "$work/austen.sipkg" --no-progress >/dev/null
ks_port=$(free_port)
"$si" keyserver --key-file "$work/owner.key" --allow "$("$si" measure 2>/dev/null)" --accept-software-tee \
  --device "$("$si" device-key)" --port "$ks_port" >"$work/keyserver.out" 2>"$work/keyserver.log" &
pids+=($!)
wait_for "$work/keyserver.log" "listening on" "$!"

# Three instances; each context attests and obtains the key itself (no sealed key is shared between them).
ports=()
serve_pids=()
for i in 1 2 3; do
  port=$(free_port)
  "$si" serve --package "$work/austen.sipkg" --keyserver "http://127.0.0.1:$ks_port" --port "$port" \
    --parallel 2 --max-queue 64 -t 1 --alias austen --no-progress 2>"$work/serve$i.log" &
  pid=$!
  pids+=($pid)
  serve_pids+=($pid)
  ports+=($port)
done
for i in 1 2 3; do wait_for "$work/serve$i.log" "listening on" "${serve_pids[$((i - 1))]}"; done
releases=$(grep -c "released model key" "$work/keyserver.log" || true)
echo "keyserver: $releases key releases after attestation (3 instances, one context of 2 sequence slots each)"

# haproxy: at most --parallel requests per instance (the rest wait in haproxy's queue and go to whichever instance
# is up), /health checked every 200 ms, connection failures retried elsewhere, and an OpenAI-shaped JSON error
# for the requests an instance dropped.
lb_port=$(free_port)
for code in 502 503 504; do
  case $code in
    502) reason="Bad Gateway"; msg="the secureinfer instance serving this request stopped before it answered; the request did not complete (it may be retried)" ;;
    503) reason="Service Unavailable"; msg="no secureinfer instance is available" ;;
    504) reason="Gateway Timeout"; msg="the secureinfer instance serving this request did not answer in time" ;;
  esac
  body="{\"error\":{\"message\":\"$msg\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_$code\"}}"
  printf 'HTTP/1.1 %s %s\r\nContent-Type: application/json\r\nCache-Control: no-cache\r\nConnection: close\r\nContent-Length: %s\r\n\r\n%s' \
    "$code" "$reason" "${#body}" "$body" >"$work/$code.http"
done
cat >"$work/haproxy.cfg" <<EOF
global
  maxconn 1024
  log stderr format short local0 info
defaults
  mode http
  log global
  option httplog
  option http-buffer-request
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout queue 30s
  option redispatch 1
  retries 3
  timeout check 3s
  retry-on conn-failure empty-response
  errorfile 502 $work/502.http
  errorfile 503 $work/503.http
  errorfile 504 $work/504.http
frontend api
  bind 127.0.0.1:$lb_port
  default_backend secureinfer
backend secureinfer
  balance roundrobin
  option httpchk GET /health
  http-check expect status 200
  default-server check inter 200ms fall 2 rise 2 maxconn 2 observe layer4 error-limit 1 on-error mark-down
  server s1 127.0.0.1:${ports[0]}
  server s2 127.0.0.1:${ports[1]}
  server s3 127.0.0.1:${ports[2]}
EOF
haproxy -f "$work/haproxy.cfg" -db 2>"$work/haproxy.log" &
pids+=($!)
for _ in $(seq 200); do curl -fsS "http://127.0.0.1:$lb_port/health" >/dev/null 2>&1 && break; sleep 0.05; done
echo "haproxy on 127.0.0.1:$lb_port in front of instances on ports ${ports[*]}"
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }
echo "setup took $(elapsed) s"

# The load test through haproxy; instance 2 is killed with SIGKILL once a third of the requests are done.
"$root/$build/si-load-test" --url "http://127.0.0.1:$lb_port" --clients "$clients" --requests "$requests" \
  --max-tokens "$max_tokens" --temperature 0.8 --stream mixed >"$work/load.out" 2>"$work/load.err" &
load=$!
victim=${serve_pids[1]}
served_before=0
for _ in $(seq 2000); do
  served_before=$(curl -fsS "http://127.0.0.1:${ports[1]}/metrics" 2>/dev/null |
    awk '/^secureinfer_requests_total/ {n += $2} END {print n + 0}')
  total=0
  for p in "${ports[@]}"; do
    n=$(curl -fsS "http://127.0.0.1:$p/metrics" 2>/dev/null | awk '/^secureinfer_requests_total/ {n += $2} END {print n + 0}')
    total=$((total + n))
  done
  [ "$total" -ge $((requests / 3)) ] && break
  kill -0 $load 2>/dev/null || break
  sleep 0.02
done
kill -KILL "$victim"
echo "SIGKILL instance 2 (pid $victim, port ${ports[1]}) after $total requests had been answered ($served_before by it)"
set +e
wait $load
load_rc=$?
set -e
cat "$work/load.out"

# The check: failures only from the killed instance (at most the 2 requests haproxy let it run at once), each
# with the balancer's JSON error (non-streamed) or a stream cut before its [DONE].
ok=$(sed -n 's/.* \([0-9]*\) ok, \([0-9]*\) failed.*/\1/p' "$work/load.out")
failed=$(sed -n 's/.* \([0-9]*\) ok, \([0-9]*\) failed.*/\2/p' "$work/load.out")
unclear=$(grep '^failed ' "$work/load.out" | grep -v -e 'stopped before it answered' \
  -e 'closed in the middle of the response' -e 'the event stream ended without a finish reason' || true)
# haproxy's log: requests that did not end normally (termination state other than ----), per server
abnormal() { grep -E "secureinfer/$1 " "$work/haproxy.log" | grep -vc ' ---- ' || true; }
on_s1=$(abnormal s1) on_s2=$(abnormal s2) on_s3=$(abnormal s3)
echo "requests that did not end normally, by instance (haproxy's log): s1 $on_s1, s2 $on_s2 (killed), s3 $on_s3"
after=$(for p in "${ports[0]}" "${ports[2]}"; do
  curl -fsS "http://127.0.0.1:$p/metrics" | awk '/^secureinfer_requests_total/ {n += $2} END {print n + 0}'
done | awk '{n += $1} END {print n}')
echo "after the kill: instances 1 and 3 answered $after requests in all; haproxy marked s2 down: $(grep -c '^\[WARNING\].*s2 is DOWN' "$work/haproxy.log" || true)"
if [ -z "$ok" ] || [ "$failed" -gt "$on_s2" ] || [ "$on_s1" -ne 0 ] || [ "$on_s3" -ne 0 ] || [ -n "$unclear" ] ||
   [ "$releases" -lt 3 ]; then
  echo "scale-out: FAILED: $ok ok, $failed failed (only those running on the killed instance may)" >&2
  [ -n "$unclear" ] && echo "scale-out: failures without a clear error: $unclear" >&2
  cat "$work/load.err" >&2
  grep -E 'is (DOWN|UP)' "$work/haproxy.log" >&2 || true
  grep -v ' 200 ' "$work/haproxy.log" | head -n 20 >&2 || true
  exit 1
fi
echo "scale-out: ok: $ok/$requests requests answered, $failed lost with the killed instance (clear errors), load test exit $load_rc"
echo "total $(elapsed) s"
