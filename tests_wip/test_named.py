"""Named webhooks end to end (SPEC section 8): a real gateway on port 0, real signed requests.

Every request is signed here with hmac/hashlib/base64 over the exact bytes sent, the way
GitHub, Standard Webhooks senders, GitLab and Alertmanager do it (PROTOCOLS.md). Agents
are real: the built-in echo, a Python subprocess (``command``) that appends to a file so a
test can count runs, and a local HTTP server (``http``) where a test needs to hold an
agent call open.
"""

from test_moxxy_webhooks import *  # noqa: I001  (first: the shared fixtures gw, gateway, recorder, fixed_clock)
from test_moxxy_webhooks import PY, Gateway

import base64
import hashlib
import hmac
import json
import os
import queue
import sqlite3
import threading
import urllib.parse
import uuid

import pytest

import moxxy_webhooks as mw

# The star import also binds the shared module's own test functions: drop them so that
# pytest does not collect and run them a second time from this file.
for _name in [n for n, v in list(globals().items())
              if n.startswith("test_") and getattr(v, "__module__", None) == "test_moxxy_webhooks"]:
    del globals()[_name]


# --- helpers ---

GITHUB_SECRET = "github-secret"
NOW = 1_700_000_000  # a fixed "now" for the server's clock (fixed_clock)
SECRET = "named-secret"

# A command agent: appends the message (one line) to argv[1], answers "ran: <message>";
# with argv[2] == "1" its first run fails (exit 3), so a test can stage a failed delivery.
APPEND_AGENT = r"""
import os, sys
path, fail_first = sys.argv[1], sys.argv[2] == "1"
first = not os.path.exists(path)
message = sys.stdin.read().replace("\n", " ")
with open(path, "a") as f:
    f.write(message + "\n")
if fail_first and first:
    sys.stderr.write("first run fails on purpose\n")
    sys.exit(3)
print("ran: " + message)
"""

# Prometheus Alertmanager's sample payload, byte for byte as its Go encoder writes it
# (PROTOCOLS.md): '&' as \u0026, and a trailing newline.
ALERTMANAGER_SAMPLE = (
    rb'{"receiver":"sms","status":"firing","alerts":[{"status":"firing","labels":{"alertname":"ProbeFailure",'
    rb'"instance":"https://server.example.org","job":"http_checks","monitor":"master","severity":"critical"},'
    rb'"annotations":{"description":"Instance https://server.example.org has been down for over 5m. Job: http_checks",'
    rb'"summary":"BlackBox Probe Failure: https://server.example.org"},"startsAt":"2023-02-06T13:08:45.828Z",'
    rb'"endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prometheus.example.org:9090/graph?g0.expr=probe_success+%3D%3D+0\u0026g0.tab=1",'
    rb'"fingerprint":"1a30ba71cca2921f"}],"groupLabels":{"alertname":"ProbeFailure"},"commonLabels":{"alertname":"ProbeFailure",'
    rb'"instance":"https://server.example.org","job":"http_checks","monitor":"master","severity":"critical"},'
    rb'"commonAnnotations":{"description":"Instance https://server.example.org has been down for over 5m. Job: http_checks",'
    rb'"summary":"BlackBox Probe Failure: https://server.example.org"},"externalURL":"http://prometheus.example.org:9093",'
    rb'"version":"4","groupKey":"{}/{severity=\"critical\"}:{alertname=\"ProbeFailure\"}","truncatedAlerts":0}'
    b"\n"
)


def github_sig(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github_sig1(secret: str, body: bytes) -> str:
    return "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def standard_sig(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret[len("whsec_"):])
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def new_whsec() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def shared_gw(tmp_path_factory):
    """One gateway for the table-driven config tests (each uses webhook names of its own)."""
    g = Gateway(tmp_path_factory.mktemp("shared"))
    yield g
    g.close()


def create(gw: Gateway, cfg: dict) -> dict:
    """Create a webhook through the admin API; fail the test unless it is a 201."""
    status, headers, body = gw.admin_call("POST", "/api/webhooks", cfg)
    assert status == 201, body
    assert headers["location"] == f"/api/webhooks/{cfg['name']}"
    return body


def post(gw: Gateway, name: str, raw: bytes, headers: dict, query: str = ""):
    return gw.request("POST", f"/api/webhooks/{name}{query}", raw=raw, headers=headers)


def post_json(gw: Gateway, name: str, payload: dict, secret: str = SECRET, query: str = "", **headers):
    return gw.request("POST", f"/api/webhooks/{name}{query}", payload, {"X-Webhook-Secret": secret, **headers})


def add_append_agent(gw: Gateway, name: str, path, fail_first: bool = False) -> None:
    gw.add_agent(name, {"kind": "command", "argv": [PY, "-c", APPEND_AGENT, str(path), "1" if fail_first else "0"]})


def runs(path) -> list[str]:
    """The messages a command agent made with add_append_agent has been run with."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().splitlines()


def recorded(gw: Gateway, delivery_id: str) -> dict:
    """The delivery record once it is finished (admin API, ?wait= instead of polling)."""
    status, _, record = gw.admin_call("GET", f"/api/deliveries/{delivery_id}?wait=5")
    assert status == 200, record
    return record


def flush_delivery_log(gw: Gateway) -> None:
    """Return once every delivery recorded so far is on disk (so the delivery lists show it too).

    A sync delivery's record reaches the disk a little after its reply (records are batched), but
    an async job is committed before its 202 (SPEC section 10) and the log commits in order: one
    accepted async job is a barrier for every record queued before it. It stands for "the sender
    retries later"; test_an_immediate_repeat_... covers the sender that retries at once.
    """
    status, _, body = gw.generic({"message": "barrier", "response_mode": "async"})
    assert status == 202, body


class StalledDeliveryLog:
    """Hold the write lock of deliveries.db, as a slow disk (an SD card's fsync) would: the log's commits wait.

    Nothing of the gateway is replaced: its writer thread simply cannot commit until ``release``.
    """

    def __init__(self, gw: Gateway):
        self.conn = sqlite3.connect(gw.paths.db, isolation_level=None, timeout=5)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


def github_headers(body: bytes, event: str = "push", delivery: str | None = None, secret: str = GITHUB_SECRET,
                   content_type: str = "application/json") -> dict:
    return {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-Hub-Signature-256": github_sig(secret, body), "Content-Type": content_type,
            "User-Agent": "GitHub-Hookshot/a1b2c3d"}


GITHUB_CONFIG = {"name": "github", "agent": "default", "secret": GITHUB_SECRET,
                 "transform": {"message_template": "GitHub event: {{event_type}} on {{repository.full_name}}"}}
# Deliberately odd spacing and an escaped character: the signature covers these bytes, not a re-encoding.
PUSH_BODY = b'{"ref": "refs/heads/main",  "repository": {"full_name": "octo-org/hello-world"},\n "pusher": {"name": "caf\\u00e9"}}'
PUSH_MESSAGE = "GitHub event: push on octo-org/hello-world"


# --- GitHub ---


def test_github_push_json_signed_over_the_exact_bytes(gw):
    create(gw, GITHUB_CONFIG)
    status, _, body = post(gw, "github", PUSH_BODY, github_headers(PUSH_BODY))
    assert status == 200, body
    assert body["success"] is True and body["agent"] == "default"
    assert body["response"] == PUSH_MESSAGE
    assert len(body["delivery_id"]) == 32


def test_github_push_form_content_type(gw):
    """GitHub's "application/x-www-form-urlencoded" setting: payload=<urlencoded JSON>, signed as sent."""
    create(gw, GITHUB_CONFIG)
    form = ("payload=" + urllib.parse.quote_plus(PUSH_BODY.decode())).encode()
    status, _, body = post(gw, "github", form, github_headers(form, content_type="application/x-www-form-urlencoded"))
    assert status == 200, body
    assert body["response"] == PUSH_MESSAGE


def test_github_legacy_sha1_signature(gw):
    create(gw, GITHUB_CONFIG)
    headers = {"X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4()),
               "X-Hub-Signature": github_sig1(GITHUB_SECRET, PUSH_BODY), "Content-Type": "application/json"}
    status, _, body = post(gw, "github", PUSH_BODY, headers)
    assert status == 200, body
    assert body["response"] == PUSH_MESSAGE


@pytest.mark.parametrize("case", ["wrong secret", "one changed byte", "missing header", "sha1 of another body"])
def test_github_bad_signature_is_401_and_runs_nothing(gw, tmp_path, case):
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path)
    create(gw, {**GITHUB_CONFIG, "agent": "writer"})
    body, headers = PUSH_BODY, github_headers(PUSH_BODY)
    if case == "wrong secret":
        headers["X-Hub-Signature-256"] = github_sig("not-the-secret", body)
    elif case == "one changed byte":
        body = PUSH_BODY.replace(b"main", b"mair")  # signed over the original bytes
    elif case == "missing header":
        del headers["X-Hub-Signature-256"]
    else:
        del headers["X-Hub-Signature-256"]
        headers["X-Hub-Signature"] = github_sig1(GITHUB_SECRET, b"{}")
    status, _, reply = post(gw, "github", body, headers)
    assert status == 401, reply
    assert reply["success"] is False and reply["code"] == "unauthorized"
    assert GITHUB_SECRET not in json.dumps(reply)
    assert runs(log_path) == []


def test_github_ping_answers_pong_without_the_agent(gw, tmp_path):
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path)
    create(gw, {**GITHUB_CONFIG, "agent": "writer"})
    ping = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 42, "hook": {"type": "Repository"}}).encode()
    status, _, body = post(gw, "github", ping, github_headers(ping, event="ping"))
    assert status == 200, body
    assert body["success"] is True and body["pong"] is True
    assert "response" not in body
    status, _, body = post(gw, "github", ping, {"X-GitHub-Event": "ping", "X-GitHub-Delivery": str(uuid.uuid4())})
    assert status == 401, body  # a ping is authenticated like any event
    assert runs(log_path) == []


def test_github_redelivery_is_answered_from_the_first_run(gw, tmp_path):
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path)
    create(gw, {**GITHUB_CONFIG, "agent": "writer"})
    delivery = str(uuid.uuid4())
    status, _, first = post(gw, "github", PUSH_BODY, github_headers(PUSH_BODY, delivery=delivery))
    assert status == 200, first
    assert first["response"] == "ran: " + PUSH_MESSAGE
    flush_delivery_log(gw)
    record = recorded(gw, first["delivery_id"])
    assert record["status"] == "succeeded" and record["response"] == first["response"] and record["webhook"] == "github"
    # GitHub's "Redeliver" button: same X-GitHub-Delivery, same body, a fresh signature
    status, _, again = post(gw, "github", PUSH_BODY, github_headers(PUSH_BODY, delivery=delivery))
    assert status == 200, again
    assert again["success"] is True and again["duplicate"] is True
    assert again["delivery_id"] == first["delivery_id"]
    assert again["response"] == first["response"]
    assert runs(log_path) == [PUSH_MESSAGE]
    # another delivery of the same body is a new event and runs
    status, _, other = post(gw, "github", PUSH_BODY, github_headers(PUSH_BODY))
    assert status == 200 and other.get("duplicate") is None and other["delivery_id"] != first["delivery_id"]
    assert runs(log_path) == [PUSH_MESSAGE, PUSH_MESSAGE]


def test_github_redelivery_after_a_failed_delivery_runs_again(gw, tmp_path):
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "flaky", log_path, fail_first=True)
    create(gw, {**GITHUB_CONFIG, "agent": "flaky"})
    delivery = str(uuid.uuid4())
    status, _, first = post(gw, "github", PUSH_BODY, github_headers(PUSH_BODY, delivery=delivery))
    assert status == 502, first
    assert first["code"] == "agent_failed"
    assert "on purpose" not in json.dumps(first)  # stderr goes to the delivery log, not to the caller
    flush_delivery_log(gw)
    status, _, log = gw.admin_call("GET", "/api/webhooks/github/deliveries")
    assert [(d["status"], "on purpose" in d["error"]) for d in log["deliveries"]] == [("failed", True)]
    status, _, again = post(gw, "github", PUSH_BODY, github_headers(PUSH_BODY, delivery=delivery))
    assert status == 200, again
    assert again.get("duplicate") is None
    assert again["response"] == "ran: " + PUSH_MESSAGE
    assert runs(log_path) == [PUSH_MESSAGE, PUSH_MESSAGE]


@pytest.mark.parametrize("fail_first", [True, False], ids=["failed-then-retried", "succeeded-then-repeated"])
def test_an_immediate_repeat_does_not_depend_on_the_delivery_log_commit(gw, tmp_path, fail_first):
    """A sender retrying at once (a 502, a lost reply) must get the same answer as one retrying later.

    The delivery log's writer is held back (a slow disk), so the first delivery's record is not
    yet committed when the repeat arrives: the gateway answered the first request itself, so it
    knows how it ended.
    """
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path, fail_first=fail_first)
    create(gw, {**GITHUB_CONFIG, "agent": "writer"})
    headers = github_headers(PUSH_BODY)
    results = {}
    stall = StalledDeliveryLog(gw)
    try:
        first = threading.Thread(target=lambda: results.update(first=post(gw, "github", PUSH_BODY, headers)))
        first.start()
        first.join(5)
        if first.is_alive():  # the gateway waits for its record before answering: no window to race
            stall.release()
            first.join(10)
        results["again"] = post(gw, "github", PUSH_BODY, headers)
    finally:
        stall.release()
    (status1, _, body1), (status2, _, body2) = results["first"], results["again"]
    if fail_first:
        assert status1 == 502, body1
        assert status2 == 200 and body2.get("duplicate") is None, body2
        assert body2["response"] == "ran: " + PUSH_MESSAGE
        assert runs(log_path) == [PUSH_MESSAGE, PUSH_MESSAGE]
    else:
        assert status1 == 200, body1
        assert status2 == 200 and body2["duplicate"] is True, body2
        assert body2["delivery_id"] == body1["delivery_id"] and body2["response"] == body1["response"]
        assert runs(log_path) == [PUSH_MESSAGE]


def test_a_sync_delivery_can_be_read_back_at_once(gw):
    """The delivery_id of a sync reply names a known delivery: GET /api/deliveries/{id} finds it.

    The delivery log's writer is held back (a slow disk) while the client reads the id back.
    """
    create(gw, GITHUB_CONFIG)
    results = {}
    stall = StalledDeliveryLog(gw)
    try:
        first = threading.Thread(target=lambda: results.update(first=post(gw, "github", PUSH_BODY, github_headers(PUSH_BODY))))
        first.start()
        first.join(5)
        if first.is_alive():  # the gateway waits for its record before answering: nothing to race
            stall.release()
            first.join(10)
        status, _, body = results["first"]
        assert status == 200, body
        path = f"/api/deliveries/{body['delivery_id']}?wait=5"
        reader = threading.Thread(target=lambda: results.update(read=gw.admin_call("GET", path)))
        reader.start()
        reader.join(1)  # an answer from memory comes at once; one that waits for the commit gets it on release
    finally:
        stall.release()
    reader.join(10)
    status, _, record = results["read"]
    assert status == 200, record
    assert record["id"] == body["delivery_id"] and record["webhook"] == "github"


def test_a_request_refused_with_400_does_not_use_up_its_delivery_id(gw):
    """A typo in the hook URL (?response_mode=asnyc) is fixed, then GitHub's "Redeliver" is pressed."""
    create(gw, GITHUB_CONFIG)
    delivery = str(uuid.uuid4())
    status, _, body = post(gw, "github", PUSH_BODY, github_headers(PUSH_BODY, delivery=delivery), query="?response_mode=asnyc")
    assert status == 400, body
    status, _, body = post(gw, "github", PUSH_BODY, github_headers(PUSH_BODY, delivery=delivery))
    assert status == 200, body
    assert body.get("duplicate") is None and body["response"] == PUSH_MESSAGE


def test_dedupe_window_is_24_hours(gw, tmp_path, fixed_clock):
    fixed_clock(NOW)
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path)
    create(gw, {**GITHUB_CONFIG, "agent": "writer"})
    headers = github_headers(PUSH_BODY)
    status, _, first = post(gw, "github", PUSH_BODY, headers)
    assert status == 200, first
    flush_delivery_log(gw)
    fixed_clock(NOW + 23 * 3600)
    status, _, again = post(gw, "github", PUSH_BODY, headers)
    assert status == 200 and again["duplicate"] is True, again
    fixed_clock(NOW + 24 * 3600 + 60)
    status, _, later = post(gw, "github", PUSH_BODY, headers)
    assert status == 200 and later.get("duplicate") is None, later
    assert runs(log_path) == [PUSH_MESSAGE, PUSH_MESSAGE]


def test_github_event_names_drive_the_filters(gw):
    create(gw, {**GITHUB_CONFIG, "filters": {"include": ["push", "pull_request.opened"]},
                "transform": {"message_template": "{{ event }}: {{ pull_request.title }}"}})
    opened = json.dumps({"action": "opened", "number": 7, "pull_request": {"title": "Fix the build"}}).encode()
    status, _, body = post(gw, "github", opened, github_headers(opened, event="pull_request"))
    assert status == 200 and body["response"] == "pull_request.opened: Fix the build", body
    closed = opened.replace(b'"opened"', b'"closed"')
    status, _, body = post(gw, "github", closed, github_headers(closed, event="pull_request"))
    assert status == 200 and body["filtered"] is True and body["event"] == "pull_request.closed", body
    status, _, body = post(gw, "github", PUSH_BODY, github_headers(PUSH_BODY))
    assert status == 200 and body["response"] == "push: ", body


def test_github_dedupe_survives_a_restart(tmp_path):
    data = tmp_path / "data"
    delivery = str(uuid.uuid4())
    first_gw = Gateway(data)
    try:
        create(first_gw, GITHUB_CONFIG)
        status, _, first = post(first_gw, "github", PUSH_BODY, github_headers(PUSH_BODY, delivery=delivery))
        assert status == 200, first
    finally:
        first_gw.close()
    second_gw = Gateway(data)
    try:
        status, _, again = post(second_gw, "github", PUSH_BODY, github_headers(PUSH_BODY, delivery=delivery))
    finally:
        second_gw.close()
    assert status == 200, again
    assert again["duplicate"] is True and again["delivery_id"] == first["delivery_id"]


# --- Standard Webhooks ---

def test_standard_webhooks_published_vector(gw, fixed_clock):
    """Svix's published vector, through the server with its clock fixed at the vector's timestamp."""
    fixed_clock(1614265330)
    create(gw, {"name": "svix", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"})
    body = b'{"test": 2432232314}'
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "Content-Type": "application/json"}
    status, _, bad = post(gw, "svix", body, {**headers, "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="})
    assert status == 401, bad
    status, _, good = post(gw, "svix", body, {**headers, "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="})
    assert status == 200, good
    assert json.loads(good["response"]) == {"test": 2432232314}  # no template: the payload as JSON


@pytest.mark.parametrize("age, expected", [(0, 200), (290, 200), (-290, 200), (360, 401), (-360, 401)],
                         ids=["now", "290s-old", "290s-ahead", "6min-old", "6min-in-the-future"])
def test_standard_webhooks_timestamp_window(gw, fixed_clock, age, expected):
    fixed_clock(NOW)
    secret = new_whsec()
    create(gw, {"name": "saas", "secret": secret})
    body = json.dumps({"type": "invoice.paid", "data": {"id": "in_1"}}).encode()
    msg_id, ts = "msg_" + uuid.uuid4().hex, NOW - age
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": standard_sig(secret, msg_id, ts, body)}
    status, _, reply = post(gw, "saas", body, headers)
    assert status == expected, reply
    if expected == 401:
        assert reply["code"] == "unauthorized"
    else:
        assert reply["success"] is True and "invoice.paid" in reply["response"]


def test_standard_webhooks_any_valid_signature_in_the_list_wins(gw, fixed_clock):
    fixed_clock(NOW)
    secret, old_secret = new_whsec(), new_whsec()
    create(gw, {"name": "saas", "secret": secret})
    body = b'{"type": "user.created"}'

    def send(make_signatures):
        msg_id = "msg_" + uuid.uuid4().hex
        good, old = standard_sig(secret, msg_id, NOW, body), standard_sig(old_secret, msg_id, NOW, body)
        header = " ".join(make_signatures(good, old))
        return post(gw, "saas", body, {"webhook-id": msg_id, "webhook-timestamp": str(NOW), "webhook-signature": header})

    status, _, reply = send(lambda good, old: [old, "v2,bm90LWEtdjEtc2lnbmF0dXJl", good])
    assert status == 200, reply
    # only wrong entries, and a valid MAC under an unknown version (skipped, not accepted)
    status, _, reply = send(lambda good, old: [old, "v2," + good[3:]])
    assert status == 401, reply


# --- GitLab, Alertmanager, auth options ---


def test_gitlab_token_event_and_dedupe_on_event_uuid(gw, tmp_path):
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path)
    create(gw, {"name": "gitlab", "agent": "writer", "secret": "gl-token",
                "transform": {"message_template": "{{ event_type }}: {{ object_kind }} to {{ project.path_with_namespace }}"}})
    body = json.dumps({"object_kind": "push", "ref": "refs/heads/main",
                       "project": {"path_with_namespace": "group/app"}}).encode()
    event_uuid = str(uuid.uuid4())
    headers = {"X-Gitlab-Token": "gl-token", "X-Gitlab-Event": "Push Hook", "X-Gitlab-Event-UUID": event_uuid,
               "Content-Type": "application/json"}
    status, _, first = post(gw, "gitlab", body, headers)
    assert status == 200, first
    assert first["response"] == "ran: Push Hook: push to group/app"
    status, _, again = post(gw, "gitlab", body, headers)
    assert status == 200, again
    assert again["duplicate"] is True and again["delivery_id"] == first["delivery_id"]
    assert runs(log_path) == ["Push Hook: push to group/app"]
    status, _, wrong = post(gw, "gitlab", body, {**headers, "X-Gitlab-Token": "gl-token-x",
                                                 "X-Gitlab-Event-UUID": str(uuid.uuid4())})
    assert status == 401 and wrong["code"] == "unauthorized"
    assert len(runs(log_path)) == 1


ALERTMANAGER_CONFIG = {
    "name": "alertmanager", "agent": "default", "secret": "am-credentials",
    "transform": {
        "message_template": "{{ alerts.0.labels.alertname }} on {{ alerts.0.labels.instance }}",
        "context_mapping": {"alertname": "$.alerts[0].labels.alertname", "status": "$.status",
                            "severity": "$.alerts[?(@.status == 'firing')].labels.severity"},
    },
}


@pytest.mark.parametrize("authorization", ["Bearer am-credentials", basic("alertmanager", "am-credentials")],
                         ids=["bearer", "basic"])
def test_alertmanager_sample_payload(gw, authorization):
    create(gw, ALERTMANAGER_CONFIG)
    headers = {"Authorization": authorization, "Content-Type": "application/json", "User-Agent": "Alertmanager/0.27.0"}
    status, _, body = post(gw, "alertmanager", ALERTMANAGER_SAMPLE, headers)
    assert status == 200, body
    assert body["response"] == "ProbeFailure on https://server.example.org"
    assert body["context"] == {"alertname": "ProbeFailure", "status": "firing", "severity": "critical"}


@pytest.mark.parametrize("authorization", ["Bearer am-credential", basic("am-credentials", "wrong"), "am-credentials",
                                           "Token am-credentials"],
                         ids=["wrong-bearer", "basic-wrong-password", "no-scheme", "other-scheme"])
def test_alertmanager_wrong_credentials_are_401(gw, authorization):
    create(gw, ALERTMANAGER_CONFIG)
    status, _, body = post(gw, "alertmanager", ALERTMANAGER_SAMPLE, {"Authorization": authorization})
    assert status == 401, body
    assert body["code"] == "unauthorized"


def test_alertmanager_split_gives_one_delivery_per_alert(gw):
    create(gw, {"name": "alertmanager", "secret": "am-credentials",
                "transform": {"split": "$.alerts[*]",
                              "message_template": "{{ status }}: {{ labels.alertname }} on {{ labels.instance }} ({{ receiver }})",
                              "context_mapping": {"fingerprint": "$.fingerprint"}}})
    doc = json.loads(ALERTMANAGER_SAMPLE)
    second = json.loads(json.dumps(doc["alerts"][0]))
    second.update(status="resolved", fingerprint="2b41cb82ddb3a032")
    second["labels"].update(alertname="DiskFull", instance="db-1:9100")
    doc["alerts"].append(second)
    raw = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    status, _, body = post(gw, "alertmanager", raw, {"Authorization": "Bearer am-credentials"})
    assert status == 200, body
    deliveries = body["deliveries"]
    assert [d["response"] for d in deliveries] == ["firing: ProbeFailure on https://server.example.org (sms)",
                                                   "resolved: DiskFull on db-1:9100 (sms)"]
    assert [d["context"] for d in deliveries] == [{"fingerprint": "1a30ba71cca2921f"}, {"fingerprint": "2b41cb82ddb3a032"}]
    assert len({d["delivery_id"] for d in deliveries}) == 2


def test_auth_list_restricts_the_accepted_schemes(gw):
    create(gw, {**GITHUB_CONFIG, "auth": ["github"]})
    status, _, body = post(gw, "github", PUSH_BODY, {"X-Webhook-Secret": GITHUB_SECRET, "X-GitHub-Event": "push"})
    assert status == 401, body
    status, _, body = post(gw, "github", PUSH_BODY, {"Authorization": "Bearer " + GITHUB_SECRET, "X-GitHub-Event": "push"})
    assert status == 401, body
    status, _, body = post(gw, "github", PUSH_BODY, github_headers(PUSH_BODY))
    assert status == 200, body
    assert body["response"] == PUSH_MESSAGE


def test_auth_none_accepts_unauthenticated_calls(gw):
    created = create(gw, {"name": "open", "auth": "none",
                          "transform": {"message_template": "build {{ build }} {{ status }}"}})
    assert created.get("has_secret") is False and "secret" not in created
    status, _, body = gw.request("POST", "/api/webhooks/open", {"build": 4521, "status": "success"})
    assert status == 200, body
    assert body["response"] == "build 4521 success"


def test_webhook_without_a_secret_gets_one_generated(gw):
    created = create(gw, {"name": "jenkins", "agent": "default"})
    secret = created["secret"]
    assert isinstance(secret, str) and len(secret) >= 16 and secret != "***"
    status, _, body = gw.request("POST", "/api/webhooks/jenkins", {"message": "Build #4521 completed"})
    assert status == 401, body
    status, _, body = post_json(gw, "jenkins", {"message": "Build #4521 completed"}, secret=secret)
    assert status == 200, body
    assert body["response"] == "Build #4521 completed"
    # shown once: reading the webhook back gives it redacted
    status, _, shown = gw.admin_call("GET", "/api/webhooks/jenkins")
    assert status == 200 and shown["secret"] == "***" and secret not in json.dumps(shown)


# --- the seed's examples: templates, context mapping, filters ---


def test_seed_template_example(gw):
    create(gw, {"name": "alerts", "secret": SECRET,
                "transform": {"message_template": "Alert: {{alert_name}} on {{instance}} ({{severity}})"}})
    status, _, body = post_json(gw, "alerts", {"alert_name": "HighCPU", "instance": "server-1", "severity": "critical"})
    assert status == 200, body
    assert body["response"] == "Alert: HighCPU on server-1 (critical)"


def test_seed_context_mapping_is_the_reply_context(gw):
    create(gw, {"name": "alerts", "secret": SECRET,
                "transform": {"context_mapping": {"service": "$.labels.service", "severity": "$.status"}}})
    status, _, body = post_json(gw, "alerts", {"labels": {"service": "billing"}, "status": "critical", "message": "down"})
    assert status == 200, body
    assert body["context"] == {"service": "billing", "severity": "critical"}
    assert body["response"] == "down"


SEED_FILTERS = {"include": ["*.critical", "*.warning"], "exclude": ["test.*"]}


@pytest.mark.parametrize("payload, event, reason", [
    ({"source": "monitoring", "severity": "critical"}, None, None),
    ({"source": "monitoring", "severity": "WARNING"}, None, None),
    ({"source": "monitoring", "severity": "info"}, "monitoring.info", "include"),
    ({"source": "test", "severity": "critical"}, "test.critical", "test.*"),
], ids=["critical-passes", "warning-passes-any-case", "info-not-included", "test-excluded"])
def test_seed_include_exclude_filters(gw, tmp_path, payload, event, reason):
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path)
    create(gw, {"name": "alerts", "agent": "writer", "secret": SECRET, "filters": SEED_FILTERS,
                "transform": {"message_template": "{{source}} {{severity}}"}})
    status, _, body = post_json(gw, "alerts", payload)
    assert status == 200, body
    if event is None:
        assert body.get("filtered") is None and body["response"] == f"ran: {payload['source']} {payload['severity']}"
        assert len(runs(log_path)) == 1
    else:
        assert body["success"] is True and body["filtered"] is True
        assert body["event"] == event and reason in body["reason"]
        assert runs(log_path) == []


def test_seed_condition_filter(gw, tmp_path):
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path)
    create(gw, {"name": "alerts", "agent": "writer", "secret": SECRET,
                "filters": {"condition": "$.severity == 'critical'"}})
    status, _, body = post_json(gw, "alerts", {"severity": "warning", "message": "disk 80%"})
    assert status == 200, body
    assert body["filtered"] is True and "$.severity == 'critical'" in body["reason"]
    assert body["event"] == "alerts.warning"
    assert runs(log_path) == []
    status, _, body = post_json(gw, "alerts", {"severity": "critical", "message": "disk 99%"})
    assert status == 200 and body["response"] == "ran: disk 99%"
    assert runs(log_path) == ["disk 99%"]


def test_filters_event_template_overrides_the_event_name(gw, tmp_path):
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path)
    create(gw, {"name": "alerts", "agent": "writer", "secret": SECRET,
                "filters": {"event": "{{ service | lower }}.{{ level }}", "include": ["billing.*"]}})
    # the default name would be test.critical, which the include list does not match
    payload = {"source": "test", "severity": "critical", "service": "Billing", "level": "error", "message": "m1"}
    status, _, body = post_json(gw, "alerts", payload)
    assert status == 200 and body["response"] == "ran: m1", body
    status, _, body = post_json(gw, "alerts", {**payload, "service": "auth", "message": "m2"})
    assert status == 200 and body["filtered"] is True, body
    assert body["event"] == "auth.error"
    assert runs(log_path) == ["m1"]


def test_disabled_webhook_is_filtered_as_disabled(gw, tmp_path):
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path)
    create(gw, {"name": "paused", "agent": "writer", "secret": SECRET, "enabled": False})
    status, _, body = post_json(gw, "paused", {"message": "hello"})
    assert status == 200, body
    assert body["success"] is True and body["filtered"] is True and body["reason"] == "disabled"
    assert "event" in body
    assert runs(log_path) == []


def test_template_names_and_builtins_leave_out_authentication_headers(gw):
    create(gw, {"name": "ci", "secret": SECRET, "transform": {
        "message_template": "{{ webhook }}/{{ event }}/{{ event_type }}: {{ status }} on {{ query.env }} by "
                            "{{ headers.user-agent }} [{{ headers.x-webhook-secret | default('hidden') }}] {{ headers }}",
        "context_mapping": {"status": "$.build.status"}}})
    headers = {"X-Webhook-Secret": SECRET, "Authorization": "Bearer " + SECRET, "User-Agent": "Jenkins/2.4",
               "X-Event-Type": "build"}
    status, _, body = gw.request("POST", "/api/webhooks/ci?env=prod", {"status": "top", "build": {"status": "success"}}, headers)
    assert status == 200, body
    # the mapped context comes before the payload; the event's qualifier is the payload's status
    assert body["response"].startswith("ci/build.top/build: success on prod by Jenkins/2.4 [hidden] {")
    assert SECRET not in body["response"]
    assert "authorization" not in body["response"] and "x-webhook-secret" not in body["response"]
    assert '"x-event-type":"build"' in body["response"]


def test_body_is_parsed_after_authentication(gw):
    create(gw, {"name": "ci", "secret": SECRET})
    status, _, body = gw.request("POST", "/api/webhooks/ci", None, {"X-Webhook-Secret": SECRET})
    assert status == 200 and body["response"] == "{}", body  # an empty body is {}
    status, _, body = post(gw, "ci", b'{"broken": ', {"X-Webhook-Secret": "wrong"})
    assert status == 401, body
    status, _, body = post(gw, "ci", b'{"broken": ', {"X-Webhook-Secret": SECRET})
    assert status == 400 and body["code"] == "invalid_json", body
    status, _, body = post(gw, "ci", b"[1, 2]", {"X-Webhook-Secret": SECRET})
    assert status == 400 and body["success"] is False, body


def test_put_replaces_the_config_and_keeps_created_at_and_the_secret(gw, fixed_clock):
    fixed_clock(NOW)
    created = create(gw, {"name": "alerts", "secret": SECRET, "transform": {"message_template": "v1 {{ message }}"}})
    fixed_clock(NOW + 3600)
    status, _, body = gw.admin_call("PUT", "/api/webhooks/alerts",
                                    {"name": "alerts", "secret": "***", "transform": {"message_template": "v2 {{ message }}"}})
    assert status == 200, body
    assert body["created_at"] == created["created_at"] and body["updated_at"] > created["updated_at"]
    assert body["secret"] == "***"
    status, _, reply = post_json(gw, "alerts", {"message": "hi"})
    assert status == 200 and reply["response"] == "v2 hi", reply
    assert gw.admin_call("PUT", "/api/webhooks/nope", {"secret": SECRET})[0] == 404


@pytest.mark.parametrize("name, status, code", [("GitHub", 400, "invalid_config"), ("generic", 409, "conflict"),
                                                ("-x", 400, "invalid_config"),
                                                ("github\n", 400, "invalid_config")])
def test_bad_or_reserved_names_are_refused(shared_gw, name, status, code):
    got, _, body = shared_gw.admin_call("POST", "/api/webhooks", {"name": name, "secret": SECRET})
    assert got == status and body["code"] == code, body
    assert name not in [w["name"] for w in shared_gw.admin_call("GET", "/api/webhooks")[2]["webhooks"]]


# --- validation at create and update ---

BAD_CONFIGS = [
    ({"transform": {"message_template": "Alert: {{ alert_name"}}, "transform.message_template", True),
    ({"transform": {"message_template": "Alert: {{ alert_name on {{instance}}"}}, "transform.message_template", True),
    ({"transform": {"message_template": "{{ severity | shout }}"}}, "transform.message_template", True),
    ({"transform": {"context_mapping": {"service": "$.labels[?("}}}, "transform.context_mapping.service", False),
    ({"transform": {"context_mapping": {"service": "labels.service"}}}, "transform.context_mapping.service", False),
    ({"transform": {"split": "$.alerts["}}, "transform.split", False),
    ({"filters": {"condition": "$.severity == "}}, "filters.condition", True),
    ({"filters": {"condition": "$.severity = 'critical'"}}, "filters.condition", True),
    ({"filters": {"condition": "severity == 'critical'"}}, "filters.condition", True),
    ({"filters": {"event": "{{ source"}}, "filters.event", True),
    ({"filters": {"include": ["*.critical", ""]}}, "filters.include[1]", False),
    ({"filters": {"exclude": [42]}}, "filters.exclude[0]", False),
    ({"allowed_ips": ["10.0.0.0/33"]}, "allowed_ips[0]", False),
    ({"allowed_ips": ["10.0.0.0/8", "not-an-ip"]}, "allowed_ips[1]", False),
    ({"agent": "nope"}, "agent", False),
]
BAD_IDS = ["template-unclosed", "template-junk", "template-filter", "jsonpath-syntax", "jsonpath-no-dollar",
           "split-syntax", "condition-truncated", "condition-single-equals", "condition-bare-word", "event-template",
           "glob-empty", "glob-not-string", "cidr-prefix", "cidr-junk", "unknown-agent"]


@pytest.mark.parametrize("bad, field, has_position", BAD_CONFIGS, ids=BAD_IDS)
def test_invalid_config_is_400_and_nothing_is_saved(shared_gw, bad, field, has_position):
    gw = shared_gw
    status, _, body = gw.admin_call("POST", "/api/webhooks", {"name": "broken", "secret": SECRET, **bad})
    assert status == 400, body
    assert body["success"] is False and body["code"] == "invalid_config"
    assert body["error"].startswith(field + ":"), body["error"]
    if has_position:
        assert "position" in body["error"]
    assert gw.admin_call("GET", "/api/webhooks/broken")[0] == 404
    assert "broken" not in [w["name"] for w in gw.admin_call("GET", "/api/webhooks")[2]["webhooks"]]
    if os.path.exists(gw.paths.webhooks):  # no file at all is fine too: nothing was ever saved
        with open(gw.paths.webhooks) as f:
            assert "broken" not in json.load(f)["webhooks"]
    assert post_json(gw, "broken", {"message": "x"})[0] == 404


@pytest.mark.parametrize("bad, field, has_position", BAD_CONFIGS[::3], ids=BAD_IDS[::3])
def test_invalid_update_is_400_and_keeps_the_old_config(shared_gw, bad, field, has_position):
    gw, name = shared_gw, "upd-" + field.replace(".", "-").replace("[", "").replace("]", "").replace("_", "-")
    create(gw, {"name": name, "secret": SECRET, "transform": {"message_template": "old {{ message }}"}})
    status, _, body = gw.admin_call("PUT", f"/api/webhooks/{name}", {"name": name, "secret": SECRET, **bad})
    assert status == 400 and body["code"] == "invalid_config", body
    assert body["error"].startswith(field + ":"), body["error"]
    status, _, shown = gw.admin_call("GET", f"/api/webhooks/{name}")
    assert shown["transform"] == {"message_template": "old {{ message }}"}
    status, _, reply = post_json(gw, name, {"message": "still works"})
    assert status == 200 and reply["response"] == "old still works", reply


# --- dry run and manual triggers ---

DRY_CONFIG = {"name": "alerts", "agent": "writer", "secret": SECRET,
              "transform": {"message_template": "Alert: {{alert_name}} ({{ context.service }})",
                            "context_mapping": {"service": "$.labels.service", "severity": "$.severity"}},
              "filters": {"include": ["*.critical"]}}


def test_dry_run_shows_what_would_happen_without_running_the_agent(gw, tmp_path):
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path)
    create(gw, DRY_CONFIG)
    payload = {"source": "prometheus", "severity": "critical", "alert_name": "HighCPU", "labels": {"service": "api"}}
    status, _, body = gw.request("POST", "/api/webhooks/alerts/trigger?dry_run=1", payload, gw.admin)
    assert status == 200, body
    assert body["dry_run"] is True and body["agent"] == "writer"
    assert body["context"] == {"service": "api", "severity": "critical"}
    assert body["event"] == "prometheus.critical"
    assert body["filtered"] is False
    assert body["message"] == "Alert: HighCPU (api)"
    # with the webhook's own secret, for a payload the filters drop
    status, _, body = gw.request("POST", "/api/webhooks/alerts/trigger?dry_run=1",
                                 {**payload, "severity": "info"}, {"X-Webhook-Secret": SECRET})
    assert status == 200, body
    assert body["filtered"] is True and body["event"] == "prometheus.info" and "include" in body["reason"]
    assert body["context"] == {"service": "api", "severity": "info"}
    assert runs(log_path) == []


def test_trigger_with_the_admin_token_delivers(gw, tmp_path):
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path)
    create(gw, DRY_CONFIG)
    payload = {"source": "manual", "severity": "critical", "alert_name": "Test", "labels": {"service": "db"}}
    status, _, body = gw.request("POST", "/api/webhooks/alerts/trigger", payload, gw.admin)
    assert status == 200, body
    assert body["response"] == "ran: Alert: Test (db)"
    assert runs(log_path) == ["Alert: Test (db)"]
    # the admin token opens /trigger only, not the URL given to senders; no credentials opens nothing
    assert gw.request("POST", "/api/webhooks/alerts", payload, gw.admin)[0] == 401
    assert gw.request("POST", "/api/webhooks/alerts/trigger?dry_run=1", payload)[0] == 401
    assert runs(log_path) == ["Alert: Test (db)"]


# --- allowlists, response modes, concurrency ---


def test_per_webhook_allowed_ips(gw, tmp_path):
    log_path = tmp_path / "runs.log"
    add_append_agent(gw, "writer", log_path)
    create(gw, {"name": "office", "agent": "writer", "secret": SECRET, "allowed_ips": ["10.0.0.0/8"]})
    create(gw, {"name": "local", "agent": "writer", "secret": SECRET, "allowed_ips": ["10.0.0.0/8", "127.0.0.0/8"]})
    status, _, body = post_json(gw, "office", {"message": "from loopback"})
    assert status == 403, body
    assert body["code"] == "forbidden" and "127.0.0.1" in body["error"]
    assert post_json(gw, "office", {"message": "x"}, secret="wrong")[0] == 403  # refused before authentication
    status, _, body = post_json(gw, "local", {"message": "from loopback"})
    assert status == 200, body
    assert runs(log_path) == ["from loopback"]


def test_response_mode_async_on_the_url(gw):
    create(gw, {"name": "alerts", "secret": SECRET, "transform": {"message_template": "queued {{ n }}"}})
    status, headers, body = post_json(gw, "alerts", {"n": 7}, query="?response_mode=async")
    assert status == 202, body
    assert body["success"] is True and body["status"] == "queued" and body["agent"] == "default"
    assert headers["location"] == f"/api/deliveries/{body['delivery_id']}"
    status, _, record = gw.admin_call("GET", f"/api/deliveries/{body['delivery_id']}?wait=5")
    assert status == 200, record
    assert record["status"] == "succeeded" and record["response"] == "queued 7" and record["webhook"] == "alerts"


def test_max_concurrency_one_makes_a_second_sync_request_wait_for_the_slot(gateway, recorder):
    release = threading.Event()
    lock, in_flight, peak = threading.Lock(), [0], [0]

    def reply(method, path, body):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            if body["message"] == "first":
                release.wait(10)
            return 200, {"response": "done " + body["message"]}
        finally:
            with lock:
                in_flight[0] -= 1

    agent = recorder(reply)
    gw = gateway()
    gw.add_agent("slow", {"kind": "http", "url": agent.url + "/chat"})
    create(gw, {"name": "serial", "agent": "slow", "secret": SECRET, "max_concurrency": 1})
    results, finished = {}, []

    def send(message):
        results[message] = post_json(gw, "serial", {"message": message})
        finished.append(message)

    first = threading.Thread(target=send, args=("first",))
    first.start()
    assert agent.next()[3]["message"] == "first"  # the first request holds the only slot
    second = threading.Thread(target=send, args=("second",))
    second.start()
    # while the first holds the slot, the second is in the server but never reaches the agent
    with pytest.raises(queue.Empty):
        agent.requests.get(timeout=0.5)
    assert gw.server.active() == 2 and finished == []
    release.set()
    first.join(10)
    second.join(10)
    assert agent.next()[3]["message"] == "second"
    assert finished == ["first", "second"]
    assert results["first"][0] == 200 and results["first"][2]["response"] == "done first"
    assert results["second"][0] == 200 and results["second"][2]["response"] == "done second"
    assert peak[0] == 1


def test_a_retry_of_a_request_refused_for_a_full_queue_is_not_a_duplicate(gateway, recorder):
    """Alertmanager and GitLab retry a 503 with the same id: the retry must not be taken for the event itself."""
    release = threading.Event()

    def reply(method, path, body):
        if body["message"] == "blocker":
            release.wait(10)
        return 200, {"response": "ok " + body["message"]}

    agent = recorder(reply)
    gw = gateway(queue_size=1, workers=1)
    gw.add_agent("slow", {"kind": "http", "url": agent.url + "/chat"})
    create(gw, {"name": "queued", "agent": "slow", "secret": SECRET, "response_mode": "async"})
    key = {"Idempotency-Key": "evt-" + uuid.uuid4().hex}
    try:
        status, _, blocker = post_json(gw, "queued", {"message": "blocker"})
        assert status == 202, blocker
        assert agent.next()[3]["message"] == "blocker"  # running: the queue's one place is taken
        status, headers, refused = post_json(gw, "queued", {"message": "event"}, **key)
        assert status == 503 and int(headers["retry-after"]) >= 1, refused
        status, _, retried = post_json(gw, "queued", {"message": "event"}, **key)
        assert status == 503 and retried.get("duplicate") is None, retried  # the queue is still full
    finally:
        release.set()
    assert recorded(gw, blocker["delivery_id"])["status"] == "succeeded"
    status, _, accepted = post_json(gw, "queued", {"message": "event"}, **key)
    assert status == 202, accepted
    assert recorded(gw, accepted["delivery_id"])["response"] == "ok event"


# --- rate limits: 503, never 429, on named routes ---


def test_named_rate_limit_is_503_with_retry_after(gateway):
    # "2/m": a burst of 2 that refills one token every 30 s, so the test never races the refill.
    # The trusted proxy lets each call come from its own client address, keeping the per-IP
    # limit out of the way of the per-webhook one.
    gw = gateway(rate_limit="2/m", trusted_proxies=mw.parse_networks("127.0.0.1/32"))
    create(gw, {"name": "limited", "secret": SECRET})

    def call(ip, secret=SECRET, name="limited"):
        return post_json(gw, name, {"message": "hi"}, secret=secret, **{"X-Forwarded-For": ip})

    # unsigned junk is refused before the per-webhook limit, so it cannot use up the sender's budget
    for i in range(3):
        assert call(f"203.0.113.{i}", secret="junk")[0] == 401
    assert call("198.51.100.1")[0] == 200
    assert call("198.51.100.2")[0] == 200
    status, headers, body = call("198.51.100.3")
    assert status == 503, body
    assert body["code"] == "rate_limited" and "limited" in body["error"]
    assert int(headers["retry-after"]) >= 1


def test_per_ip_rate_limit_on_a_named_route_is_503_not_429(gateway):
    gw = gateway(rate_limit="2/m", trusted_proxies=mw.parse_networks("127.0.0.1/32"))
    create(gw, {"name": "one", "secret": SECRET})
    create(gw, {"name": "two", "secret": SECRET})
    ip = {"X-Forwarded-For": "198.51.100.9"}
    assert post_json(gw, "one", {"message": "a"}, **ip)[0] == 200
    assert post_json(gw, "two", {"message": "b"}, **ip)[0] == 200
    status, headers, body = post_json(gw, "one", {"message": "c"}, **ip)  # webhook 'one' has a token left; the IP has none
    assert status == 503, body
    assert body["code"] == "rate_limited" and "198.51.100.9" in body["error"]
    assert int(headers["retry-after"]) >= 1
