"""The bare baseline for bench/run.sh: a ThreadingHTTPServer handler doing the generic
webhook's work by hand (read the body, compare the secret in constant time, parse JSON,
reply JSON in one send), with HTTP/1.1 keep-alive and Nagle off, like the gateway."""

import hmac
import http.server
import json
import sys

SECRET = sys.argv[2].encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not hmac.compare_digest(self.headers.get("X-Webhook-Secret", "").encode(), SECRET):
            status, doc = 401, {"success": False, "error": "unauthorized", "code": "unauthorized"}
        else:
            req = json.loads(body)
            status, doc = 200, {"success": True, "agent": req.get("agent", "default"), "response": req["message"],
                                "context": req.get("context", {}), "delivery_id": "x" * 32}
        out = json.dumps(doc).encode()
        head = (f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(out)}\r\n\r\n").encode()
        self.wfile.write(head + out)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
