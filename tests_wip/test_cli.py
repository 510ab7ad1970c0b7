"""CLI tests (SPEC sections 2, 3, 4, 13): every command through click's CliRunner on a temp data dir.

Exit codes: 0 ok, 1 errors (one ``Error: ...`` line), 2 usage mistakes. Where the CLI meets a running
server (send, deliveries retry, rotate grace) the server is a real gateway on port 0; concurrency uses
real OS processes.
"""

from test_moxxy_webhooks import *  # noqa: F401,F403 (shared fixtures: runner, gateway, gw, recorder)

import hashlib
import hmac
import io
import json
import logging
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

import moxxy_webhooks as mw
from test_moxxy_webhooks import gateway, gw, runner  # noqa: F401 (fixtures)

PY = sys.executable
MODULE = os.path.abspath(mw.__file__)
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
CORRUPT_WEBHOOKS = b'{"version": 1, "webhooks": {'
CORRUPT_VAULT = b'{"k": '

# The seed's alert-webhook config, as SPEC section 8 prints it.
SEED_ALERT = {
    "name": "alert-webhook", "agent": "default", "secret": "my-secret",
    "response_mode": "sync",
    "transform": {"message_template": "Alert from {{source}}: {{message}}",
                  "context_mapping": {"severity": "$.severity", "service": "$.service_name"}},
    "filters": {"include": ["*.critical", "*.warning"], "exclude": ["*.debug"],
                "condition": "$.severity == 'critical'", "event": "{{source}}.{{severity}}"},
    "allowed_ips": ["10.0.0.0/8"], "enabled": True,
}


# --- helpers ---


def error_line(result) -> str:
    """The last non-empty line on stderr (click prints ``Error: ...`` there)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def problems(result) -> list[str]:
    return sorted(line for line in result.stderr.splitlines() if line.startswith("problem: "))


def read_doc(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def hooks_file(run) -> str:
    return os.path.join(run.data_dir, "webhooks.json")


def vault_file(run) -> str:
    return os.path.join(run.data_dir, "vault.json")


def stored(run, name: str) -> dict | None:
    path = hooks_file(run)
    if not os.path.exists(path):
        return None
    return read_doc(path).get("webhooks", {}).get(name)


def cli_at(root: str, *args, input=None):
    """Invoke the CLI on another data directory (e.g. a running gateway's)."""
    return CliRunner().invoke(mw.cli, ["--data-dir", str(root), *args], input=input, catch_exceptions=False)


def dry_run(run, name: str, payload, *args) -> dict:
    result = run("test", name, *args, input=json.dumps(payload))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def restore_logging():
    """``serve`` configures the package logger on the runner's stderr: put it back afterwards."""
    logger = logging.getLogger("moxxy_webhooks")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


# --- create ---


def test_create_with_every_option_stores_the_config(runner):
    result = runner("create", "alerts", "--agent", "default", "--secret", "sek-ret-1",
                    "--template", "Alert {{severity}} on {{service}}",
                    "--map", "severity=$.severity", "--map", "service=$.service_name",
                    "--include", "*.critical", "--include", "*.warning", "--exclude", "*.debug",
                    "--condition", "$.severity == 'critical'", "--mode", "async",
                    "--allowed-ip", "10.0.0.0/8", "--auth", "github")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Created webhook 'alerts' -> agent 'default': POST /api/webhooks/alerts\n"
    assert "sek-ret-1" not in result.output
    cfg = stored(runner, "alerts")
    created, updated = cfg.pop("created_at"), cfg.pop("updated_at")
    assert ISO.match(created) and ISO.match(updated)
    assert cfg == {
        "agent": "default", "secret": "sek-ret-1", "response_mode": "async",
        "transform": {"message_template": "Alert {{severity}} on {{service}}",
                      "context_mapping": {"severity": "$.severity", "service": "$.service_name"}},
        "filters": {"include": ["*.critical", "*.warning"], "exclude": ["*.debug"],
                    "condition": "$.severity == 'critical'"},
        "allowed_ips": ["10.0.0.0/8"], "auth": ["github"],
    }
    # and the stored config compiles to what the options said
    wh = mw.compile_config(read_doc(hooks_file(runner))).webhooks["alerts"]
    assert wh.auth == frozenset({"github"}) and wh.response_mode == "async"
    assert [str(n) for n in wh.allowed_ips] == ["10.0.0.0/8"]


def test_create_without_secret_prints_a_generated_one_once(runner):
    result = runner("create", "gen")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "Created webhook 'gen' -> agent 'default': POST /api/webhooks/gen"
    m = re.fullmatch(r"Secret \(shown once, store it now\): (\S+)", lines[1])
    assert m, result.stdout
    secret = m.group(1)
    assert len(secret) >= 24 and stored(runner, "gen")["secret"] == secret
    # never again: not in show, list or list --json
    for args in (("show", "gen"), ("list",), ("list", "--json")):
        out = runner(*args)
        assert out.exit_code == 0 and secret not in out.output, args


def test_create_json_output_carries_the_generated_secret(runner):
    result = runner("create", "gen", "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc == {"name": "gen", "secret": stored(runner, "gen")["secret"]}
    given = runner("create", "given", "--secret", "abc-given", "--json")
    assert json.loads(given.stdout) == {"name": "given"}


def test_create_from_json_file_with_the_seed_alert_webhook(runner, tmp_path):
    path = tmp_path / "alert.json"
    path.write_text(json.dumps(SEED_ALERT))
    result = runner("create", "alert-webhook", "--from-json", str(path))
    assert result.exit_code == 0, result.output
    cfg = dict(stored(runner, "alert-webhook"))
    assert ISO.match(cfg.pop("created_at")) and ISO.match(cfg.pop("updated_at"))
    assert cfg == {k: v for k, v in SEED_ALERT.items() if k != "name"}
    # the config works as the seed describes
    critical = dry_run(runner, "alert-webhook", {"source": "prometheus", "severity": "critical",
                                                 "message": "CPU high", "service_name": "api"})
    assert critical["event"] == "prometheus.critical" and critical["filtered"] is False
    assert critical["message"] == "Alert from prometheus: CPU high"
    assert critical["context"] == {"severity": "critical", "service": "api"}
    warning = dry_run(runner, "alert-webhook", {"source": "prometheus", "severity": "warning", "message": "x"})
    assert warning["filtered"] is True and warning["reason"] == "condition is false: $.severity == 'critical'"
    debug = dry_run(runner, "alert-webhook", {"source": "prometheus", "severity": "debug", "message": "x"})
    assert debug["filtered"] is True
    assert debug["reason"] == "event 'prometheus.debug' matches no include pattern (*.critical, *.warning)"


def test_create_from_json_stdin_and_options_override_it(runner):
    result = runner("create", "from-stdin", "--from-json", "-", "--mode", "async", input=json.dumps(SEED_ALERT))
    assert result.exit_code == 0, result.output
    cfg = stored(runner, "from-stdin")
    assert cfg["response_mode"] == "async" and cfg["secret"] == "my-secret"
    assert cfg["transform"] == SEED_ALERT["transform"] and cfg["filters"] == SEED_ALERT["filters"]


@pytest.mark.parametrize("text, error", [
    ("{not json", "Error: --from-json: not valid JSON: "),
    ("[1, 2]", "Error: --from-json: the config must be a JSON object"),
])
def test_create_from_json_refuses_bad_input(runner, text, error):
    result = runner("create", "x", "--from-json", "-", input=text)
    assert result.exit_code == 1
    assert error_line(result).startswith(error)
    assert stored(runner, "x") is None


def test_create_auth_none_must_be_explicit_and_gets_no_secret(runner):
    result = runner("create", "open", "--auth", "none")
    assert result.exit_code == 0
    assert "Secret" not in result.stdout
    cfg = stored(runner, "open")
    assert cfg["auth"] == "none" and "secret" not in cfg
    assert json.loads(runner("show", "open").stdout)["has_secret"] is False


def test_create_duplicate_is_refused(runner):
    assert runner("create", "dup", "--secret", "one").exit_code == 0
    result = runner("create", "dup", "--secret", "two")
    assert result.exit_code == 1
    assert error_line(result) == "Error: webhook 'dup' already exists (use PUT /api/webhooks/dup or 'moxxy-webhooks update')"
    assert stored(runner, "dup")["secret"] == "one"


@pytest.mark.parametrize("name", ["generic", "telegram", "slack", "discord"])
def test_create_reserved_name_is_refused(runner, name):
    result = runner("create", name, "--secret", "s")
    assert result.exit_code == 1
    assert error_line(result) == f"Error: '{name}' is a reserved name (discord, generic, slack, telegram)"
    assert stored(runner, name) is None


@pytest.mark.parametrize("args, error", [
    (["--template", "x {{ a | nope }}"],
     "Error: transform.message_template: unknown filter 'nope' at position 10 "
     "(known: default, upper, lower, trim, json, truncate)"),
    (["--template", "Hi {{ name"],
     "Error: transform.message_template: '{{' at position 4 is never closed with '}}'"),
    (["--condition", "$.severity =="],
     "Error: filters.condition: expected a value (a $path, 'string', number, true, false, null or [list]) "
     "at position 14, found the end"),
    (["--condition", "$.a == 'x' ; drop"],
     "Error: filters.condition: unexpected character ';' at position 12"),
    (["--map", "k=severity"],
     "Error: transform.context_mapping.k: must be a JSONPath expression starting with '$', not 'severity'"),
    (["--allowed-ip", "10.0.0.0/8", "--allowed-ip", "10.0.0.300"],
     "Error: allowed_ips[1]: '10.0.0.300' is not an IP address or CIDR"),
    (["--agent", "ghost"],
     "Error: agent: unknown agent 'ghost' (add it with 'moxxy-webhooks agent add')"),
    (["--auth", "nope"],
     'Error: auth: must be "none" or a list drawn from header, github, standard, gitlab, bearer, basic'),
])
def test_create_bad_config_names_the_field_and_position(runner, args, error):
    result = runner("create", "bad", "--secret", "s", *args)
    assert result.exit_code == 1
    assert result.stderr == error + "\n"  # one clear line, nothing else
    assert result.stdout == ""
    assert stored(runner, "bad") is None


def test_create_bad_jsonpath_names_the_field_and_position(runner):
    result = runner("create", "bad", "--secret", "s", "--map", "k=$.[[")
    assert result.exit_code == 1
    line = error_line(result)
    assert line.startswith("Error: transform.context_mapping.k: invalid JSONPath '$.[[': ")
    assert "1:3" in line  # jsonpath-ng's line:column of the bad token
    assert stored(runner, "bad") is None


def test_create_bad_name_is_refused(runner):
    result = runner("create", "Bad_Name", "--secret", "s")
    assert result.exit_code == 1
    assert error_line(result) == ("Error: name: 'Bad_Name' must be 1-64 characters of a-z, 0-9, '-' and '_', "
                                  "starting with a letter or digit")


@pytest.mark.parametrize("args", [
    ["create"],
    ["create", "x", "--mode", "sometimes"],
    ["create", "x", "--map", "nokey"],
    ["nosuchcommand"],
])
def test_usage_mistakes_exit_2(runner, args):
    result = runner(*args)
    assert result.exit_code == 2
    assert error_line(result).startswith("Error: ")


# --- list, show ---


def test_list_empty_says_how_to_start(runner):
    result = runner("list")
    assert result.exit_code == 0
    assert result.stdout == "No webhooks yet: moxxy-webhooks create NAME --agent AGENT\n"
    assert json.loads(runner("list", "--json").stdout) == {"webhooks": []}


def test_list_table_and_json_never_show_secrets(runner):
    runner("create", "alpha", "--secret", "alpha-secret-123")
    runner("create", "beta", "--secret", "beta-secret-456", "--mode", "async")
    runner("disable", "beta")
    table = runner("list")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "AGENT", "MODE", "ENABLED", "CREATED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["alpha"][:4] == ["alpha", "default", "sync", "yes"]
    assert rows["beta"][:4] == ["beta", "default", "async", "no"]
    assert ISO.match(rows["alpha"][4])
    as_json = runner("list", "--json")
    doc = json.loads(as_json.stdout)
    assert [h["name"] for h in doc["webhooks"]] == ["alpha", "beta"]
    assert all(h["secret"] == "***" and h["has_secret"] is True for h in doc["webhooks"])
    for out in (table.output, as_json.output):
        assert "alpha-secret-123" not in out and "beta-secret-456" not in out


def test_show_redacts_the_secret(runner):
    runner("create", "one", "--secret", "show-me-not", "--template", "T {{x}}")
    result = runner("show", "one")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["secret"] == "***" and doc["name"] == "one"
    assert doc["transform"] == {"message_template": "T {{x}}"}
    assert "show-me-not" not in result.output
    missing = runner("show", "nope")
    assert missing.exit_code == 1 and error_line(missing) == "Error: unknown webhook 'nope'"


def test_show_never_reveals_previous_secrets(runner):
    runner("create", "rot", "--secret", "first-secret-xyz")
    runner("rotate", "rot")
    out = runner("show", "rot").output + runner("list", "--json").output
    assert "first-secret-xyz" not in out and "previous_secrets" not in out


# --- update, delete, enable, disable ---


def test_update_template_keeps_other_fields_and_created_at(runner):
    runner("create", "upd", "--secret", "keep-me", "--template", "Old {{x}}", "--map", "x=$.x",
           "--include", "*.critical", "--condition", "$.x != null", "--mode", "async")
    # pin created_at in the past by hand, so "kept" is distinguishable from "rewritten now"
    doc = read_doc(hooks_file(runner))
    doc["webhooks"]["upd"]["created_at"] = doc["webhooks"]["upd"]["updated_at"] = "2020-01-02T03:04:05Z"
    write_bytes(hooks_file(runner), json.dumps(doc).encode())
    before = stored(runner, "upd")

    result = runner("update", "upd", "--template", "New {{x}}")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Updated webhook 'upd'\n"
    after = stored(runner, "upd")
    assert after["transform"] == {"message_template": "New {{x}}", "context_mapping": {"x": "$.x"}}
    assert after["created_at"] == "2020-01-02T03:04:05Z"
    assert after["updated_at"] != "2020-01-02T03:04:05Z" and ISO.match(after["updated_at"])
    for key in ("secret", "filters", "response_mode", "agent"):
        assert after.get(key) == before.get(key), key


def test_update_unknown_and_invalid_are_refused_without_change(runner):
    missing = runner("update", "ghost", "--template", "x")
    assert missing.exit_code == 1 and error_line(missing) == "Error: unknown webhook 'ghost'"
    runner("create", "upd", "--secret", "s", "--template", "Fine {{x}}")
    before = read_bytes(hooks_file(runner))
    bad = runner("update", "upd", "--template", "Broken {{ x")
    assert bad.exit_code == 1
    assert error_line(bad) == "Error: transform.message_template: '{{' at position 8 is never closed with '}}'"
    assert read_bytes(hooks_file(runner)) == before


def test_update_from_json_replaces_the_config_but_keeps_secret_and_created_at(runner):
    runner("create", "upd", "--secret", "keep-me", "--template", "Old {{x}}", "--include", "*.critical")
    created = stored(runner, "upd")["created_at"]
    result = runner("update", "upd", "--from-json", "-", input=json.dumps({"response_mode": "async"}))
    assert result.exit_code == 0, result.output
    after = stored(runner, "upd")
    assert after["response_mode"] == "async" and after["secret"] == "keep-me" and after["created_at"] == created
    assert "transform" not in after and "filters" not in after  # --from-json replaces the whole config


def test_delete_removes_the_webhook(runner):
    runner("create", "gone", "--secret", "s")
    runner("create", "stays", "--secret", "s")
    result = runner("delete", "gone")
    assert result.exit_code == 0 and result.stdout == "Deleted webhook 'gone'\n"
    assert sorted(read_doc(hooks_file(runner))["webhooks"]) == ["stays"]
    again = runner("delete", "gone")
    assert again.exit_code == 1 and error_line(again) == "Error: unknown webhook 'gone'"


def test_disable_and_enable(runner):
    runner("create", "sw", "--secret", "s")
    result = runner("disable", "sw")
    assert result.exit_code == 0 and result.stdout == "Disabled webhook 'sw'\n"
    assert stored(runner, "sw")["enabled"] is False
    off = dry_run(runner, "sw", {"message": "hi"})
    assert off["filtered"] is True and off["reason"] == "disabled"
    result = runner("enable", "sw")
    assert result.exit_code == 0 and result.stdout == "Enabled webhook 'sw'\n"
    assert stored(runner, "sw")["enabled"] is True
    on = dry_run(runner, "sw", {"message": "hi"})
    assert on["filtered"] is False and on["message"] == "hi"
    for cmd in ("enable", "disable"):
        missing = runner(cmd, "ghost")
        assert missing.exit_code == 1 and error_line(missing) == "Error: unknown webhook 'ghost'"


# --- rotate ---


def _rotated_secret(result) -> str:
    m = re.match(r"New secret for '[^']+' \(shown once\): (\S+)\n", result.stdout)
    assert m, result.stdout
    return m.group(1)


def test_rotate_keeps_the_old_secret_valid_for_the_grace(runner):
    runner("create", "rot", "--secret", "old-secret-1")
    started = time.time()
    result = runner("rotate", "rot")
    assert result.exit_code == 0, result.output
    new = _rotated_secret(result)
    assert result.stdout.endswith("The old secret stays valid for 24 hours.\n")
    cfg = stored(runner, "rot")
    assert cfg["secret"] == new and new != "old-secret-1"
    [previous] = cfg["previous_secrets"]
    assert previous["secret"] == "old-secret-1"
    assert started + 24 * 3600 - 5 <= previous["expires_at"] <= time.time() + 24 * 3600 + 5
    # both secrets authenticate, by header and by GitHub signature; a wrong one does not
    wh = mw.compile_config(read_doc(hooks_file(runner))).webhooks["rot"]
    now = mw.clock()
    valid = wh.valid_secrets(now)
    body = b'{"zen": "x"}'
    for secret in ("old-secret-1", new):
        assert mw.authenticate(valid, ["header"], {"x-webhook-secret": secret}, body, now) == "header"
        sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert mw.authenticate(valid, ["github"], {"x-hub-signature-256": sig}, body, now) == "github"
    assert mw.authenticate(valid, ["header"], {"x-webhook-secret": "wrong"}, body, now) is None
    # after the grace, only the new one
    assert wh.valid_secrets(now + 24 * 3600 + 60) == [new]


def test_rotate_twice_keeps_both_previous_secrets(runner):
    runner("create", "rot", "--secret", "gen-1")
    second = _rotated_secret(runner("rotate", "rot"))
    third = _rotated_secret(runner("rotate", "rot"))
    cfg = stored(runner, "rot")
    assert cfg["secret"] == third
    assert [p["secret"] for p in cfg["previous_secrets"]] == ["gen-1", second]


def test_rotate_unknown_webhook(runner):
    runner("create", "other", "--secret", "s")
    result = runner("rotate", "ghost")
    assert result.exit_code == 1 and error_line(result) == "Error: unknown webhook 'ghost'"


@pytest.mark.parametrize("args, error", [
    (["rotate", "ghost"], "Error: unknown webhook 'ghost'"),
    (["enable", "ghost"], "Error: unknown webhook 'ghost'"),
    (["disable", "ghost"], "Error: unknown webhook 'ghost'"),
    (["delete", "ghost"], "Error: unknown webhook 'ghost'"),
    (["update", "ghost", "--template", "x"], "Error: unknown webhook 'ghost'"),
    (["agent", "remove", "ghost"], "Error: unknown agent 'ghost'"),
    (["vault", "delete", "ghost"], "Error: vault key 'ghost' is not set"),
])
def test_commands_on_a_fresh_data_dir_name_what_is_missing(runner, args, error):
    """Before anything was created the data dir does not exist: the error is about the object, not a lock file."""
    result = runner(*args)
    assert result.exit_code == 1
    assert error_line(result) == error


def test_rotate_against_a_running_gateway(gateway):
    g = gateway()
    assert cli_at(g.paths.root, "create", "rot", "--secret", "old-secret").exit_code == 0

    def call(secret):
        return g.request("POST", "/api/webhooks/rot", {"message": "ping me"}, {"X-Webhook-Secret": secret})

    assert call("old-secret")[0] == 200
    new = _rotated_secret(cli_at(g.paths.root, "rotate", "rot"))
    status, _, body = call("old-secret")
    assert status == 200 and body["response"] == "ping me"
    assert call(new)[0] == 200
    assert call("not-the-secret")[0] == 401
    # with no grace the old secret stops working at once
    newer = _rotated_secret(cli_at(g.paths.root, "rotate", "rot", "--grace", "0"))
    assert call(new)[0] == 401
    assert call(newer)[0] == 200
    assert call("old-secret")[0] == 200  # still inside the first rotation's 24 h


# --- test (dry run) ---


def test_dry_run_from_file_and_stdin(runner, tmp_path):
    runner("create", "dr", "--secret", "s", "--template", "{{sev | upper}}: {{text}}", "--map", "sev=$.severity",
           "--include", "*.critical")
    payload = {"severity": "critical", "text": "disk full"}
    path = tmp_path / "payload.json"
    path.write_text(json.dumps(payload))
    from_file = runner("test", "dr", str(path))
    assert from_file.exit_code == 0, from_file.output
    doc = json.loads(from_file.stdout)
    assert doc == {"webhook": "dr", "agent": "default", "event_type": "", "event": "dr.critical",
                   "context": {"sev": "critical"}, "filtered": False, "reason": "passes every filter",
                   "message": "CRITICAL: disk full"}
    assert dry_run(runner, "dr", payload) == doc  # stdin
    low = dry_run(runner, "dr", {"severity": "info", "text": "x"})
    assert low["filtered"] is True and low["event"] == "dr.info"
    assert low["reason"] == "event 'dr.info' matches no include pattern (*.critical)"


def test_dry_run_header_sets_the_event_name(runner):
    runner("create", "gh", "--secret", "s")
    payload = {"action": "opened", "number": 7}
    plain = dry_run(runner, "gh", payload)
    assert plain["event_type"] == "" and plain["event"] == "gh.opened"
    with_header = dry_run(runner, "gh", payload, "-H", "X-GitHub-Event: pull_request")
    assert with_header["event_type"] == "pull_request" and with_header["event"] == "pull_request.opened"
    push = dry_run(runner, "gh", {"ref": "refs/heads/main"}, "-H", "X-GitHub-Event: push")
    assert push["event_type"] == "push" and push["event"] == "push"
    bad = runner("test", "gh", "-H", "no-colon", input="{}")
    assert bad.exit_code == 2 and error_line(bad) == "Error: --header takes NAME:VALUE, not 'no-colon'"


def test_dry_run_errors(runner):
    missing = runner("test", "ghost", input="{}")
    assert missing.exit_code == 1 and error_line(missing) == "Error: unknown webhook 'ghost'"
    runner("create", "dr", "--secret", "s")
    bad = runner("test", "dr", input="{bad")
    assert bad.exit_code == 1
    assert error_line(bad) == ("Error: the body is not valid JSON: Expecting property name enclosed in double quotes "
                               "at line 1 column 2")
    array = runner("test", "dr", input="[1]")
    assert array.exit_code == 1 and error_line(array) == "Error: the body must be a JSON object, not an array"
    empty = runner("test", "dr", input="")
    assert empty.exit_code == 0 and json.loads(empty.stdout)["message"] == "{}"  # an empty body is {}


def test_dry_run_does_not_call_the_agent(runner, tmp_path):
    marker = tmp_path / "agent-ran"
    code = "import sys; open(sys.argv[1], 'w').write('ran')"
    runner("agent", "add", "touch", "--command", shlex.join([PY, "-c", code, str(marker)]))
    runner("create", "quiet", "--agent", "touch", "--secret", "s")
    doc = dry_run(runner, "quiet", {"message": "hi"})
    assert doc["agent"] == "touch" and doc["message"] == "hi" and doc["filtered"] is False
    assert not marker.exists()


def test_dry_run_of_a_split_webhook_lists_each_item(runner):
    cfg = {"secret": "s", "transform": {"split": "$.alerts[*]", "message_template": "{{labels.alertname}} is {{status}}"}}
    runner("create", "am", "--from-json", "-", input=json.dumps(cfg))
    payload = {"alerts": [{"status": "firing", "labels": {"alertname": "HighCPU"}},
                          {"status": "resolved", "labels": {"alertname": "DiskFull"}}]}
    doc = dry_run(runner, "am", payload)
    assert [item["message"] for item in doc["items"]] == ["HighCPU is firing", "DiskFull is resolved"]
    assert [item["event"] for item in doc["items"]] == ["am.firing", "am.resolved"]


def test_dry_run_matches_the_servers_dry_run(gateway):
    g = gateway()
    cli_at(g.paths.root, "create", "same", "--secret", "s", "--template", "{{a}}/{{b.c}}", "--map", "a=$.a",
           "--exclude", "*.debug")
    payload = {"a": 1, "b": {"c": [1, 2]}, "status": "firing"}
    cli = json.loads(cli_at(g.paths.root, "test", "same", "-H", "X-Event-Type: alert", input=json.dumps(payload)).stdout)
    status, _, server = g.request("POST", "/api/webhooks/same/trigger?dry_run=1", payload,
                                  {"X-Webhook-Secret": "s", "X-Event-Type": "alert"})
    assert status == 200
    assert {k: server[k] for k in cli} == cli
    assert cli["message"] == "1/[1,2]" and cli["event"] == "alert.firing"


# --- check ---


def test_check_ok_on_a_good_dir(runner):
    runner("create", "a", "--secret", "s")
    runner("agent", "add", "e", "--echo")
    runner("vault", "set", "webhook_allowed_ips", "10.0.0.0/8,::1")
    result = runner("check")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok: {runner.data_dir} (1 webhooks, 2 agents)\n"


def test_check_lists_every_problem(runner, monkeypatch):
    monkeypatch.delenv("MISSING_VAR_X", raising=False)
    doc = {"version": 1,
           "agents": {"gone": {"kind": "command", "argv": ["definitely-not-a-command-xyz"]}},
           "webhooks": {"w1": {"agent": "ghost", "secret": "s"},
                        "w2": {"secret": "s", "transform": {"message_template": "Hi {{ name"}},
                        "w3": {"secret": "s", "filters": {"condition": "$.a =="}},
                        "fine": {"secret": "s"}}}
    write_bytes(hooks_file(runner), json.dumps(doc).encode())
    write_bytes(vault_file(runner), json.dumps({"ref": "${env:MISSING_VAR_X}", "plain": "v"}).encode())
    before = read_bytes(hooks_file(runner))
    result = runner("check")
    assert result.exit_code == 1
    assert "ok:" not in result.stdout
    assert problems(result) == sorted([
        "problem: agent 'gone': command 'definitely-not-a-command-xyz' is not on PATH",
        "problem: webhook 'w1': agent: unknown agent 'ghost' (add it with 'moxxy-webhooks agent add')",
        "problem: webhook 'w2': transform.message_template: '{{' at position 4 is never closed with '}}'",
        "problem: webhook 'w3': filters.condition: expected a value (a $path, 'string', number, true, false, "
        "null or [list]) at position 7, found the end",
        "problem: vault key 'ref': ${env:MISSING_VAR_X} does not resolve",
    ])
    assert read_bytes(hooks_file(runner)) == before


def test_check_reports_an_agent_reference_that_does_not_resolve(runner, monkeypatch):
    monkeypatch.delenv("MISSING_KEY_Y", raising=False)
    runner("agent", "add", "llm", "--openai", "http://127.0.0.1:11434/v1", "--model", "m",
           "--api-key", "${env:MISSING_KEY_Y}")
    result = runner("check")
    assert result.exit_code == 1
    [problem] = problems(result)
    assert problem.startswith("problem: agent 'llm': ") and "${env:MISSING_KEY_Y}" in problem


def test_check_reports_a_corrupt_file_and_still_checks_the_vault(runner, monkeypatch):
    monkeypatch.delenv("MISSING_VAR_X", raising=False)
    write_bytes(hooks_file(runner), CORRUPT_WEBHOOKS)
    write_bytes(vault_file(runner), json.dumps({"ref": "${env:MISSING_VAR_X}"}).encode())
    result = runner("check")
    assert result.exit_code == 1
    assert problems(result) == sorted([
        f"problem: {hooks_file(runner)}:1:29: Expecting property name enclosed in double quotes",
        "problem: vault key 'ref': ${env:MISSING_VAR_X} does not resolve",
    ])


@pytest.mark.parametrize("doc", [
    {"version": 2, "webhooks": {}},
    {"version": 1, "webhooks": []},
    {"version": 1, "webhooks": "nope"},
    {"version": 1, "webhooks": {}, "extra": True},
], ids=["version-2", "webhooks-list", "webhooks-string", "unknown-top-level-key"])
def test_check_refuses_what_the_server_refuses(runner, doc):
    """check must not say ok about a webhooks.json that list and serve refuse (SPEC 2, 13)."""
    write_bytes(hooks_file(runner), json.dumps(doc).encode())
    listed = runner("list")
    assert listed.exit_code == 1 and hooks_file(runner) in error_line(listed)  # the server side refuses it
    result = CliRunner().invoke(mw.cli, ["--data-dir", runner.data_dir, "check"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    assert any(hooks_file(runner) in p for p in problems(result)), result.output


def test_check_reports_a_bad_vault_value(runner):
    write_bytes(vault_file(runner), json.dumps({"webhook_allowed_ips": "10.0.0.0/8,bogus", "n": "x"}).encode())
    result = runner("check")
    assert result.exit_code == 1
    assert problems(result) == ["problem: webhook_allowed_ips[1]: 'bogus' is not an IP address or CIDR"]


# --- vault ---


def test_vault_set_get_list_delete(runner):
    assert runner("vault", "set", "slack_bot_token", "xoxb-123").stdout == "Set slack_bot_token\n"
    got = runner("vault", "get", "slack_bot_token")
    assert got.exit_code == 0 and got.stdout == "xoxb-123\n"
    runner("vault", "set", "admin_token", "adm-456")
    listed = runner("vault", "list")
    assert listed.exit_code == 0 and listed.stdout == "admin_token\nslack_bot_token\n"
    assert read_doc(vault_file(runner)) == {"slack_bot_token": "xoxb-123", "admin_token": "adm-456"}
    deleted = runner("vault", "delete", "slack_bot_token")
    assert deleted.exit_code == 0 and deleted.stdout == "Deleted slack_bot_token\n"
    assert runner("vault", "list").stdout == "admin_token\n"
    again = runner("vault", "delete", "slack_bot_token")
    assert again.exit_code == 1 and error_line(again) == "Error: vault key 'slack_bot_token' is not set"
    missing = runner("vault", "get", "slack_bot_token")
    assert missing.exit_code == 1 and error_line(missing) == "Error: vault key 'slack_bot_token' is not set"


def test_vault_set_reads_stdin(runner):
    result = runner("vault", "set", "webhook_secret", "-", input="from-stdin-secret\n")
    assert result.exit_code == 0
    assert read_doc(vault_file(runner))["webhook_secret"] == "from-stdin-secret"
    assert runner("vault", "get", "webhook_secret").stdout == "from-stdin-secret\n"


def test_vault_get_prints_references_unresolved(runner, monkeypatch):
    monkeypatch.setenv("MOXXY_TEST_TOKEN", "resolved-value")
    runner("vault", "set", "telegram_bot_token", "${env:MOXXY_TEST_TOKEN}")
    result = runner("vault", "get", "telegram_bot_token")
    assert result.exit_code == 0 and result.stdout == "${env:MOXXY_TEST_TOKEN}\n"
    assert mw.Vault(vault_file(runner)).get("telegram_bot_token") == "resolved-value"


def test_vault_list_prints_keys_only(runner):
    runner("vault", "set", "k1", "value-one-zzz")
    runner("vault", "set", "k2", "value-two-zzz")
    result = runner("vault", "list")
    assert result.stdout.split() == ["k1", "k2"]
    assert "zzz" not in result.output


def test_vault_refuses_a_bad_allowlist(runner):
    result = runner("vault", "set", "webhook_allowed_ips", "not-an-ip")
    assert result.exit_code == 1
    assert error_line(result) == "Error: webhook_allowed_ips[0]: 'not-an-ip' is not an IP address or CIDR"
    assert not os.path.exists(vault_file(runner)) or "webhook_allowed_ips" not in read_doc(vault_file(runner))
    ok = runner("vault", "set", "webhook_allowed_ips", "192.168.1.0/24, 10.0.0.1, 2001:db8::/32")
    assert ok.exit_code == 0
    assert runner("vault", "get", "webhook_allowed_ips").stdout == "192.168.1.0/24, 10.0.0.1, 2001:db8::/32\n"


def test_vault_list_on_an_empty_dir(runner):
    result = runner("vault", "list")
    assert result.exit_code == 0 and result.stdout == ""


# --- agents ---


def agents_in(run) -> dict:
    return read_doc(hooks_file(run)).get("agents", {})


def test_agent_add_command_is_split_like_a_shell(runner):
    result = runner("agent", "add", "py", "--command", 'python3 -c "print(1)" {message}')
    assert result.exit_code == 0 and result.stdout == "Added command agent 'py'\n"
    cfg = agents_in(runner)["py"]
    assert cfg["kind"] == "command"
    assert cfg["argv"] == ["python3", "-c", "print(1)", "{message}"]
    assert cfg.get("generic", False) is False  # command agents are off the generic route unless --generic


def test_agent_add_url_openai_echo(runner):
    assert runner("agent", "add", "web", "--url", "http://127.0.0.1:17891/api/agents/ops/chat").exit_code == 0
    assert runner("agent", "add", "llm", "--openai", "http://127.0.0.1:11434/v1", "--model", "llama3.1",
                  "--api-key", "sk-very-secret").exit_code == 0
    assert runner("agent", "add", "ec", "--echo").exit_code == 0
    agents = agents_in(runner)
    assert agents["web"] == {"kind": "http", "url": "http://127.0.0.1:17891/api/agents/ops/chat"}
    assert agents["llm"]["kind"] == "openai" and agents["llm"]["base_url"] == "http://127.0.0.1:11434/v1"
    assert agents["llm"]["model"] == "llama3.1"
    assert agents["ec"] == {"kind": "echo"}


@pytest.mark.parametrize("args", [
    [],
    ["--echo", "--url", "http://127.0.0.1:1/x"],
    ["--command", "true", "--openai", "http://127.0.0.1:1/v1", "--model", "m"],
])
def test_agent_add_needs_exactly_one_kind(runner, args):
    result = runner("agent", "add", "x", *args)
    assert result.exit_code == 2
    assert error_line(result) == "Error: give exactly one of --command, --url, --openai or --echo"
    assert not os.path.exists(hooks_file(runner)) or "x" not in agents_in(runner)


def test_agent_add_errors(runner):
    no_model = runner("agent", "add", "llm", "--openai", "http://127.0.0.1:1/v1")
    assert no_model.exit_code == 2 and error_line(no_model) == "Error: --openai needs --model"
    bad_url = runner("agent", "add", "web", "--url", "ftp://example.com/x")
    assert bad_url.exit_code == 1 and error_line(bad_url) == "Error: url: must be an http:// or https:// URL"
    runner("agent", "add", "ec", "--echo")
    dup = runner("agent", "add", "ec", "--echo")
    assert dup.exit_code == 1 and error_line(dup) == "Error: agent 'ec' already exists"
    replaced = runner("agent", "add", "ec", "--url", "http://127.0.0.1:9/x", "--replace")
    assert replaced.exit_code == 0 and agents_in(runner)["ec"]["kind"] == "http"


def test_agent_list_table_and_json_hide_api_keys(runner):
    runner("agent", "add", "py", "--command", "python3 -c 'print(1)'")
    runner("agent", "add", "llm", "--openai", "http://127.0.0.1:11434/v1", "--model", "m",
           "--api-key", "sk-very-secret", "--header", "X-Token: hdr-very-secret")
    table = runner("agent", "list")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "TARGET"]
    rows = {line.split()[0]: line.split(None, 2) for line in lines[1:]}
    assert rows["default"][1] == "echo"
    assert rows["py"][1:] == ["command", "python3 -c 'print(1)'"]
    assert rows["llm"][1:] == ["openai", "http://127.0.0.1:11434/v1"]
    as_json = runner("agent", "list", "--json")
    names = [a["name"] for a in json.loads(as_json.stdout)["agents"]]
    assert names == ["default", "py", "llm"]
    for out in (table.output, as_json.output):
        assert "sk-very-secret" not in out and "hdr-very-secret" not in out


def test_agent_add_default_replaces_the_builtin_echo(runner):
    result = runner("agent", "add", "default", "--url", "http://127.0.0.1:17891/api/agents/ops/chat")
    assert result.exit_code == 0, result.output
    agents = json.loads(runner("agent", "list", "--json").stdout)["agents"]
    assert [(a["name"], a["kind"]) for a in agents] == [("default", "http")]


def test_agent_remove_refused_while_used(runner):
    runner("agent", "add", "ops", "--echo")
    runner("create", "uses-ops", "--agent", "ops", "--secret", "s")
    runner("create", "also-ops", "--agent", "ops", "--secret", "s")
    refused = runner("agent", "remove", "ops")
    assert refused.exit_code == 1
    assert error_line(refused) == ("Error: agent 'ops' is used by webhook(s) also-ops, uses-ops: "
                                   "change or delete them first")
    assert "ops" in agents_in(runner)
    runner("delete", "uses-ops")
    runner("delete", "also-ops")
    removed = runner("agent", "remove", "ops")
    assert removed.exit_code == 0 and removed.stdout == "Removed agent 'ops'\n"
    assert "ops" not in agents_in(runner)
    missing = runner("agent", "remove", "ops")
    assert missing.exit_code == 1 and error_line(missing) == "Error: unknown agent 'ops'"


def test_cli_command_agent_runs_on_a_running_gateway(gateway):
    g = gateway()
    command = shlex.join([PY, "-c", "import sys; print(sys.argv[1].upper())", "{message}"])
    assert cli_at(g.paths.root, "agent", "add", "upper", "--command", command).exit_code == 0
    assert cli_at(g.paths.root, "create", "shout", "--agent", "upper", "--secret", "s").exit_code == 0
    status, _, body = g.request("POST", "/api/webhooks/shout", {"message": "hello there"}, {"X-Webhook-Secret": "s"})
    assert status == 200 and body["response"] == "HELLO THERE"


# --- files ---


def test_data_dir_is_0700_and_files_0600(runner):
    runner("create", "a", "--secret", "s")
    runner("vault", "set", "k", "v")
    runner("rotate", "a")  # a rewrite keeps the mode
    assert stat.S_IMODE(os.stat(runner.data_dir).st_mode) == 0o700
    for name in ("webhooks.json", "vault.json"):
        assert stat.S_IMODE(os.stat(os.path.join(runner.data_dir, name)).st_mode) == 0o600, name
    for name in os.listdir(runner.data_dir):
        assert stat.S_IMODE(os.stat(os.path.join(runner.data_dir, name)).st_mode) == 0o600, name


def test_server_files_are_0600(gw):
    assert gw.generic({"message": "hi"})[0] == 200
    files = os.listdir(gw.paths.root)
    assert "deliveries.db" in files
    for name in files:
        assert stat.S_IMODE(os.stat(os.path.join(gw.paths.root, name)).st_mode) == 0o600, name


@pytest.mark.parametrize("args, stdin", [
    (["create", "a", "--secret", "s"], None),
    (["list"], None),
    (["list", "--json"], None),
    (["show", "a"], None),
    (["update", "a", "--template", "x"], None),
    (["delete", "a"], None),
    (["disable", "a"], None),
    (["rotate", "a"], None),
    (["test", "a"], "{}"),
    (["agent", "add", "e", "--echo"], None),
    (["agent", "list"], None),
    (["agent", "remove", "e"], None),
])
def test_corrupt_webhooks_json_is_named_and_left_alone(runner, args, stdin):
    write_bytes(hooks_file(runner), CORRUPT_WEBHOOKS)
    result = runner(*args, input=stdin)
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: {hooks_file(runner)}:1:29: Expecting property name enclosed in double quotes "
                                  "(fix the file; it was not changed)")
    assert read_bytes(hooks_file(runner)) == CORRUPT_WEBHOOKS


@pytest.mark.parametrize("args, stdin", [
    (["vault", "set", "x", "y"], None),
    (["vault", "set", "x", "-"], "y\n"),
    (["vault", "get", "k"], None),
    (["vault", "list"], None),
    (["vault", "delete", "k"], None),
])
def test_corrupt_vault_json_is_named_and_left_alone(runner, args, stdin):
    write_bytes(vault_file(runner), CORRUPT_VAULT)
    result = runner(*args, input=stdin)
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: {vault_file(runner)}:1:7: Expecting value (fix the file; it was not changed)")
    assert read_bytes(vault_file(runner)) == CORRUPT_VAULT


@pytest.mark.parametrize("file, content, message", [
    ("webhooks.json", CORRUPT_WEBHOOKS, "{path}:1:29: Expecting property name enclosed in double quotes"),
    ("vault.json", CORRUPT_VAULT, "{path}:1:7: Expecting value"),
    ("webhooks.json", b'{"version": 1, "webhooks": {"w": {"agent": "ghost", "secret": "s"}}}',
     "{path}: webhooks.w: agent: unknown agent 'ghost' (add it with 'moxxy-webhooks agent add')"),
])
def test_serve_refuses_a_bad_data_file_before_binding(runner, restore_logging, file, content, message):
    path = os.path.join(runner.data_dir, file)
    write_bytes(path, content)
    result = runner("serve", "--port", "0")
    assert result.exit_code == 1
    assert error_line(result) == "Error: " + message.format(path=path) + " (fix the file; it was not changed)"
    assert "listening on" not in result.output
    assert not os.path.exists(os.path.join(runner.data_dir, "server.json"))
    assert read_bytes(path) == content


@pytest.mark.parametrize("args, error", [
    (["--rate-limit", "lots"], "Error: rate must look like 20/s, 600/m or off, not 'lots'"),
    (["--trusted-proxy", "nope"], "Error: --trusted-proxy[0]: 'nope' is not an IP address or CIDR"),
    (["--workers", "0"], "Error: Invalid value for '--workers': 0 is not in the range 1<=x<=256."),
])
def test_serve_usage_mistakes_exit_2(runner, restore_logging, args, error):
    result = runner("serve", "--port", "0", *args)
    assert result.exit_code == 2
    assert error_line(result) == error
    assert not os.path.exists(os.path.join(runner.data_dir, "server.json"))


def test_serve_port_0_prints_the_url_and_send_finds_it(tmp_path):
    data = str(tmp_path / "served")
    proc = subprocess.Popen([PY, MODULE, "--data-dir", data, "serve", "--port", "0", "--grace", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer = threading.Timer(20, proc.kill)  # a hung server fails the test instead of hanging it
    killer.start()
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "listening on" in line:
                break
        banner = "".join(seen)
        assert "moxxy-webhooks vault get webhook_secret" in banner  # first start says how to read the secrets
        m = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", banner)
        assert m and int(m.group(2)) != 0, banner
        sent = cli_at(data, "send", "hello from the cli")  # no --url: found through the running server
        assert sent.exit_code == 0 and sent.stdout == "hello from the cli\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
        killer.cancel()
    assert proc.returncode == 0
    assert not os.path.exists(os.path.join(data, "server.json"))


def test_data_dir_from_environment(tmp_path):
    data = str(tmp_path / "from-env")
    result = CliRunner(env={"MOXXY_WEBHOOKS_HOME": data}).invoke(mw.cli, ["create", "envhook", "--secret", "s"],
                                                                 catch_exceptions=False)
    assert result.exit_code == 0
    assert "envhook" in read_doc(os.path.join(data, "webhooks.json"))["webhooks"]


# --- concurrency ---


def _open_for_writing(fifo: str, procs: list) -> "io.TextIOWrapper":
    """Open a FIFO for writing: returns once the CLI process has opened it for reading (past its start-up).

    If a process dies before that, a watchdog opens the reading end itself so the test fails instead of hanging.
    """
    def unblock():
        for proc in procs:
            proc.kill()
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))

    watchdog = threading.Timer(30, unblock)
    watchdog.start()
    try:
        return open(fifo, "w")
    finally:
        watchdog.cancel()


def test_concurrent_creates_from_two_processes_all_survive(tmp_path):
    """Two real CLI processes create different webhooks at the same moment; both survive (SPEC 2: flock + re-read).

    ``--from-json FIFO`` is the starting gate: each process blocks reading its FIFO once it has started up, and
    both are released together, so every pair really writes at once (without the lock, about half the webhooks
    of such pairs are lost; with plain start-together, start-up jitter hides the race most of the time).
    """
    data = str(tmp_path / "race")
    names = []
    for i in range(3):
        pair = [f"race-{i}-{side}" for side in "ab"]
        fifos = [str(tmp_path / f"gate-{name}") for name in pair]
        procs = []
        for name, fifo in zip(pair, fifos):
            os.mkfifo(fifo)
            procs.append(subprocess.Popen([PY, MODULE, "--data-dir", data, "create", name, "--secret", "s",
                                           "--from-json", fifo], stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        gates = [_open_for_writing(fifo, procs) for fifo in fifos]  # both processes are now waiting
        for gate in gates:
            gate.write("{}")
        for gate in gates:
            gate.close()  # EOF: both go
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
        names += pair
    doc = read_doc(os.path.join(data, "webhooks.json"))
    assert sorted(doc["webhooks"]) == sorted(names)
    assert all(cfg["secret"] == "s" for cfg in doc["webhooks"].values())


# --- deliveries and send ---


def test_deliveries_on_an_empty_dir_prints_only_the_header(runner):
    result = runner("deliveries")
    assert result.exit_code == 0
    assert result.stdout == "ID  WEBHOOK  AGENT  STATUS  TRIES  CREATED  RESULT\n"
    as_json = runner("deliveries", "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == {"deliveries": []}


def test_deliveries_list_and_retry_a_failed_delivery(gateway, tmp_path):
    g = gateway(max_attempts=1)
    root = g.paths.root
    url = f"http://127.0.0.1:{g.port}"
    marker = str(tmp_path / "ran-once")
    # fails the first time, answers the second time
    code = ("import os, sys; p = sys.argv[1]; seen = os.path.exists(p); open(p, 'a').close(); "
            "print('second try') if seen else sys.exit('first try fails')")
    assert cli_at(root, "agent", "add", "flaky", "--command", shlex.join([PY, "-c", code, marker])).exit_code == 0
    assert cli_at(root, "create", "flaky-hook", "--agent", "flaky", "--mode", "async", "--secret", "s").exit_code == 0
    status, _, body = g.request("POST", "/api/webhooks/flaky-hook", {"message": "go"}, {"X-Webhook-Secret": "s"})
    assert status == 202
    delivery_id = body["delivery_id"]
    status, _, record = g.admin_call("GET", f"/api/deliveries/{delivery_id}?wait=15")
    assert record["status"] == "failed" and record["attempts"] == 1

    table = cli_at(root, "deliveries")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "WEBHOOK", "AGENT", "STATUS", "TRIES", "CREATED", "RESULT"]
    row = next(line.split() for line in lines[1:] if line.startswith(delivery_id))
    assert row[1:5] == ["flaky-hook", "flaky", "failed", "1"]
    as_json = json.loads(cli_at(root, "deliveries", "--json").stdout)["deliveries"]
    assert [(d["id"], d["status"]) for d in as_json] == [(delivery_id, "failed")]
    assert json.loads(cli_at(root, "deliveries", "--status", "succeeded", "--json").stdout) == {"deliveries": []}
    assert json.loads(cli_at(root, "deliveries", "--webhook", "other", "--json").stdout) == {"deliveries": []}

    retried = cli_at(root, "deliveries", "retry", delivery_id, "--url", url)
    assert retried.exit_code == 0, retried.output
    assert retried.stdout == f"Queued delivery {delivery_id} again\n"
    status, _, record = g.admin_call("GET", f"/api/deliveries/{delivery_id}?wait=15")
    assert record["status"] == "succeeded" and record["response"] == "second try"

    again = cli_at(root, "deliveries", "retry", delivery_id, "--url", url)
    assert again.exit_code == 1
    assert error_line(again) == (f"Error: delivery '{delivery_id}' is succeeded: only failed deliveries can be replayed")
    unknown = cli_at(root, "deliveries", "retry", "0" * 32, "--url", url)
    assert unknown.exit_code == 1 and error_line(unknown) == f"Error: unknown delivery '{'0' * 32}'"


def test_send_prints_the_echo_answer(gw):
    url = f"http://127.0.0.1:{gw.port}"
    result = cli_at(gw.paths.root, "send", "Hello from send", "--url", url)
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello from send\n"
    queued = cli_at(gw.paths.root, "send", "later", "--async", "--url", url)
    assert queued.exit_code == 0
    doc = json.loads(queued.stdout)
    assert doc["status"] == "queued" and len(doc["delivery_id"]) == 32
    status, _, record = gw.admin_call("GET", f"/api/deliveries/{doc['delivery_id']}?wait=10")
    assert record["status"] == "succeeded" and record["response"] == "later"
    ghost = cli_at(gw.paths.root, "send", "hi", "--agent", "ghost", "--url", url)
    assert ghost.exit_code == 1 and error_line(ghost) == "Error: HTTP 404: unknown agent 'ghost'"
    bad_context = cli_at(gw.paths.root, "send", "hi", "--context", "{nope", "--url", url)
    assert bad_context.exit_code == 2 and error_line(bad_context).startswith("Error: --context is not valid JSON")


def test_send_without_a_server_exits_1_with_a_clear_message(runner):
    runner("vault", "set", "webhook_secret", "s")
    with socket.socket() as sock:  # bound but not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = runner("send", "hi", "--url", f"http://127.0.0.1:{port}")
    assert result.exit_code == 1
    line = error_line(result)
    assert line.startswith("Error: cannot reach 127.0.0.1: ")
    assert line.endswith("(is the server running? moxxy-webhooks serve)")
    assert "Traceback" not in result.output


def test_deliveries_retry_without_a_server(runner):
    runner("vault", "set", "admin_token", "t")
    with socket.socket() as sock:  # bound but not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        result = runner("deliveries", "retry", "abc", "--url", f"http://127.0.0.1:{sock.getsockname()[1]}")
    assert result.exit_code == 1
    assert error_line(result).startswith("Error: cannot reach 127.0.0.1: ")
    assert error_line(result).endswith("(is the server running?)")


def test_send_without_a_secret(runner):
    result = runner("send", "hi", "--url", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert error_line(result) == ("Error: webhook_secret is not set: start the server once, "
                                  "or moxxy-webhooks vault set webhook_secret ...")


# --- version and help ---


def test_version(runner):
    result = runner("--version")
    assert result.exit_code == 0 and result.stdout == f"moxxy-webhooks, version {mw.__version__}\n"


@pytest.mark.parametrize("args, expected", [
    (["--help"], ["serve", "create", "list", "show", "update", "delete", "enable", "disable", "rotate", "test",
                  "check", "send", "agent", "vault", "deliveries"]),
    (["create", "--help"], ["--agent", "--secret", "--template", "--map", "--include", "--exclude", "--condition",
                            "--mode", "--from-json", "--allowed-ip", "--auth"]),
    (["serve", "-h"], ["--port", "--host", "--workers", "--retry-base"]),
    (["vault", "set", "--help"], ["KEY", "VALUE", "stdin"]),
    (["agent", "add", "--help"], ["--command", "--url", "--openai", "--model", "--echo"]),
    (["deliveries", "--help"], ["--webhook", "--status", "--json", "retry"]),
])
def test_help(runner, args, expected):
    result = runner(*args)
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: ")
    for word in expected:
        assert word in result.stdout, word
