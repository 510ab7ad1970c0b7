#!/usr/bin/env bash
# Benchmarks of SPEC section 14, on loopback, with wrk (apt-get install wrk webhook).
# Usage: bench/run.sh [DURATION]   (default 10s per run). Prints the figures kept in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-10s}
PY=${PYTHON:-python3}
tmp=$(mktemp -d); pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$tmp"' EXIT
mw() { $PY moxxy_webhooks.py --data-dir "$tmp/data" "$@"; }
for port in 18901 18902 18903; do
  if (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null; then echo "port $port is already in use"; exit 1; fi
done
wait_port() { for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "port $1 not up"; exit 1; }
run_wrk() { # name url threads connections [extra env]
  echo "== $1 (-t$3 -c$4, $D)"
  wrk -t"$3" -c"$4" -d"$D" --latency -s bench/post.lua "$2" | grep -E "Requests/sec|50%|99%|Non-2xx|Socket errors" | sed 's/^/   /'
}

mw vault set webhook_secret bench-secret >/dev/null
mw vault set admin_token bench-admin >/dev/null
mw agent add echo-cmd --command '/bin/echo {message}' --generic >/dev/null
$PY moxxy_webhooks.py --data-dir "$tmp/data" serve --port 18901 --rate-limit off --log-level warning \
  --queue-size 100000 --workers 4 2>"$tmp/serve.log" & pids+=($!)
$PY bench/baseline_server.py 18902 bench-secret 2>/dev/null & pids+=($!)
printf '[{"id": "echo", "execute-command": "/bin/echo", "include-command-output-in-response": true,\n  "pass-arguments-to-command": [{"source": "payload", "name": "message"}]}]\n' > "$tmp/hooks.json"
webhook -hooks "$tmp/hooks.json" -ip 127.0.0.1 -port 18903 >/dev/null 2>&1 & pids+=($!)
wait_port 18901; wait_port 18902; wait_port 18903

export HEADERS="X-Webhook-Secret: bench-secret|Content-Type: application/json"
echo "# generic sync webhook, echo agent, vs a bare ThreadingHTTPServer doing the same work"
run_wrk "baseline c1" http://127.0.0.1:18902/api/webhooks/generic 1 1
run_wrk "gateway  c1" http://127.0.0.1:18901/api/webhooks/generic 1 1
run_wrk "baseline c16" http://127.0.0.1:18902/api/webhooks/generic 2 16
run_wrk "gateway  c16" http://127.0.0.1:18901/api/webhooks/generic 2 16

echo "# command agent (/bin/echo MESSAGE, output in the response) vs adnanh/webhook"
BODY='{"agent": "echo-cmd", "message": "Hello"}' run_wrk "adnanh/webhook c8" http://127.0.0.1:18903/hooks/echo 2 8
BODY='{"agent": "echo-cmd", "message": "Hello"}' run_wrk "gateway        c8" http://127.0.0.1:18901/api/webhooks/generic 2 8

echo "# async accept, durably committed (SQLite WAL, synchronous=FULL, group commit)"
BODY='{"agent": "default", "message": "Hello", "response_mode": "async"}' run_wrk "gateway async c16" http://127.0.0.1:18901/api/webhooks/generic 2 16
