#!/usr/bin/env bash
# Benchmarks of SPEC section 14 on loopback with wrk (apt-get install wrk webhook).
# Usage: bench/run.sh [DURATION] [ROUNDS]   (default 5s, 3 rounds). The gateway and its
# comparison run alternately, ROUNDS times each, and the median of each is printed:
# on a small shared box one run of either can be off by 20%.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-5s}; ROUNDS=${2:-3}
PY=${PYTHON:-python3}
tmp=$(mktemp -d); pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$tmp"' EXIT
for port in 18901 18902 18903 18904; do
  if (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null; then echo "port $port is already in use"; exit 1; fi
done
wait_port() { for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "port $1 not up"; exit 1; }
mw() { $PY moxxy_webhooks.py --data-dir "$tmp/data" "$@" >/dev/null; }

mw vault set webhook_secret bench-secret
mw vault set admin_token bench-admin
mw agent add echo-cmd --command '/bin/echo {message}' --generic
$PY moxxy_webhooks.py --data-dir "$tmp/data" serve --port 18901 --rate-limit off --log-level warning \
  --queue-size 100000 --workers 4 2>"$tmp/serve.log" & pids+=($!)
$PY moxxy_webhooks.py --data-dir "$tmp/data" serve --port 18904 --rate-limit off --log-file "$tmp/access.log" \
  --queue-size 100000 --workers 4 2>>"$tmp/serve.log" & pids+=($!)
$PY bench/baseline_server.py 18902 bench-secret 2>/dev/null & pids+=($!)
printf '[{"id": "echo", "execute-command": "/bin/echo", "include-command-output-in-response": true,\n  "pass-arguments-to-command": [{"source": "payload", "name": "message"}]}]\n' > "$tmp/hooks.json"
webhook -hooks "$tmp/hooks.json" -ip 127.0.0.1 -port 18903 >/dev/null 2>&1 & pids+=($!)
wait_port 18901; wait_port 18902; wait_port 18903; wait_port 18904

# one wrk run: prints "rps p50_us non2xx"
one() { # url threads connections
  wrk -t"$2" -c"$3" -d"$D" --latency -s bench/post.lua "$1" | awk '
    /Requests\/sec/ {rps=$2}
    /^ +50%/ {v=$2; if (v ~ /us$/) {sub(/us/,"",v)} else if (v ~ /ms$/) {sub(/ms/,"",v); v*=1000} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000000}; p50=v}
    /Non-2xx/ {bad=$5}
    END {printf "%s %s %s\n", rps, p50, bad+0}'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
compare() { # label url_a label_a url_b label_b threads connections
  local ra=() rb=() pa=() pb=()
  for _ in $(seq "$ROUNDS"); do
    read -r r p bad < <(one "$2" "$6" "$7"); ra+=("$r"); pa+=("$p"); [ "$bad" = 0 ] || echo "  $3: $bad non-2xx answers!"
    read -r r p bad < <(one "$4" "$6" "$7"); rb+=("$r"); pb+=("$p"); [ "$bad" = 0 ] || echo "  $5: $bad non-2xx answers!"
  done
  local ma mb; ma=$(printf '%s\n' "${ra[@]}" | median); mb=$(printf '%s\n' "${rb[@]}" | median)
  printf '%-32s %-16s %10s req/s  p50 %7s us   (runs: %s)\n' "$1" "$3" "$ma" "$(printf '%s\n' "${pa[@]}" | median)" "${ra[*]}"
  printf '%-32s %-16s %10s req/s  p50 %7s us   (runs: %s)\n' "" "$5" "$mb" "$(printf '%s\n' "${pb[@]}" | median)" "${rb[*]}"
  awk -v a="$ma" -v b="$mb" -v l="$5/$3" 'BEGIN {printf "%-32s %s = %.2f\n\n", "", l, b/a}'
}

echo "python: $($PY --version 2>&1); cores: $(nproc); wrk $D x $ROUNDS rounds, medians"
echo
export HEADERS="X-Webhook-Secret: bench-secret|Content-Type: application/json"
G=http://127.0.0.1:18901/api/webhooks/generic
compare "generic sync, echo, c1" http://127.0.0.1:18902/ baseline $G gateway 1 1
compare "generic sync, echo, c16" http://127.0.0.1:18902/ baseline $G gateway 2 16
compare "same, access log on (a file)" http://127.0.0.1:18902/ baseline http://127.0.0.1:18904/api/webhooks/generic gateway+log 2 16
BODY='{"agent": "echo-cmd", "message": "Hello"}' compare "command agent /bin/echo, c8" \
  http://127.0.0.1:18903/hooks/echo adnanh/webhook $G gateway 2 8
export BODY='{"agent": "default", "message": "Hello", "response_mode": "async"}'
rs=(); for _ in $(seq "$ROUNDS"); do read -r r p bad < <(one $G 2 16); rs+=("$r"); [ "$bad" = 0 ] || echo "  $bad non-2xx answers!"; done
printf '%-32s %-16s %10s req/s   (runs: %s)\n' "async accept (durable), c16" gateway "$(printf '%s\n' "${rs[@]}" | median)" "${rs[*]}"
