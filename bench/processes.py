"""serve --processes 1, 2, ... N alternately under wrk: throughput from one process to N (loopback only).

    python3 bench/processes.py [--counts 1,2] [--database] [--seconds 5] [--rounds 2] [--async]

On a fresh data directory by default; --database runs on a private PostgreSQL instead (initdb from
Debian's postgresql, through the test module's PgServer). The load is the generic sync echo at c16
(--async: durable async accepts at c16). Needs wrk. Figures in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join(ROOT, "moxxy_webhooks.py")


def serve(data: str, url: str | None, n: int) -> tuple[subprocess.Popen, int]:
    database = ["--database-url", url] if url else []
    proc = subprocess.Popen([sys.executable, MODULE, "--data-dir", data, *database, "serve", "--port", "0",
                             "--rate-limit", "off", "--log-level", "warning", "--queue-size", "1000000",
                             "--processes", str(n)], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            time.sleep(1.0)  # every worker up
            return proc, int(m.group(1))
    raise SystemExit("the gateway did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default=f"1,{os.cpu_count() or 1}")
    parser.add_argument("--database", action="store_true")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--async", dest="asynchronous", action="store_true")
    args = parser.parse_args()
    pg, url = None, None
    if args.database:
        sys.path.insert(0, ROOT)
        import test_moxxy_webhooks as t
        t.mw.load_psycopg()
        pg = t.PgServer()
        url = t.new_database(pg.url)
        subprocess.run([sys.executable, MODULE, "--database-url", url, "migrate"], check=True, capture_output=True)
    body = '{"message": "Hello", "response_mode": "async"}' if args.asynchronous else '{"message": "Hello"}'
    env = dict(os.environ, HEADERS="X-Webhook-Secret: bench-secret|Content-Type: application/json", BODY=body)
    counts = [int(n) for n in args.counts.split(",")]
    results: dict = {n: [] for n in counts}
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {'PostgreSQL' if url else 'a data directory'}; "
          f"wrk -c16 {args.seconds}s, generic {'async' if args.asynchronous else 'sync'} echo")
    try:
        for r in range(args.rounds):
            for n in counts:
                with tempfile.TemporaryDirectory() as data:
                    database = ["--database-url", url] if url else []
                    subprocess.run([sys.executable, MODULE, "--data-dir", data, *database, "vault", "set",
                                    "webhook_secret", "bench-secret"], check=True, capture_output=True)
                    proc, port = serve(data, url, n)
                    try:
                        out = subprocess.run(["wrk", "-t2", "-c16", f"-d{args.seconds}s", "-s",
                                              os.path.join(ROOT, "bench", "post.lua"),
                                              f"http://127.0.0.1:{port}/api/webhooks/generic"],
                                             capture_output=True, text=True, env=env).stdout
                    finally:
                        proc.terminate()
                        proc.wait(30)
                rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
                results[n].append(rps)
                print(f"round {r + 1}, {n} process(es): {rps:8.0f} req/s{'  (errors!)' if 'Non-2xx' in out else ''}",
                      flush=True)
    finally:
        if pg:
            pg.close()
    for n in counts:
        print(f"{n} process(es): median {sorted(results[n])[len(results[n]) // 2]:.0f} req/s")


if __name__ == "__main__":
    main()
