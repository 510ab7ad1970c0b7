"""500 idle keep-alive clients at the default connection cap, then one GET /healthz (loopback only).

    python3 bench/idle.py MODULE.py

Prints how many of the 500 were refused and what /healthz answered (bench/RESULTS.md).
"""
import socket, subprocess, sys, re, threading, time, tempfile, http.client
module = sys.argv[1]
d = tempfile.mkdtemp()
p = subprocess.Popen([sys.executable, module, "--data-dir", d, "serve", "--port", "0", "--rate-limit", "off", "--log-level", "warning", "--idle-timeout", "60", "--processes", "1"], stderr=subprocess.PIPE, text=True)
for line in p.stderr:
    m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
    if m: port = int(m.group(1)); break
threading.Thread(target=p.stderr.read, daemon=True).start()
held, refused = [], 0
for i in range(500):
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(f"127.0.0.{2 + i // 60}", 0))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    r = s.recv(4096)
    if r.startswith(b"HTTP/1.1 200"): held.append(s)
    else: refused += 1; s.close()
t = time.perf_counter()
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10); c.request("GET", "/healthz"); st = c.getresponse().status
print(f"{module}: 500 idle keep-alive clients: {refused} refused; then GET /healthz -> {st} in {(time.perf_counter()-t)*1000:.1f} ms")
p.terminate(); p.wait(10)
