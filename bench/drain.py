"""How fast queued async jobs drain: python3 bench/drain.py [JOBS] [MODULE ...]

Starts each build (default: this one) on a fresh data directory; one keep-alive client sends JOBS
async jobs for the built-in echo agent while the workers run them. Printed: the accept rate, and
JOBS over the time from the first request to the last job's final status on disk. Builds run
alternately, three rounds, medians.
"""

import http.client
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def one(module: str, jobs: int) -> tuple[float, float]:
    data = tempfile.mkdtemp()
    mw = [sys.executable, module, "--data-dir", data]
    subprocess.run(mw + ["vault", "set", "webhook_secret", "s"], check=True, capture_output=True)
    proc = subprocess.Popen(mw + ["serve", "--port", "0", "--rate-limit", "off", "--log-level", "warning",
                                  "--queue-size", str(jobs + 10), "--processes", "1"], stderr=subprocess.PIPE, text=True)
    try:
        port = next(int(m.group(1)) for line in proc.stderr if (m := re.search(r"listening on http://[^:]+:(\d+)", line)))
        conn = http.client.HTTPConnection("127.0.0.1", port)
        body = json.dumps({"message": "m", "response_mode": "async"})
        started = time.monotonic()
        for _ in range(jobs):
            conn.request("POST", "/api/webhooks/generic", body, {"X-Webhook-Secret": "s"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 202, resp.status
        accepted = time.monotonic()
        db = sqlite3.connect(os.path.join(data, "deliveries.db"), timeout=30)
        while db.execute("SELECT count(*) FROM deliveries WHERE status = 'succeeded'").fetchone()[0] < jobs:
            time.sleep(0.01)
        finished = time.monotonic()
        return jobs / (accepted - started), jobs / (finished - started)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    modules = sys.argv[2:] or [os.path.join(HERE, "..", "moxxy_webhooks.py")]
    results = {m: [] for m in modules}
    for _ in range(3):
        for m in modules:
            results[m].append(one(m, jobs))
    for m, runs in results.items():
        print(f"{os.path.basename(m):24} accepted {statistics.median(r[0] for r in runs):7.0f}/s (one client)  "
              f"accepted and finished {statistics.median(r[1] for r in runs):7.0f}/s  ({jobs} jobs, medians of 3)")


if __name__ == "__main__":
    main()
