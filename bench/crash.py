"""Kill the gateway with SIGKILL while it works, again and again; count lost and repeated jobs.

    python3 bench/crash.py [KILLS] [JOBS] [SECONDS]   (default 20 kills, 200 jobs, agents of 0.3 s)

A command agent appends "<delivery id> <pid> start" and, SECONDS later, "... end" to a file.
Jobs are sent async (each 202 means committed); the gateway is killed with SIGKILL at a random
moment every 0.5-1.5 s and started again, KILLS times, then left to drain. Printed:
accepted jobs, jobs that never finished (lost), jobs whose agent started more than once
(at-least-once delivery: a job running when its gateway died runs again), jobs whose agent ran
to the end more than once (the duplicate side effects), and runs of one job that overlapped in
time (an orphan agent of a killed gateway still running while the job ran again).
"""

import json
import os
import random
import re
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.environ.get("MOXXY_MODULE") or os.path.join(HERE, "..", "moxxy_webhooks.py")
AGENT = ("import os, sys, time\n"
         "run = '%s %d' % (os.environ['MOXXY_DELIVERY_ID'], os.getpid())\n"
         "f = open(sys.argv[1], 'a'); f.write('%s start %f\\n' % (run, time.time())); f.flush()\n"
         "time.sleep(float(sys.argv[2]))\n"
         "f.write('%s end %f\\n' % (run, time.time())); f.flush(); print('ok')\n")


def main(kills: int = 20, jobs: int = 200, seconds: float = 0.3) -> None:
    tmp = tempfile.mkdtemp()
    data, runs = os.path.join(tmp, "data"), os.path.join(tmp, "runs")
    mw = [sys.executable, MODULE, "--data-dir", data]
    subprocess.run(mw + ["agent", "add", "slow", "--command", shlex.join([sys.executable, "-c", AGENT, runs, str(seconds)]),
                         "--generic"], check=True, capture_output=True)
    subprocess.run(mw + ["vault", "set", "webhook_secret", "crash-secret"], check=True, capture_output=True)
    accepted, lock = set(), threading.Lock()

    def serve() -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(mw + ["serve", "--port", "0", "--rate-limit", "off", "--log-level", "warning",
                                      "--retry-base", "0.2", "--processes", "1"], stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                threading.Thread(target=proc.stderr.read, daemon=True).start()
                return proc, m.group(1)
        raise SystemExit("the gateway did not start")

    def send(url: str, n: int) -> None:
        for _ in range(n):
            req = urllib.request.Request(url + "/api/webhooks/generic", method="POST",
                                         headers={"X-Webhook-Secret": "crash-secret"},
                                         data=json.dumps({"agent": "slow", "message": "m", "response_mode": "async"}).encode())
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 202:
                        with lock:
                            accepted.add(json.loads(resp.read())["delivery_id"])
            except OSError:
                return  # the gateway was killed under us: the next one takes the rest

    proc, url = serve()
    per_round = max(1, jobs // kills)
    for _ in range(kills):
        sender = threading.Thread(target=send, args=(url, per_round))
        sender.start()
        time.sleep(random.uniform(0.5, 1.5))
        proc.kill()
        proc.wait()
        sender.join()
        proc, url = serve()
    deadline = time.time() + 300
    while time.time() < deadline:  # drain: until the log holds no unfinished job
        db = sqlite3.connect(os.path.join(data, "deliveries.db"), timeout=30)
        unfinished = db.execute("SELECT count(*) FROM deliveries WHERE status IN ('queued', 'running')").fetchone()[0]
        db.close()
        if not unfinished:
            break
        time.sleep(0.5)
    proc.terminate()
    proc.wait()
    starts, ends = {}, {}  # delivery id -> {run (pid): time}
    for line in open(runs):
        did, pid, what, at = line.split()
        (starts if what == "start" else ends).setdefault(did, {})[pid] = float(at)
    lost = accepted - set(ends)
    repeated = {d for d in accepted if len(starts.get(d, {})) > 1}
    # a run that finished (it was not killed) while another run of the same job had started: two agents at once
    twice = {d for d in accepted if len(ends.get(d, {})) > 1}
    overlapping = {d for d in repeated for pid, end in ends.get(d, {}).items()
                   if any(starts[d][pid] < at < end for other, at in starts[d].items() if other != pid)}
    print(f"agents of {seconds:g} s  kills: {kills}  accepted: {len(accepted)}  lost: {len(lost)}  "
          f"repeated: {len(repeated)} ({100 * len(repeated) / max(1, len(accepted)):.1f} %)  "
          f"finished twice: {len(twice)}  overlapping runs: {len(overlapping)}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]), *map(float, sys.argv[3:4]))
