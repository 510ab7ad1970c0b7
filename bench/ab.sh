#!/usr/bin/env bash
# A/B two builds of the gateway on loopback with wrk: bench/ab.sh OLD_MODULE.py [DURATION] [ROUNDS]
# (default 5s, 5 rounds). Each comparison runs the old and the new build alternately, ROUNDS
# times, and prints medians and new/old: on a shared box one run can be off by 20%, so only a
# difference that holds in every round means something. Use it before and after a hot-path change.
# LOG_LEVEL=info turns the access log on (to a file), as a production gateway would run;
# OLD_LOG_LEVEL=warning LOG_LEVEL=info bench/ab.sh SAME.py prices the access log alone.
# One worker process each (PROCESSES=N for more; the old build must know --processes).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$1; D=${2:-5s}; ROUNDS=${3:-5}
PY=${PYTHON:-python3}
tmp=$(mktemp -d); pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$tmp"' EXIT
for port in 18911 18912; do
  if (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null; then echo "port $port is already in use"; exit 1; fi
done
wait_port() { for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "port $1 not up"; exit 1; }
start() { # module port log-level
  local data="$tmp/data-$2"
  $PY "$1" --data-dir "$data" vault set webhook_secret bench-secret >/dev/null
  $PY "$1" --data-dir "$data" agent add echo-cmd --command '/bin/echo {message}' --generic >/dev/null
  $PY "$1" --data-dir "$data" serve --port "$2" --rate-limit off --log-level "$3" \
    --log-file "$tmp/log-$2" --queue-size 100000 --workers 4 --processes "${PROCESSES:-1}" 2>>"$tmp/serve.log" & pids+=($!)
}
start "$OLD" 18911 "${OLD_LOG_LEVEL:-${LOG_LEVEL:-warning}}"; start moxxy_webhooks.py 18912 "${LOG_LEVEL:-warning}"
wait_port 18911; wait_port 18912
one() { # url threads connections -> rps
  wrk -t"$2" -c"$3" -d"$D" -s bench/post.lua "$1" | awk '/Requests\/sec/ {rps=$2} /Non-2xx/ {bad=$5} END {if (bad) print "ERR"; else print rps}'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
compare() { # label threads connections
  local ra=() rb=()
  for _ in $(seq "$ROUNDS"); do
    ra+=("$(one http://127.0.0.1:18911/api/webhooks/generic "$2" "$3")")
    rb+=("$(one http://127.0.0.1:18912/api/webhooks/generic "$2" "$3")")
  done
  local ma mb; ma=$(printf '%s\n' "${ra[@]}" | median); mb=$(printf '%s\n' "${rb[@]}" | median)
  printf '%-30s old %9s  new %9s req/s  new/old %.2f   (old: %s; new: %s)\n' "$1" "$ma" "$mb" \
    "$(awk -v a="$ma" -v b="$mb" 'BEGIN {print b/a}')" "${ra[*]}" "${rb[*]}"
}
echo "python: $($PY --version 2>&1); cores: $(nproc); wrk $D x $ROUNDS rounds, alternating, medians"
export HEADERS="X-Webhook-Secret: bench-secret|Content-Type: application/json"
compare "generic sync echo, c1" 1 1
compare "generic sync echo, c16" 2 16
BODY='{"agent": "echo-cmd", "message": "Hello"}' compare "command agent /bin/echo, c8" 2 8
BODY='{"agent": "default", "message": "Hello", "response_mode": "async"}' compare "async accept (durable), c16" 2 16
