"""Async intake and drain on one box (SQLite) and on PostgreSQL with one and two gateways.

    python3 bench/scale.py [JOBS] [CLIENTS]        (default 3000 jobs, 8 client threads)

Starts a private PostgreSQL (initdb into a temp directory; as user postgres when run as root, with
fsync on: the figures include real commits), then for each set-up starts the gateways, sends JOBS
async jobs for the built-in echo agent from CLIENTS keep-alive client threads spread over the
gateways, and prints the accept rate (every 202 is a durable commit) and JOBS over the time until
the last final status is stored. Three rounds, alternating the set-ups; medians.
"""

import http.client
import json
import os
import pwd
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MODULE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "moxxy_webhooks.py")
sys.path.insert(0, os.path.dirname(MODULE))
import moxxy_webhooks as mw  # noqa: E402


def pg_binary(name: str) -> str:
    import glob
    return shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1]


class Postgres:
    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="moxxy-bench-pg-")
        self.run_as = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        data = os.path.join(self.root, "data")
        subprocess.run(self.run_as + [pg_binary("initdb"), "-D", data, "-A", "trust", "-U", "moxxy"], check=True,
                       capture_output=True)
        subprocess.run(self.run_as + [pg_binary("pg_ctl"), "-D", data, "-l", os.path.join(self.root, "log"), "-w", "-o",
                                      f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200",
                                      "start"], check=True, capture_output=True)
        self.data = data
        self.url = f"postgresql://moxxy@127.0.0.1:{self.port}/postgres"

    def database(self) -> str:
        name = "b_" + os.urandom(6).hex()
        with mw.psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        url = self.url.rsplit("/", 1)[0] + "/" + name
        mw.pg_migrate(url)
        return url

    def close(self) -> None:
        subprocess.run(self.run_as + [pg_binary("pg_ctl"), "-D", self.data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def serve(args: list) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, MODULE] + args + ["serve", "--port", "0", "--rate-limit", "off",
                                                               "--log-level", "warning", "--queue-size", "1000000", "--processes", "1"],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        m = re.search(r"listening on http://[^:]+:(\d+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(m.group(1))
    raise SystemExit("a gateway did not start")


def run(setup: str, jobs: int, clients: int, pg: Postgres) -> tuple[float, float]:
    tmp = tempfile.mkdtemp()
    if setup == "sqlite":
        base = ["--data-dir", os.path.join(tmp, "data")]
        subprocess.run([sys.executable, MODULE] + base + ["vault", "set", "webhook_secret", "s"], check=True)
        boxes = [base]
        done = lambda: sqlite3.connect(os.path.join(tmp, "data", "deliveries.db"), timeout=30).execute(
            "SELECT count(*) FROM deliveries WHERE status = 'succeeded'").fetchone()[0]
    else:
        url = pg.database()
        mw.open_backend(mw.Paths(tmp), url).vault.set("webhook_secret", "s")
        boxes = [["--data-dir", os.path.join(tmp, f"box{i}"), "--database-url", url]
                 for i in range(1 if setup == "postgres x1" else 2)]

        def done():
            with mw.psycopg.connect(url) as conn:
                return conn.execute("SELECT count(*) FROM moxxy_deliveries WHERE status = 'succeeded'").fetchone()[0]
    procs = [serve(b) for b in boxes]
    try:
        body = json.dumps({"message": "m", "response_mode": "async"})

        def client(i: int, n: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", procs[i % len(procs)][1])
            for _ in range(n):
                conn.request("POST", "/api/webhooks/generic", body, {"X-Webhook-Secret": "s"})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 202, resp.status

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i, jobs // clients)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        accepted = time.monotonic()
        total = clients * (jobs // clients)
        while done() < total:
            time.sleep(0.02)
        return total / (accepted - started), total / (time.monotonic() - started)
    finally:
        for p, _ in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    pg = Postgres()
    try:
        setups = ["sqlite", "postgres x1", "postgres x2"]
        results = {s: [] for s in setups}
        for _ in range(3):
            for s in setups:
                results[s].append(run(s, jobs, clients, pg))
        print(f"{jobs} async echo jobs from {clients} keep-alive clients; {os.cpu_count()} cores; medians of 3")
        for s, rs in results.items():
            print(f"  {s:12}  accepted {statistics.median(r[0] for r in rs):6.0f}/s   "
                  f"accepted and finished {statistics.median(r[1] for r in rs):6.0f}/s")
    finally:
        pg.close()


if __name__ == "__main__":
    main()
