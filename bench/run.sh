#!/usr/bin/env bash
# The benchmarks of issue 12 and SPEC section 14, in one run, on loopback with wrk.
# Usage: bench/run.sh [DURATION] [ROUNDS]   (default 5s, 3 rounds). Each comparison runs its two
# sides alternately, ROUNDS times each, and prints the medians: on a small shared box one run of
# either can be off by 20%. It installs what it lacks (wrk and adnanh/webhook with apt-get, uvicorn[standard]
# and starlette with pip) and uses the project's virtual environment (.venv) when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-5s}; ROUNDS=${2:-3}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; elif [ -n "${VIRTUAL_ENV:-}" ]; then PYTHON=$VIRTUAL_ENV/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
SUDO=$( [ "$(id -u)" = 0 ] && echo "" || echo sudo )
for tool in wrk webhook; do
  command -v "$tool" >/dev/null || { echo "installing $tool (apt-get)"; $SUDO apt-get install -y -q "$tool" >/dev/null; }
done
$PY -c 'import click, jsonpath_ng' 2>/dev/null || $PY -m pip install -q click jsonpath-ng
$PY -c 'import uvicorn, starlette, uvloop, httptools' 2>/dev/null || { echo "installing uvicorn[standard] (uvloop, httptools) and starlette (pip)"; $PY -m pip install -q 'uvicorn[standard]' starlette; }
N=$(nproc)
tmp=$(mktemp -d); pids=()
trap '[ ${#pids[@]} = 0 ] || kill "${pids[@]}" 2>/dev/null; rm -rf "$tmp"' EXIT
for port in 18901 18902 18903 18904 18905 18906 18907; do
  if (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null; then echo "port $port is already in use"; exit 1; fi
done
wait_port() { for _ in $(seq 300); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return; sleep 0.05; done; echo "port $1 not up:"; cat "$tmp/serve.log"; exit 1; }
mw() { $PY moxxy_webhooks.py --data-dir "$tmp/data" "$@" >/dev/null; }

printf '#!/bin/sh\nsleep 0.03\necho "$1"\n' > "$tmp/slow.sh"; chmod +x "$tmp/slow.sh"  # a 30 ms command
mw vault set webhook_secret bench-secret
mw vault set admin_token bench-admin
mw agent add echo-cmd --command '/bin/echo {message}' --generic
mw agent add slow-cmd --command "$tmp/slow.sh {message}" --generic
cp -r "$tmp/data" "$tmp/data-n"; cp -r "$tmp/data" "$tmp/data-log"  # one server per data directory
$PY moxxy_webhooks.py --data-dir "$tmp/data" serve --port 18901 --rate-limit off --log-level warning \
  --queue-size 100000 --workers 4 --processes 1 2>"$tmp/serve.log" & pids+=($!)
$PY moxxy_webhooks.py --data-dir "$tmp/data-log" serve --port 18904 --rate-limit off --log-file "$tmp/access.log" \
  --queue-size 100000 --workers 4 --processes 1 2>>"$tmp/serve.log" & pids+=($!)
$PY moxxy_webhooks.py --data-dir "$tmp/data-n" serve --port 18906 --rate-limit off --log-level warning \
  --queue-size 100000 --workers 4 --processes "$N" 2>>"$tmp/serve.log" & pids+=($!)
$PY bench/baseline_server.py 18902 bench-secret 2>/dev/null & pids+=($!)
BENCH_SECRET=bench-secret $PY -m uvicorn --app-dir bench starlette_app:app --host 127.0.0.1 --port 18905 \
  --workers "$N" --no-access-log --log-level warning 2>/dev/null & pids+=($!)
hook() { printf '{"id": "%s", "execute-command": "%s", "include-command-output-in-response": true, "pass-arguments-to-command": [{"source": "payload", "name": "message"}]}' "$1" "$2"; }
echo "[$(hook echo /bin/echo), $(hook slow "$tmp/slow.sh")]" > "$tmp/hooks.json"
webhook -hooks "$tmp/hooks.json" -ip 127.0.0.1 -port 18903 >/dev/null 2>&1 & pids+=($!)
for port in 18901 18902 18903 18904 18905 18906; do wait_port $port; done
sleep 1  # every worker process up

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

echo "$(date -u +%F), $(uname -sr), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "python: $($PY --version 2>&1); wrk $D x $ROUNDS rounds, medians; N = $N processes"
echo
export HEADERS="X-Webhook-Secret: bench-secret|Content-Type: application/json"
G=http://127.0.0.1:18901/api/webhooks/generic
GN=http://127.0.0.1:18906/api/webhooks/generic
compare "generic sync, echo, c1" http://127.0.0.1:18902/ baseline $G gateway 1 1
compare "generic sync, echo, c16" http://127.0.0.1:18902/ baseline $G gateway 2 16
compare "same, access log on (a file)" http://127.0.0.1:18902/ baseline http://127.0.0.1:18904/api/webhooks/generic gateway+log 2 16
compare "generic sync, echo, c16, N procs" http://127.0.0.1:18905/api/webhooks/generic uvicorn-N $GN gateway-N 2 16
BODY='{"agent": "echo-cmd", "message": "Hello"}' compare "command agent /bin/echo, c8" \
  http://127.0.0.1:18903/hooks/echo adnanh/webhook $G gateway 2 8
BODY='{"agent": "echo-cmd", "message": "Hello"}' compare "same, N processes" \
  http://127.0.0.1:18903/hooks/echo adnanh/webhook $GN gateway-N 2 8
BODY='{"agent": "slow-cmd", "message": "Hello"}' compare "command agent 30 ms, c8" \
  http://127.0.0.1:18903/hooks/slow adnanh/webhook $G gateway 2 8
export BODY='{"agent": "default", "message": "Hello", "response_mode": "async"}'
rs=(); for _ in $(seq "$ROUNDS"); do read -r r p bad < <(one $G 2 16); rs+=("$r"); [ "$bad" = 0 ] || echo "  $bad non-2xx answers!"; done
printf '%-32s %-16s %10s req/s   (runs: %s)\n' "async accept (durable), c16" gateway "$(printf '%s\n' "${rs[@]}" | median)" "${rs[*]}"

echo
kill "${pids[@]}" 2>/dev/null; pids=()  # the rest start their own gateways
echo "async drain (bench/drain.py 3000):"; $PY bench/drain.py 3000 | tail -n 2
echo "GET /healthz under 500 busy clients (bench/health.py):"
$PY bench/health.py --processes "1,$N" --seconds 8 --rounds 1 | tail -n +2
echo "memory (bench/memory.py): $($PY bench/memory.py)"
echo "throughput from 1 to $N processes (bench/processes.py):"
$PY bench/processes.py --counts "$(seq -s, 1 "$N")" --seconds "${D%s}" --rounds 2 | tail -n "$N"
