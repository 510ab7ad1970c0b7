"""Resident memory (VmRSS) of one gateway: idle, then holding 500 keep-alive connections (loopback only).

    python3 bench/memory.py [MODULE.py] [--connections 500]

Starts `serve` on a fresh data directory; after one request, reads /proc/PID/status; then opens the
connections (from several loopback addresses, so that the per-client cap does not refuse them),
each sends one request and stays open, and reads it again (bench/RESULTS.md).
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("module", nargs="?", default=os.path.join(os.path.dirname(HERE), "moxxy_webhooks.py"))
    parser.add_argument("--connections", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen([sys.executable, args.module, "--data-dir", data, "serve", "--port", "0",
                                 "--rate-limit", "off", "--log-level", "warning", "--idle-timeout", "60",
                                 "--max-connections", str(args.connections + 16), "--processes", "1"], stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        held = []
        try:
            for i in range(args.connections + 1):
                s = socket.create_connection(("127.0.0.1", port), timeout=10,
                                             source_address=(f"127.0.0.{2 + i // 60}", 0))
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                if not s.recv(4096).startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"connection {i} was refused")
                if i == 0:
                    idle = rss_mb(proc.pid)
                    s.close()
                else:
                    held.append(s)
            busy = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(20)
    print(f"RSS idle {idle:.1f} MB; with {args.connections} open keep-alive connections {busy:.1f} MB")


if __name__ == "__main__":
    main()
