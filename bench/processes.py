"""Generic sync echo at c16 on a private PostgreSQL: serve --processes 1 against 2, alternating.

    python3 bench/processes.py

Needs initdb (apt-get install postgresql) and wrk; uses the test module's PgServer (bench/RESULTS.md).
"""
import os, sys, time, subprocess, tempfile, re, threading
sys.path.insert(0, "/work/main")
import test_moxxy_webhooks as t
mw = t.mw; mw.load_psycopg()
pg = t.PgServer()
def serve(url, n):
    d = tempfile.mkdtemp()
    p = subprocess.Popen([t.PY, t.MODULE, "--data-dir", d, "--database-url", url, "serve", "--port", "0", "--rate-limit", "off", "--log-level", "warning", "--processes", str(n)], stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m: break
    threading.Thread(target=p.stderr.read, daemon=True).start()
    time.sleep(1.0)
    return p, int(m.group(1))
try:
    with mw.psycopg.connect(pg.url, autocommit=True) as c: c.execute("CREATE DATABASE b")
    url = pg.url.rsplit("/", 1)[0] + "/b"
    subprocess.run([t.PY, t.MODULE, "--database-url", url, "migrate"], check=True, capture_output=True)
    subprocess.run([t.PY, t.MODULE, "--database-url", url, "vault", "set", "webhook_secret", "bench-secret"], check=True, capture_output=True)
    env = dict(os.environ, HEADERS="X-Webhook-Secret: bench-secret|Content-Type: application/json")
    res = {1: [], 2: []}
    for r in range(2):
        for n in (1, 2):
            p, port = serve(url, n)
            out = subprocess.run(["wrk", "-t2", "-c16", "-d5s", "-s", "/work/main/bench/post.lua", f"http://127.0.0.1:{port}/api/webhooks/generic"], capture_output=True, text=True, env=env).stdout
            rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)); bad = "Non-2xx" in out
            res[n].append(rps); print(f"round {r+1} processes {n}: {rps:.0f} req/s{' (errors!)' if bad else ''}", flush=True)
            p.terminate(); p.wait(20)
finally:
    pg.close()
