"""GET /healthz latency while 500 busy keep-alive clients load the gateway (loopback only).

    python3 bench/health.py [OLD_MODULE.py] [--connections 500] [--seconds 10] [--rounds 2] [--processes 1,2]

Starts the gateway (this checkout's module, and OLD_MODULE.py when given, alternately), loads it
with wrk (generic sync echo, keep-alive), and meanwhile opens a fresh connection every 20 ms for
one GET /healthz, as a load balancer does. Prints the load's requests/s and the probes' latency
(p50, p99, max) and failures. --max-connections is raised over the load so that no probe is refused
for want of a slot: what is measured is the wait behind busy threads (--default-cap keeps the caps,
which the load then overflows). --processes 1,2 runs this checkout with `serve --processes 1`, then
2, alternately (on its data directory).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CAP = ["--max-connections", "2000", "--max-connections-per-client", "2000"]


def start(module: str, data: str, processes: int = 1) -> tuple[subprocess.Popen, int]:
    subprocess.run([sys.executable, module, "--data-dir", data, "vault", "set", "webhook_secret", "bench-secret"],
                   check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, module, "--data-dir", data, "serve", "--port", "0", "--rate-limit", "off",
                             "--log-level", "warning", "--processes", str(processes), *CAP],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(m.group(1))
    raise SystemExit(f"{module} did not start")


def probe(port: int, stop: threading.Event, out: list, failures: list) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/healthz")
            status = conn.getresponse().status
            conn.close()
            (out if status == 200 else failures).append(time.perf_counter() - started)
        except OSError:
            failures.append(time.perf_counter() - started)
        stop.wait(0.02)


def one(module: str, connections: int, seconds: int, processes: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as data:
        proc, port = start(module, data, processes)
        try:
            env = dict(os.environ, HEADERS="X-Webhook-Secret: bench-secret|Content-Type: application/json")
            load = subprocess.Popen(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s",
                                     os.path.join(ROOT, "bench", "post.lua"),
                                     f"http://127.0.0.1:{port}/api/webhooks/generic"],
                                    stdout=subprocess.PIPE, text=True, env=env)
            time.sleep(1)  # let every load connection open before probing
            stop, lat, failed = threading.Event(), [], []
            prober = threading.Thread(target=probe, args=(port, stop, lat, failed))
            prober.start()
            out, _ = load.communicate()
            stop.set()
            prober.join()
        finally:
            proc.terminate()
            proc.wait(20)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return {"rps": rps, "p50": pick(0.5), "p99": pick(0.99), "max": lat[-1] * 1000 if lat else float("nan"),
            "probes": len(lat), "failed": len(failed)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old", nargs="?")
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--default-cap", action="store_true",
                        help="keep the default connection caps (256, 64 per client): the load overflows them")
    parser.add_argument("--processes", default="1", help="serve --processes values to alternate, e.g. 1,2")
    args = parser.parse_args()
    if args.default_cap:
        CAP.clear()
    here = os.path.join(ROOT, "moxxy_webhooks.py")
    counts = [int(n) for n in args.processes.split(",")]
    builds = [(f"new, {n} process(es)", here, n) for n in counts] + ([("old", args.old, 1)] if args.old else [])
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; wrk -c{args.connections} {args.seconds}s "
          f"generic sync echo; /healthz probed every 20 ms on a fresh connection")
    for r in range(args.rounds):
        for name, module, processes in builds:
            res = one(module, args.connections, args.seconds, processes)
            print(f"round {r + 1} {name}: load {res['rps']:8.0f} req/s   healthz p50 {res['p50']:7.1f} ms  "
                  f"p99 {res['p99']:7.1f} ms  max {res['max']:7.1f} ms  ({res['probes']} probes, {res['failed']} failed)",
                  flush=True)


if __name__ == "__main__":
    main()
