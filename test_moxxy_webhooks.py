"""Tests for moxxy_webhooks, ordered like the module.

Pure parts are parametrized tables; the rest runs a real server on port 0
with real HTTP clients, real subprocess agents and local HTTP servers standing
in for agent services and platform APIs. Nothing of our own code is mocked.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import http.server
import json
import os
import queue
import socket
import sys
import threading
import time
import urllib.parse

import pytest
from click.testing import CliRunner

import moxxy_webhooks as mw

PY = sys.executable


# --- helpers shared by every section ---


class Recorder(http.server.ThreadingHTTPServer):
    """A local HTTP server standing in for an agent service or a platform API.

    Every request is put on ``self.requests`` as (method, path, headers, parsed JSON or raw body);
    ``reply`` decides the answer: (status, body dict or bytes).
    """

    daemon_threads = True

    def __init__(self, reply=None):
        self.requests: queue.Queue = queue.Queue()
        self.reply = reply or (lambda method, path, body: (200, {"ok": True}))

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(h):
                raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                self.requests.put((h.command, h.path, {k.lower(): v for k, v in h.headers.items()}, body))
                status, out = self.reply(h.command, h.path, body)
                data = out if isinstance(out, bytes) else json.dumps(out).encode()
                h.send_response(status)
                h.send_header("Content-Type", "application/json")
                h.send_header("Content-Length", str(len(data)))
                h.end_headers()
                h.wfile.write(data)

            do_POST = do_PATCH = do_PUT = do_GET = _any

            def log_message(h, *args):
                pass

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next(self, timeout: float = 10.0):
        """The next recorded request (waits for it; fails the test if none comes)."""
        return self.requests.get(timeout=timeout)


@pytest.fixture
def recorder():
    servers = []

    def make(reply=None) -> Recorder:
        servers.append(Recorder(reply))
        return servers[-1]

    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


class Gateway:
    """A running gateway on port 0 (real App, real Server, real sockets) and a client for it."""

    def __init__(self, data_dir: str, **options):
        options.setdefault("port", 0)
        options.setdefault("rate_limit", "off")
        options.setdefault("retry_base", 0.01)
        options.setdefault("grace", 2.0)
        options.setdefault("inline_window", 1.0)
        self.paths = mw.Paths(str(data_dir))
        self.app = mw.App(self.paths, mw.Options(**options))
        self.app.start()
        self.server = mw.Server(self.app)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.port = self.server.server_address[1]
        self.secret = self.app.vault.get("webhook_secret")
        self.admin = {"Authorization": "Bearer " + self.app.vault.get("admin_token")}

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        """Send one request on a fresh connection; return (status, headers, parsed JSON or text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        try:
            parsed = json.loads(payload)
        except ValueError:
            parsed = payload.decode("utf-8", "replace")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed

    def generic(self, body, secret=None, **headers):
        headers = {"X-Webhook-Secret": self.secret if secret is None else secret, **headers}
        return self.request("POST", "/api/webhooks/generic", body, headers)

    def admin_call(self, method: str, path: str, body=None):
        return self.request(method, path, body, self.admin)

    def vault_set(self, key: str, value: str) -> None:
        self.app.vault.set(key, value)

    def add_agent(self, name: str, cfg: dict) -> None:
        mw.save_agent(self.app.store, name, cfg, create=True)

    def close(self) -> None:
        self.server.stop(1.0)
        self.app.stop(1.0)


@pytest.fixture
def gateway(tmp_path):
    made = []

    def start(**options) -> Gateway:
        made.append(Gateway(tmp_path / f"data{len(made)}", **options))
        return made[-1]

    yield start
    for g in made:
        g.close()


@pytest.fixture
def gw(gateway) -> Gateway:
    """A gateway with the default options."""
    return gateway()


@pytest.fixture
def runner(tmp_path):
    """Invoke the CLI on a temp data directory: run('create', 'x', ...) -> click Result."""
    data = str(tmp_path / "cli-data")
    cli_runner = CliRunner()

    def run(*args, input=None):
        return cli_runner.invoke(mw.cli, ["--data-dir", data, *args], input=input, catch_exceptions=False)

    run.data_dir = data
    return run


@pytest.fixture
def fixed_clock(monkeypatch):
    """Fix the module's clock (for signature vectors with old timestamps)."""

    def set_time(ts: float) -> None:
        monkeypatch.setattr(mw, "clock", lambda: ts)

    return set_time


# --- smoke ---


def test_sync_echo_round_trip(gw):
    status, headers, body = gw.generic({"agent": "default", "message": "Hello", "context": {"event_id": "12345"}})
    assert status == 200
    assert body["success"] is True and body["response"] == "Hello" and body["context"] == {"event_id": "12345"}
    assert len(body["delivery_id"]) == 32 and headers["x-request-id"]
