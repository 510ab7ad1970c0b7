from test_moxxy_webhooks import *  # noqa: I001  (the main file's helpers and fixtures; drop at merge)

import base64
import hashlib
import hmac
import json

import pytest
from cryptography.hazmat.primitives import serialization as _serialization  # a test dependency (extra "test")
from cryptography.hazmat.primitives.asymmetric import ed25519

import moxxy_webhooks as mw

# The star import also brings the main file's own tests: do not collect them a second time here (drop at merge).
for _name in [n for n in globals() if n.startswith("test_")]:
    del globals()[_name]


# === Pure parts: security (signatures, authentication, allowlists, rate limits) ===

GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SHA256 = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
GITHUB_SHA1 = "sha1=01dc10d0c83e72ed246219cdd91669667fe2ca59"


def _gh256(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("secret, body, sig256, sig1, ok", [
    (GITHUB_SECRET, GITHUB_BODY, GITHUB_SHA256, None, True),
    (GITHUB_SECRET, GITHUB_BODY, None, GITHUB_SHA1, True),
    (GITHUB_SECRET, GITHUB_BODY, GITHUB_SHA256, "sha1=" + "0" * 40, True),
    (GITHUB_SECRET, GITHUB_BODY, "sha256=" + GITHUB_SHA256[7:].upper(), None, True),  # hex is case-insensitive
    (GITHUB_SECRET, GITHUB_BODY, GITHUB_SHA256.upper(), None, False),  # the prefix is not
    (GITHUB_SECRET, GITHUB_BODY, GITHUB_SHA256[:-1], None, False),
    (GITHUB_SECRET, GITHUB_BODY, GITHUB_SHA256[:20], None, False),
    (GITHUB_SECRET, GITHUB_BODY, GITHUB_SHA256 + "00", None, False),
    (GITHUB_SECRET, GITHUB_BODY, "sha1=" + GITHUB_SHA256[7:], None, False),
    (GITHUB_SECRET, GITHUB_BODY, GITHUB_SHA256[7:], None, False),  # no prefix at all
    (GITHUB_SECRET, GITHUB_BODY, None, "sha256=" + GITHUB_SHA1[5:], False),
    (GITHUB_SECRET, GITHUB_BODY, None, GITHUB_SHA1[5:], False),
    (GITHUB_SECRET, GITHUB_BODY, "", "", False),
    (GITHUB_SECRET, GITHUB_BODY, None, None, False),
    (GITHUB_SECRET, GITHUB_BODY, "sha256=", None, False),
    (GITHUB_SECRET, b"Hello, World?", GITHUB_SHA256, GITHUB_SHA1, False),
    (GITHUB_SECRET, GITHUB_BODY + b"\n", GITHUB_SHA256, None, False),
    (GITHUB_SECRET + " ", GITHUB_BODY, GITHUB_SHA256, None, False),
    ("", GITHUB_BODY, _gh256("", GITHUB_BODY), None, False),  # an empty secret never verifies
    ("s3cret", "héllo ✓ 日本".encode(), _gh256("s3cret", "héllo ✓ 日本".encode()), None, True),
    ("s3cret", "héllo ✓ 日本".encode(), _gh256("s3cret", "hello ✓ 日本".encode()), None, False),
    ("sécret ✓", b"{}", _gh256("sécret ✓", b"{}"), None, True),
], ids=["vector-sha256", "vector-sha1", "sha256-wins-over-bad-sha1", "uppercase-hex", "uppercase-prefix",
        "truncated-1", "truncated-half", "extra-hex", "sha1-prefix-on-sha256", "no-prefix", "sha256-prefix-on-sha1",
        "sha1-no-prefix", "empty-headers", "no-headers", "prefix-only", "changed-body-byte", "extra-newline",
        "wrong-secret", "empty-secret", "unicode-body", "unicode-body-changed", "unicode-secret"])
def test_verify_github_signature(secret, body, sig256, sig1, ok):
    assert mw.verify_github_signature(secret, body, sig256, sig1) is ok


STD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
STD_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
STD_TS = 1614265330
STD_BODY = b'{"test": 2432232314}'
STD_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
STD_BAD = STD_SIG[:-2] + "A="


@pytest.mark.parametrize("secret, msg_id, ts, body, signature, now, ok", [
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, STD_SIG, STD_TS, True),
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, STD_BAD, STD_TS, False),
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, f"v1,bm90IGl0 {STD_SIG}", STD_TS, True),
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, f"{STD_SIG} {STD_BAD}", STD_TS, True),
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, f"v2,xyz v1a,abc {STD_SIG}", STD_TS, True),
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, "v2," + STD_SIG[3:], STD_TS, False),  # unknown version skipped
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, STD_SIG[3:], STD_TS, False),  # no version
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, f"{STD_BAD} v1,", STD_TS, False),
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, "", STD_TS, False),
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, None, STD_TS, False),
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, STD_SIG, STD_TS + 299, True),
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, STD_SIG, STD_TS - 299, True),
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, STD_SIG, STD_TS + 301, False),  # too old
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY, STD_SIG, STD_TS - 301, False),  # from the future
    (STD_SECRET, STD_ID, str(STD_TS + 1), STD_BODY, STD_SIG, STD_TS, False),  # timestamp is signed
    (STD_SECRET, STD_ID + "x", str(STD_TS), STD_BODY, STD_SIG, STD_TS, False),  # id is signed
    (STD_SECRET, STD_ID, str(STD_TS), STD_BODY[:-1] + b"5}", STD_SIG, STD_TS, False),
    (STD_SECRET, STD_ID, "not-a-number", STD_BODY, STD_SIG, STD_TS, False),
    (STD_SECRET, None, str(STD_TS), STD_BODY, STD_SIG, STD_TS, False),
    (STD_SECRET, STD_ID, None, STD_BODY, STD_SIG, STD_TS, False),
    ("", STD_ID, str(STD_TS), STD_BODY, STD_SIG, STD_TS, False),
    ("whsec_" + base64.b64encode(b"another key 1234").decode(), STD_ID, str(STD_TS), STD_BODY, STD_SIG, STD_TS, False),
], ids=["vector", "vector-last-char-A", "any-valid-wins", "valid-then-invalid", "unknown-versions-skipped",
        "only-v2", "no-version", "all-invalid", "empty-header", "no-header", "skew+299", "skew-299", "skew+301",
        "skew-301", "other-timestamp", "other-id", "changed-body", "bad-timestamp", "no-id", "no-timestamp",
        "empty-secret", "other-secret"])
def test_verify_standard_webhook(secret, msg_id, ts, body, signature, now, ok):
    assert mw.verify_standard_webhook(secret, body, msg_id, ts, signature, now=now) is ok


def test_standard_webhook_uses_the_module_clock(fixed_clock):
    assert not mw.verify_standard_webhook(STD_SECRET, STD_BODY, STD_ID, str(STD_TS), STD_SIG)  # 2021 is stale now
    fixed_clock(STD_TS + 10)
    assert mw.verify_standard_webhook(STD_SECRET, STD_BODY, STD_ID, str(STD_TS), STD_SIG)


SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SLACK_TS = 1531420618
SLACK_BODY = (b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&"
              b"channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&"
              b"response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&"
              b"trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c")
SLACK_SIG = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"


@pytest.mark.parametrize("secret, body, ts, signature, now, ok", [
    (SLACK_SECRET, SLACK_BODY, str(SLACK_TS), SLACK_SIG, SLACK_TS, True),
    (SLACK_SECRET, SLACK_BODY, str(SLACK_TS), SLACK_SIG, SLACK_TS + 299, True),
    (SLACK_SECRET, SLACK_BODY, str(SLACK_TS), SLACK_SIG, SLACK_TS - 299, True),
    (SLACK_SECRET, SLACK_BODY, str(SLACK_TS), SLACK_SIG, SLACK_TS + 301, False),  # stale
    (SLACK_SECRET, SLACK_BODY, str(SLACK_TS), SLACK_SIG, SLACK_TS - 301, False),  # from the future
    (SLACK_SECRET, SLACK_BODY.replace(b"roadrunner", b"coyote"), str(SLACK_TS), SLACK_SIG, SLACK_TS, False),
    (SLACK_SECRET, SLACK_BODY + b"&x=1", str(SLACK_TS), SLACK_SIG, SLACK_TS, False),
    (SLACK_SECRET, SLACK_BODY, str(SLACK_TS + 1), SLACK_SIG, SLACK_TS, False),
    (SLACK_SECRET, SLACK_BODY, str(SLACK_TS), SLACK_SIG[:-1] + "4", SLACK_TS, False),
    (SLACK_SECRET, SLACK_BODY, str(SLACK_TS), SLACK_SIG[3:], SLACK_TS, False),  # no v0=
    (SLACK_SECRET, SLACK_BODY, str(SLACK_TS), "v1=" + SLACK_SIG[3:], SLACK_TS, False),
    (SLACK_SECRET, SLACK_BODY, "soon", SLACK_SIG, SLACK_TS, False),
    (SLACK_SECRET, SLACK_BODY, None, SLACK_SIG, SLACK_TS, False),
    (SLACK_SECRET, SLACK_BODY, str(SLACK_TS), None, SLACK_TS, False),
    ("", SLACK_BODY, str(SLACK_TS), SLACK_SIG, SLACK_TS, False),
    (SLACK_SECRET[:-1], SLACK_BODY, str(SLACK_TS), SLACK_SIG, SLACK_TS, False),
], ids=["vector", "skew+299", "skew-299", "stale", "future", "tampered-body", "appended-body", "other-timestamp",
        "changed-signature", "no-prefix", "wrong-version", "bad-timestamp", "no-timestamp", "no-signature",
        "empty-secret", "other-secret"])
def test_verify_slack_signature(secret, body, ts, signature, now, ok):
    assert mw.verify_slack_signature(secret, body, ts, signature, now=now) is ok


def test_slack_signature_uses_the_module_clock(fixed_clock):
    assert not mw.verify_slack_signature(SLACK_SECRET, SLACK_BODY, str(SLACK_TS), SLACK_SIG)  # 2018 is stale now
    fixed_clock(SLACK_TS)
    assert mw.verify_slack_signature(SLACK_SECRET, SLACK_BODY, str(SLACK_TS), SLACK_SIG)


def _basic(userpass: str | bytes) -> str:
    raw = userpass.encode() if isinstance(userpass, str) else userpass
    return "Basic " + base64.b64encode(raw).decode()


@pytest.mark.parametrize("secret, authorization, ok", [
    ("s3cret", "Bearer s3cret", True),
    ("s3cret", "bearer s3cret", True),
    ("s3cret", "BEARER   s3cret  ", True),
    ("s3cret", "Bearer s3cre", False),
    ("s3cret", "Bearer s3cret2", False),
    ("s3cret", "Bearer", False),
    ("s3cret", "Bearer s3cret extra", False),
    ("s3cret", "s3cret", False),
    ("s3cret", "Token s3cret", False),
    ("s3cret", "Digest s3cret", False),
    ("s3cret", _basic("alertmanager:s3cret"), True),
    ("s3cret", _basic(":s3cret"), True),
    ("se:cret", _basic("user:se:cret"), True),  # the password is everything after the first colon
    ("s3cret", _basic("s3cret:"), False),  # the secret as user name is not the password
    ("s3cret", _basic("s3cret"), False),
    ("s3cret", _basic("user:wrong"), False),
    ("s3cret", "Basic !!!not-base64!!!", False),
    ("s3cret", _basic("user:s3cret")[:-1], False),  # broken padding
    ("s3cret", _basic(b"user:\xff\xfe"), False),  # not UTF-8
    ("s3cret", "Basic " + base64.b64encode(b"user:s3cret").decode().lower(), False),
    ("", "Bearer ", False),  # an empty secret never matches
    ("", _basic("user:"), False),
    ("s3cret", "", False),
    ("s3cret", None, False),
], ids=["bearer", "bearer-lowercase", "bearer-spaces", "bearer-short", "bearer-long", "bearer-no-token",
        "bearer-extra", "no-scheme", "token-scheme", "digest-scheme", "basic", "basic-no-user", "basic-colon-in-password",
        "basic-secret-as-user", "basic-no-colon", "basic-wrong-password", "basic-bad-base64", "basic-bad-padding",
        "basic-not-utf8", "basic-mangled", "empty-secret-bearer", "empty-secret-basic", "empty-header", "no-header"])
def test_verify_authorization(secret, authorization, ok):
    assert mw.verify_authorization(secret, authorization) is ok


AUTH_SECRET = "whsec_" + base64.b64encode(b"a standard webhooks key").decode()
AUTH_BODY = b'{"event": "deploy"}'
AUTH_NOW = 1_700_000_000


def _standard_headers(secret: str, body: bytes, ts: int) -> dict:
    key = base64.b64decode(secret[len("whsec_"):])
    sig = base64.b64encode(hmac.new(key, b"msg_1." + str(ts).encode() + b"." + body, hashlib.sha256).digest()).decode()
    return {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": "v1," + sig}


def _headers_for(scheme: str, secret: str, body: bytes = AUTH_BODY, ts: int = AUTH_NOW) -> dict:
    """The headers a real sender using that scheme would send (lower-case names, as the app passes them)."""
    return {
        "header": lambda: {"x-webhook-secret": secret},
        "github": lambda: {"x-hub-signature-256": _gh256(secret, body)},
        "standard": lambda: _standard_headers(secret, body, ts),
        "gitlab": lambda: {"x-gitlab-token": secret},
        "bearer": lambda: {"authorization": "Bearer " + secret},
        "basic": lambda: {"authorization": _basic("alertmanager:" + secret)},
    }[scheme]()


def test_auth_checks_cover_exactly_the_schemes():
    assert set(mw.AUTH_CHECKS) == set(mw.AUTH_SCHEMES) == {"header", "github", "standard", "gitlab", "bearer", "basic"}


@pytest.mark.parametrize("scheme", mw.AUTH_SCHEMES)
def test_auth_check_accepts_only_its_own_scheme(scheme):
    headers = _headers_for(scheme, AUTH_SECRET)
    accepted = {name for name, check in mw.AUTH_CHECKS.items() if check(AUTH_SECRET, headers, AUTH_BODY, AUTH_NOW)}
    assert accepted == {scheme}
    assert not mw.AUTH_CHECKS[scheme]("whsec_" + base64.b64encode(b"some other key").decode(), headers, AUTH_BODY, AUTH_NOW)


@pytest.mark.parametrize("scheme", mw.AUTH_SCHEMES)
def test_authenticate_each_scheme(scheme):
    headers = _headers_for(scheme, AUTH_SECRET)
    assert mw.authenticate([AUTH_SECRET], mw.AUTH_SCHEMES, headers, AUTH_BODY, AUTH_NOW) == scheme
    # restricted to the other schemes ("auth": [...] in the webhook config): refused
    others = [s for s in mw.AUTH_SCHEMES if s != scheme]
    assert mw.authenticate([AUTH_SECRET], others, headers, AUTH_BODY, AUTH_NOW) is None
    # a rotated-out secret still valid in its grace period is the second one in the list
    assert mw.authenticate(["the-new-secret", AUTH_SECRET], [scheme], headers, AUTH_BODY, AUTH_NOW) == scheme
    assert mw.authenticate(["the-new-secret"], mw.AUTH_SCHEMES, headers, AUTH_BODY, AUTH_NOW) is None
    assert mw.authenticate([], mw.AUTH_SCHEMES, headers, AUTH_BODY, AUTH_NOW) is None


@pytest.mark.parametrize("scheme", ["github", "standard"])
def test_authenticate_signature_schemes_cover_the_body(scheme):
    headers = _headers_for(scheme, AUTH_SECRET)
    assert mw.authenticate([AUTH_SECRET], mw.AUTH_SCHEMES, headers, AUTH_BODY + b" ", AUTH_NOW) is None


@pytest.mark.parametrize("skew, ok", [(0, True), (299, True), (-299, True), (301, False), (-301, False)])
def test_authenticate_standard_timestamp_window(skew, ok):
    headers = _headers_for("standard", AUTH_SECRET, ts=AUTH_NOW)
    result = mw.authenticate([AUTH_SECRET], mw.AUTH_SCHEMES, headers, AUTH_BODY, AUTH_NOW + skew)
    assert result == ("standard" if ok else None)


@pytest.mark.parametrize("headers", [
    {},
    {"x-webhook-secret": ""},
    {"x-gitlab-token": ""},
    {"authorization": "Bearer "},
    {"authorization": _basic("user:")},
    {"x-hub-signature-256": _gh256("", AUTH_BODY)},
], ids=["nothing", "empty-header", "empty-gitlab", "empty-bearer", "empty-basic", "github-empty-key"])
def test_authenticate_empty_secret_never_matches(headers):
    assert mw.authenticate([""], mw.AUTH_SCHEMES, headers, AUTH_BODY, AUTH_NOW) is None


# --- Discord (Ed25519, key generated here) ---



def _ed25519_pair():
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(_serialization.Encoding.Raw, _serialization.PublicFormat.Raw).hex()
    return key, public


DISCORD_KEY, DISCORD_PUBLIC = _ed25519_pair()
OTHER_KEY, OTHER_PUBLIC = _ed25519_pair()
DISCORD_TS = "1700000000"
DISCORD_BODY = b'{"type":1}'
DISCORD_SIG = DISCORD_KEY.sign(DISCORD_TS.encode() + DISCORD_BODY).hex()


def _flip(hex_sig: str) -> str:
    raw = bytearray(bytes.fromhex(hex_sig))
    raw[10] ^= 1
    return raw.hex()


@pytest.mark.parametrize("public, ts, body, sig, ok", [
    (DISCORD_PUBLIC, DISCORD_TS, DISCORD_BODY, DISCORD_SIG, True),
    (DISCORD_PUBLIC.upper(), DISCORD_TS, DISCORD_BODY, DISCORD_SIG.upper(), True),
    (DISCORD_PUBLIC, DISCORD_TS, DISCORD_BODY, _flip(DISCORD_SIG), False),
    (DISCORD_PUBLIC, "1700000001", DISCORD_BODY, DISCORD_SIG, False),
    (DISCORD_PUBLIC, DISCORD_TS, b'{"type":2}', DISCORD_SIG, False),
    (DISCORD_PUBLIC, "", DISCORD_TS.encode() + DISCORD_BODY, DISCORD_SIG, False),  # timestamp moved into the body
    (DISCORD_PUBLIC, DISCORD_TS, DISCORD_BODY, OTHER_KEY.sign(DISCORD_TS.encode() + DISCORD_BODY).hex(), False),
    (OTHER_PUBLIC, DISCORD_TS, DISCORD_BODY, DISCORD_SIG, False),
    (DISCORD_PUBLIC, DISCORD_TS, DISCORD_BODY, DISCORD_SIG[:-2], False),
    (DISCORD_PUBLIC, DISCORD_TS, DISCORD_BODY, "zz" * 64, False),
    (DISCORD_PUBLIC, DISCORD_TS, DISCORD_BODY, "", False),
    (DISCORD_PUBLIC, None, DISCORD_BODY, DISCORD_SIG, False),
    (DISCORD_PUBLIC, DISCORD_TS, DISCORD_BODY, None, False),
    ("not-hex", DISCORD_TS, DISCORD_BODY, DISCORD_SIG, False),
    (DISCORD_PUBLIC[:-2], DISCORD_TS, DISCORD_BODY, DISCORD_SIG, False),  # 31-byte key
    ("", DISCORD_TS, DISCORD_BODY, DISCORD_SIG, False),
], ids=["good", "uppercase-hex", "bad-signature", "tampered-timestamp", "tampered-body", "moved-separator",
        "signed-by-other-key", "other-public-key", "short-signature", "non-hex-signature", "empty-signature",
        "no-timestamp", "no-signature", "non-hex-key", "short-key", "empty-key"])
def test_verify_discord_signature(public, ts, body, sig, ok):
    assert mw.verify_discord_signature(public, body, ts, sig) is ok


def test_ed25519_available():
    assert mw.ed25519_available() is True  # cryptography is a test dependency


# --- IP allowlists, client address, rate limits ---

@pytest.mark.parametrize("value, expected", [
    ("10.1.2.3", ["10.1.2.3/32"]),
    ("10.0.0.0/8", ["10.0.0.0/8"]),
    ("10.1.2.3/8", ["10.0.0.0/8"]),  # host bits allowed
    ("2001:db8::/32", ["2001:db8::/32"]),
    ("::1", ["::1/128"]),
    ("10.0.0.0/8, 192.168.1.7,2001:db8::/32", ["10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32"]),
    (" 10.0.0.0/8 ,", ["10.0.0.0/8"]),
    (["10.0.0.0/8", "fd00::/8"], ["10.0.0.0/8", "fd00::/8"]),
    ("", []),
    (None, []),
    ([], []),
], ids=["ipv4", "cidr4", "cidr4-host-bits", "cidr6", "ipv6", "comma-list", "spaces-trailing-comma", "list", "empty",
        "none", "empty-list"])
def test_parse_networks(value, expected):
    assert [str(n) for n in mw.parse_networks(value)] == expected


@pytest.mark.parametrize("value, field", [
    ("10.0.0.0/33", "webhook_allowed_ips[0]"),
    ("10.0.0.0/8, nope", "webhook_allowed_ips[1]"),
    ("10.0.0.0/8,,bogus", "webhook_allowed_ips[2]"),
    ("1.2.3.4:80", "webhook_allowed_ips[0]"),
    ("::gg", "webhook_allowed_ips[0]"),
    ("256.1.1.1", "webhook_allowed_ips[0]"),
    (["10.0.0.1", 5], "webhook_allowed_ips[1]"),
    (5, "webhook_allowed_ips"),
    ({"10.0.0.0/8": True}, "webhook_allowed_ips"),
], ids=["prefix-too-long", "word", "after-empty-entry", "with-port", "bad-ipv6", "bad-octet", "non-string", "number",
        "object"])
def test_parse_networks_refuses_bad_entries(value, field):
    with pytest.raises(mw.ConfigError) as e:
        mw.parse_networks(value, "webhook_allowed_ips")
    assert e.value.field == field and str(e.value).startswith(field + ":")


ALLOW = mw.parse_networks("10.0.0.0/8, 192.168.1.7, 2001:db8::/32, fe80::/10")


@pytest.mark.parametrize("address, networks, ok", [
    ("10.1.2.3", ALLOW, True),
    ("11.1.2.3", ALLOW, False),
    ("192.168.1.7", ALLOW, True),
    ("192.168.1.8", ALLOW, False),
    ("2001:db8::5", ALLOW, True),
    ("2001:db9::5", ALLOW, False),
    ("::ffff:10.1.2.3", ALLOW, True),  # IPv4-mapped IPv6 (dual-stack socket)
    ("::ffff:11.1.2.3", ALLOW, False),
    ("fe80::1%eth0", ALLOW, True),  # scoped link-local
    ("::1", mw.parse_networks("127.0.0.1"), False),
    ("127.0.0.1", mw.parse_networks("::1"), False),
    ("garbage", ALLOW, False),
    ("", ALLOW, False),
    ("10.1.2.3", (), True),  # no allowlist: anyone
    ("garbage", (), True),
], ids=["v4-in", "v4-out", "bare-ip-in", "bare-ip-out", "v6-in", "v6-out", "mapped-in", "mapped-out", "scoped",
        "v6-loopback-vs-v4", "v4-loopback-vs-v6", "garbage", "empty", "empty-list", "empty-list-garbage"])
def test_ip_allowed(address, networks, ok):
    assert mw.ip_allowed(address, networks) is ok


PROXIES = mw.parse_networks("127.0.0.1, 10.0.0.0/8, ::1")


@pytest.mark.parametrize("peer, forwarded_for, trusted, expected", [
    ("127.0.0.1", "203.0.113.9", PROXIES, "203.0.113.9"),
    ("127.0.0.1", "6.6.6.6, 203.0.113.9", PROXIES, "203.0.113.9"),  # rightmost untrusted wins: 6.6.6.6 is spoofable
    ("127.0.0.1", "203.0.113.9, 10.0.0.5", PROXIES, "203.0.113.9"),  # trusted hops skipped
    ("127.0.0.1", "6.6.6.6,203.0.113.9 , 10.0.0.5,10.0.0.6", PROXIES, "203.0.113.9"),
    ("::1", "2001:db8::1", PROXIES, "2001:db8::1"),
    ("::ffff:127.0.0.1", "203.0.113.9", PROXIES, "203.0.113.9"),
    ("198.51.100.1", "203.0.113.9", PROXIES, "198.51.100.1"),  # untrusted peer: XFF ignored
    ("198.51.100.1", "10.0.0.5", PROXIES, "198.51.100.1"),
    ("127.0.0.1", "203.0.113.9", (), "127.0.0.1"),  # no trusted proxies configured
    ("127.0.0.1", None, PROXIES, "127.0.0.1"),
    ("127.0.0.1", "", PROXIES, "127.0.0.1"),
    ("127.0.0.1", "10.0.0.1, 10.0.0.2", PROXIES, "10.0.0.1"),  # all trusted: the leftmost
    ("127.0.0.1", "6.6.6.6, not-an-ip", PROXIES, "127.0.0.1"),  # garbage rightmost hop: never the spoofable one
], ids=["single-hop", "spoofed-left", "trusted-chain", "long-chain", "ipv6", "mapped-peer", "untrusted-peer",
        "untrusted-peer-trusted-xff", "no-trusted", "no-xff", "empty-xff", "all-trusted", "garbage-hop"])
def test_client_address(peer, forwarded_for, trusted, expected):
    assert mw.client_address(peer, forwarded_for, trusted) == expected


@pytest.mark.parametrize("value, per_second", [
    ("20/s", 20.0),
    ("1/s", 1.0),
    (" 2 / sec ", 2.0),
    ("1.5/s", 1.5),
    ("600/m", 10.0),
    ("10/minute", 10 / 60),
    ("5000/h", 5000 / 3600),
    ("3/hour", 3 / 3600),
])
def test_parse_rate(value, per_second):
    rate, burst = mw.parse_rate(value)
    assert rate == pytest.approx(per_second) and burst >= 1


@pytest.mark.parametrize("value", ["off", "OFF", "0", "", "none", None])
def test_parse_rate_off(value):
    assert mw.parse_rate(value) is None


@pytest.mark.parametrize("value", ["abc", "0/s", "0.0/s", "-1/s", "20", "20/d", "/s", "20/s/s", "1e3/s"])
def test_parse_rate_refuses(value):
    with pytest.raises(ValueError, match="rate must look like"):
        mw.parse_rate(value)


def test_rate_limiter_burst_then_refusal():
    limiter = mw.RateLimiter((1.0, 3.0))  # 1 token/s, burst 3
    assert [limiter.take("10.0.0.1") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("10.0.0.1")
    assert 0 < wait <= 1.0
    assert limiter.take("10.0.0.2") == 0.0  # buckets are per key


def test_rate_limiter_from_parse_rate():
    rate = mw.parse_rate("2/s")
    limiter = mw.RateLimiter(rate)
    allowed = sum(limiter.take("k") == 0.0 for _ in range(int(rate[1]) + 5))
    assert allowed == int(rate[1])  # exactly the burst, then refused


def test_rate_limiter_off_never_refuses():
    limiter = mw.RateLimiter(mw.parse_rate("off"))
    assert all(limiter.take("k") == 0.0 for _ in range(1000))


def test_rate_limiter_is_bounded():
    limiter = mw.RateLimiter((1.0, 1.0), max_keys=3)
    for i in range(10):
        assert limiter.take(f"10.0.0.{i}") == 0.0
    assert len(limiter._buckets) <= 3


# === Pure parts: transform (templates, JSONPath, conditions, event names, globs) ===

SEED_ALERT = {"alert_name": "HighCPU", "instance": "server-1", "severity": "critical"}

NAMES = {
    "x": "abcdef", "n": None, "e": "", "z": 0, "f": False, "t": True, "num": 1.5,
    "d": {"a": 1, "b": "é"}, "l": [1, "a", None], "s": "  pad  ", "u": "Ünï",
    "labels": {"service": "api", "alert-name": "Disk"},
    "alerts": [{"labels": {"alertname": "ProbeFailure"}}, {"labels": {"alertname": "HighCPU"}}],
}


@pytest.mark.parametrize("template, names, expected", [
    ("Alert: {{alert_name}} on {{instance}} ({{severity}})", SEED_ALERT, "Alert: HighCPU on server-1 (critical)"),
    ("Alert: {{ alert_name }} on {{  instance  }}", SEED_ALERT, "Alert: HighCPU on server-1"),
    ("no tags at all", {}, "no tags at all"),
    ("", {}, ""),
    ("{{ labels.service }}", NAMES, "api"),
    ("{{ labels.alert-name }}", NAMES, "Disk"),
    ("{{ alerts.0.labels.alertname }}", NAMES, "ProbeFailure"),
    ("{{ alerts.1.labels.alertname }}", NAMES, "HighCPU"),
    ("{{ alerts.5.labels.alertname }}", NAMES, ""),
    ("{{ l.1 }}", NAMES, "a"),
    ("{{ x.y }}", NAMES, ""),  # a key of a string: missing
    ("[{{ missing }}]", NAMES, "[]"),
    ("[{{ missing.deeper.still }}]", NAMES, "[]"),
    ("[{{ n }}]", NAMES, "[]"),
    ("{{ t }}/{{ f }}", NAMES, "true/false"),
    ("{{ z }}", NAMES, "0"),
    ("{{ num }}", NAMES, "1.5"),
    ("{{ d }}", NAMES, '{"a":1,"b":"é"}'),
    ("{{ l }}", NAMES, '[1,"a",null]'),
    ("{{ e | default('none') }}", NAMES, "none"),
    ("{{ n | default('none') }}", NAMES, "none"),
    ("{{ missing | default('none') }}", NAMES, "none"),
    ("{{ missing | default(\"dq\") }}", NAMES, "dq"),
    ("{{ missing | default('it\\'s') }}", NAMES, "it's"),
    ("{{ x | default('none') }}", NAMES, "abcdef"),
    ("{{ z | default('none') }}", NAMES, "0"),
    ("{{ f | default('none') }}", NAMES, "false"),
    ("{{ x | upper }}", NAMES, "ABCDEF"),
    ("{{ u | upper }}/{{ u | lower }}", NAMES, "ÜNÏ/ünï"),
    ("[{{ s | trim }}]", NAMES, "[pad]"),
    ("{{ x | json }}", NAMES, '"abcdef"'),
    ("{{ d | json }}", NAMES, '{"a":1,"b":"é"}'),
    ("{{ missing | json }}", NAMES, "null"),
    ("{{ x | truncate(3) }}", NAMES, "abc"),
    ("{{ x | truncate(100) }}", NAMES, "abcdef"),
    ("[{{ x | truncate(0) }}]", NAMES, "[]"),
    ("{{ s | trim | upper | truncate(2) }}", NAMES, "PA"),
    ("{{ e | upper | default('E') }}", NAMES, "E"),
    ("{{x|upper}}", NAMES, "ABCDEF"),
    ("}} {{ x }} }}", NAMES, "}} abcdef }}"),
    ("{x} { {x} }", NAMES, "{x} { {x} }"),
], ids=["seed", "spaces", "plain", "empty", "dotted", "hyphen-key", "index-0", "index-1", "index-out-of-range",
        "list-index", "key-of-string", "missing", "missing-deep", "null", "booleans", "zero", "float", "dict-json",
        "list-json", "default-empty", "default-null", "default-missing", "default-double-quotes", "default-escaped-quote",
        "default-present", "default-keeps-zero", "default-keeps-false", "upper", "upper-lower-unicode", "trim",
        "json-string", "json-dict", "json-missing", "truncate", "truncate-long", "truncate-0", "filter-chain",
        "default-after-upper", "no-spaces", "stray-close", "single-braces"])
def test_render(template, names, expected):
    assert mw.render(template, names) == expected


def test_template_scopes_resolve_in_order():
    tpl = mw.Template("{{ severity }} {{ service }} {{ webhook }}")
    context, payload, builtins = {"severity": "ctx"}, {"severity": "payload", "service": "api"}, {"webhook": "wh"}
    assert tpl.render([context, payload, builtins]) == "ctx api wh"


@pytest.mark.parametrize("template, position, fragment", [
    ("{{ x", 1, "never closed"),
    ("Hello {{ name", 7, "never closed"),
    ("{{ a }} {{ b", 9, "never closed"),
    ("abc {{ x | nope }}", 12, "unknown filter 'nope'"),
    ("{{ x | upper | shout }}", 16, "unknown filter 'shout'"),
    ("{{ x | truncate('a') }}", 8, "filter 'truncate'"),
    ("{{ x | truncate }}", 8, "filter 'truncate'"),
    ("{{ x | truncate(1, 2) }}", 8, "filter 'truncate'"),
    ("{{ x | default(1) }}", 8, "filter 'default'"),
    ("{{ x | upper(1) }}", 8, "filter 'upper'"),
    ("{{ x | truncate(x) }}", 17, "a quoted string or a number"),
    ("{{ x | truncate(3 }}", 19, "',' or ')'"),
    ("{{ x y }}", 6, "expected '|' or '}}'"),
    ("{{ x. }}", 7, "a name after '.'"),
    ("{{ }}", 4, "expected a name"),
    ("{{ 'lit' }}", 4, "expected a name"),
    ("{{ 7*7 }}", 5, "unexpected character '*'"),
    ("{{ x | }}", 8, "unknown filter"),
    ("{{ x !}}", 6, "unexpected character '!'"),
    ("{{ x ! }}", 6, "unexpected character '!'"),
], ids=["unclosed", "unclosed-after-text", "second-unclosed", "unknown-filter", "unknown-filter-in-chain",
        "truncate-string-arg", "truncate-no-arg", "truncate-two-args", "default-number-arg", "upper-with-arg",
        "bare-word-arg", "unclosed-paren", "trailing-name", "dangling-dot", "empty-tag", "literal-tag", "arithmetic",
        "empty-filter", "bad-character", "bad-character-after-space"])
def test_template_errors_name_the_position(template, position, fragment):
    with pytest.raises(mw.ConfigError) as e:
        mw.Template(template, "transform.message_template")
    message = str(e.value)
    assert e.value.field == "transform.message_template" and message.startswith("transform.message_template: ")
    assert f"position {position}" in message and fragment in message


@pytest.mark.parametrize("template", [None, 5, ["{{ x }}"], {"a": 1}])
def test_template_must_be_a_string(template):
    with pytest.raises(mw.ConfigError, match="must be a string"):
        mw.Template(template)


def test_template_size_is_bounded():
    assert mw.render("a" * mw.MAX_TEMPLATE_LEN, {}) == "a" * mw.MAX_TEMPLATE_LEN
    for source in ("a" * (mw.MAX_TEMPLATE_LEN + 1), "{{ x }}" * 10_000):
        with pytest.raises(mw.ConfigError, match=f"longer than {mw.MAX_TEMPLATE_LEN}"):
            mw.Template(source)


@pytest.mark.parametrize("template", [
    "{{ __import__('os').system('touch {marker}') }}",
    "{{ x.__class__.__mro__ }}{{ __import__('os').system('touch {marker}') }}",
    "{{ open('{marker}', 'w') }}",
    "{{ x | default(__import__('os').system('touch {marker}')) }}",
])
def test_template_never_runs_code(template, tmp_path):
    marker = tmp_path / "ran"
    source = template.replace("{marker}", str(marker))
    with pytest.raises(mw.ConfigError):
        mw.render(source, {"x": "abc"})
    assert not marker.exists()


@pytest.mark.parametrize("template", [
    "{{ x.__class__ }}", "{{ x.__class__.__name__ }}", "{{ d.__init__.__globals__ }}", "{{ d.keys }}",
    "{{ d.items }}", "{{ l.__len__ }}", "{{ __builtins__ }}", "{{ __import__ }}",
])
def test_template_attributes_are_never_reached(template):
    assert mw.render(template, {"x": "abc", "d": {"a": 1}, "l": [1]}) == ""


def test_template_jinja_statements_are_plain_text():
    source = "{% for x in range(3) %}{% import os %}"
    assert mw.render(source, {}) == source


# --- JSONPath ---

ALERTMANAGER = json.loads(
    '{"receiver":"sms","status":"firing","alerts":[{"status":"firing","labels":{"alertname":"ProbeFailure",'
    '"instance":"https://server.example.org","job":"http_checks","monitor":"master","severity":"critical"},'
    '"annotations":{"description":"Instance https://server.example.org has been down for over 5m. Job: http_checks",'
    '"summary":"BlackBox Probe Failure: https://server.example.org"},"startsAt":"2023-02-06T13:08:45.828Z",'
    '"endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://prometheus.example.org:9090/graph?g0.expr=probe_success'
    '+%3D%3D+0\\u0026g0.tab=1","fingerprint":"1a30ba71cca2921f"}],"groupLabels":{"alertname":"ProbeFailure"},'
    '"commonLabels":{"alertname":"ProbeFailure","instance":"https://server.example.org","job":"http_checks",'
    '"monitor":"master","severity":"critical"},"commonAnnotations":{"description":"Instance https://server.example.org'
    ' has been down for over 5m. Job: http_checks","summary":"BlackBox Probe Failure: https://server.example.org"},'
    '"externalURL":"http://prometheus.example.org:9093","version":"4","groupKey":"{}/{severity=\\"critical\\"}:'
    '{alertname=\\"ProbeFailure\\"}","truncatedAlerts":0}\n')
GROUPED = {
    "alerts": [
        {"status": "firing", "labels": {"alertname": "A", "severity": "critical"}},
        {"status": "resolved", "labels": {"alertname": "B", "severity": "warning"}},
        {"status": "firing", "labels": {"alertname": "C", "severity": "warning"}},
    ],
    "tags": ["prod", "web"], "nothing": None, "key with space": 7, "n": 0,
}


@pytest.mark.parametrize("path, doc, expected", [
    ("$.receiver", ALERTMANAGER, "sms"),
    ("$.alerts[0].labels.severity", ALERTMANAGER, "critical"),
    ("$.commonLabels.alertname", ALERTMANAGER, "ProbeFailure"),
    ("$.alerts[*].labels.alertname", ALERTMANAGER, "ProbeFailure"),  # one match: the value, not a list
    ("$.alerts[*].labels.alertname", GROUPED, ["A", "B", "C"]),  # several: a list
    ("$.alerts[?(@.status == 'firing')].labels.alertname", GROUPED, ["A", "C"]),
    ("$.alerts[?(@.status == 'resolved')].labels.alertname", GROUPED, "B"),
    ("$.alerts[?(@.status == 'pending')].labels.alertname", GROUPED, None),
    ("$.alerts[?(@.status == 'firing')]", ALERTMANAGER, ALERTMANAGER["alerts"][0]),
    ("$..alertname", GROUPED, ["A", "B", "C"]),
    ("$.tags", GROUPED, ["prod", "web"]),  # one match that is a list
    ("$.tags[1]", GROUPED, "web"),
    ("$['key with space']", GROUPED, 7),
    ("$.n", GROUPED, 0),
    ("$.nothing", GROUPED, None),
    ("$.missing", GROUPED, None),
    ("$.missing.deeper", GROUPED, None),
    ("$.alerts[9]", GROUPED, None),
    ("  $.tags[0]  ", GROUPED, "prod"),
], ids=["top-level", "index", "nested", "star-one-match", "star-several", "filter-several", "filter-one",
        "filter-none", "filter-object", "recursive", "list-value", "list-index", "quoted-key", "zero", "null",
        "missing", "missing-deep", "index-out-of-range", "surrounding-spaces"])
def test_jsonpath_value(path, doc, expected):
    assert mw.jsonpath_value(mw.compile_jsonpath(path, "transform.context_mapping.x"), doc) == expected


@pytest.mark.parametrize("path", ["severity", "alerts[0]", "", "   ", "$.[", "$.a[", "$..", "$.a b", "$.a[?(@.x ==]",
                                  5, None, ["$.a"], "$." + "a." * 1100 + "a"],
                         ids=["no-dollar", "no-dollar-index", "empty", "blank", "dangling-bracket", "unclosed-index",
                              "dangling-descent", "space", "bad-filter", "number", "none", "list", "too-long"])
def test_compile_jsonpath_errors_name_the_field(path):
    with pytest.raises(mw.ConfigError) as e:
        mw.compile_jsonpath(path, "transform.context_mapping.severity")
    assert e.value.field == "transform.context_mapping.severity"
    assert str(e.value).startswith("transform.context_mapping.severity: ")


def test_jsonpath_on_odd_documents_is_no_match():
    compiled = mw.compile_jsonpath("$.a.b", "f")
    for doc in (None, [], "text", 5, {"a": "text"}, {"a": [1, 2]}):
        assert mw.jsonpath_value(compiled, doc) is None


# --- conditions ---

COND_PAYLOAD = {
    "severity": "critical", "labels": {"env": "prod"}, "count": 3, "ratio": 0.75, "neg": -2,
    "tags": ["prod", "web"], "status": "firing", "name": "web-01", "flag": True, "off": False, "zero": 0,
    "nothing": None, "empty": [], "s3": "3", "key with space": 7, "café": "crème",
    "alerts": [{"status": "resolved", "n": 1}, {"status": "firing", "n": 5}],
}
COND_ENV = mw.CondEnv(
    COND_PAYLOAD,
    {"env": "prod", "n": 2, "service": "api"},
    {"x-github-event": "push", "content-type": "application/json"},
    {"x": "1", "mode": "dry"},
)


@pytest.mark.parametrize("source, expected", [
    # the SPEC's examples
    ("$.severity == 'critical'", True),
    ("$.severity == 'warning'", False),
    ("$.labels.env != 'test' and $.count >= 3", True),
    ("$.labels.env != 'prod' and $.count >= 3", False),
    ("'prod' in $.tags", True),
    ("'dev' in $.tags", False),
    ("not ($.status == 'resolved')", True),
    ("not ($.status == 'firing')", False),
    # operators
    ("$.tags contains 'web'", True),
    ("$.tags contains 'we'", False),  # list membership, not substring
    ("$.name contains 'web'", True),  # substring of a string
    ("'web' in $.name", True),
    ("'env' in $.labels", True),  # key of an object
    ("$.labels contains 'prod'", False),  # values are not keys
    ("'dev' not in $.tags", True),
    ("'prod' not in $.tags", False),
    ("$.count in [1, 2, 3]", True),
    ("$.count not in [1, 2]", True),
    ("$.count in []", False),
    ("$.tags == ['prod', 'web']", True),
    ("$.severity != 'critical'", False),
    ("$.count < 4 and $.count <= 3 and $.count > 2 and $.count >= 3", True),
    ("$.count < 3 or $.count > 3", False),
    # literals
    ("$.count == 3.0", True),
    ("$.count >= 3e0", True),
    ("$.ratio > 0.5", True),
    ("$.neg < -1", True),
    ("$.name == \"web-01\"", True),
    ("$.flag == true", True),
    ("$.off == false", True),
    ("$.nothing == null", True),
    ("1 == 1.0", True),
    ("true == 1", False),  # booleans are not numbers
    ("$.count == '3'", False),  # nor are strings
    ("$.s3 == 3", False),
    ("'b' > 'a'", True),
    ("$['key with space'] == 7", True),
    ("$['café'] == 'crème'", True),
    # precedence: and binds tighter than or
    ("$.count == 1 or $.count == 3 and $.status == 'firing'", True),
    ("$.count == 1 or $.count == 2 and $.status == 'firing'", False),
    ("($.count == 1 or $.count == 3) and $.status == 'resolved'", False),
    ("not $.flag or $.zero", False),
    ("not not $.flag", True),
    # truthiness of an operand alone
    ("$.flag", True),
    ("$.off", False),
    ("$.zero", False),
    ("$.empty", False),
    ("$.tags", True),
    ("$.missing", False),
    # context, headers, query
    ("$context.env == 'prod'", True),
    ("$context.n < $.count", True),
    ("$context.missing == null", True),
    ("$headers.x-github-event == 'push'", True),
    ("$headers.X-GitHub-Event == 'push'", True),  # header names are case-insensitive
    ("$headers.x-gitlab-event == null", True),
    ("$query.x == '1'", True),
    ("$query.mode == 'dry' and $query.x != 1", True),
    ("$query.missing", False),
    # several matches: true if any match satisfies the comparison
    ("$.alerts[*].status == 'firing'", True),
    ("$.alerts[*].status == 'pending'", False),
    ("$.alerts[*].n > 4", True),
    ("$.alerts[*].n > 5", False),
    ("$.alerts[?(@.status == 'firing')].n == 5", True),
    ("$.alerts[0].status == 'resolved'", True),
    # a missing path is null
    ("$.missing == null", True),
    ("$.missing != null", False),
    ("$.a.b.c == null", True),
    ("$.missing > 0", False),
    ("$.missing < 0", False),
    ("'x' in $.missing", False),
    ("'x' not in $.missing", True),
    # ordering across types is false, never an error
    ("$.count > 'a'", False),
    ("$.count < 'a'", False),
    ("$.name < 5", False),
    ("$.flag > 0", False),
    ("null < 1", False),
    ("$.tags > 1", False),
    ("$.labels >= $.labels", False),
    # spacing is free
    ("$.severity=='critical'", True),
    ("  $.count>=3  ", True),
], ids=lambda v: v if isinstance(v, str) else None)
def test_condition(source, expected):
    assert mw.Condition(source).test(COND_ENV) is expected


@pytest.mark.parametrize("source, position", [
    ("$.a ==", 7),
    ("$.a === 1", 7),
    ("foo == 1", 1),
    ("$.a == foo", 8),
    ("($.a == 1", 10),
    ("$.a == 1)", 9),
    ("(($.a == 1)", 12),
    ("== 1", 1),
    ("$.a == 'x' and", 15),
    ("$.a == 'x' or or $.b", 15),
    ("$foo == 1", 1),
    ("$.a ! 1", 5),
    ("$.a == 1 2", 10),
    ("$.a in [1,", 11),
    ("$.a in [1 2]", 11),
    ("$.a == 'unterminated", 8),
    ("()", 2),
    ("not", 4),
    ("$.a = 1", 5),
    ("$.a == 1 && $.b == 2", 10),
], ids=lambda v: v if isinstance(v, str) else None)
def test_condition_errors_name_the_position(source, position):
    with pytest.raises(mw.ConfigError) as e:
        mw.Condition(source)
    assert e.value.field == "filters.condition" and f"position {position}" in str(e.value)


@pytest.mark.parametrize("source", [
    "not " * 100 + "$.a",
    "(" * 100 + "$.a" + ")" * 100,
    "(" * 1000 + "$.a" + ")" * 1000,
    "not (" * 40 + "$.a" + ")" * 40,
    "not " * 33 + "$.a",
    "(" * 33 + "$.a" + ")" * 33,
], ids=["not-100", "parens-100", "parens-1000", "not-parens-40", "not-33", "parens-33"])
def test_condition_nesting_is_bounded(source):
    with pytest.raises(mw.ConfigError, match="nested deeper than"):  # never a RecursionError
        mw.Condition(source)


@pytest.mark.parametrize("source, expected", [
    ("not " * 32 + "$.flag", True),
    ("(" * 32 + "$.flag" + ")" * 32, True),
    ("$.count == 3 and " * 100 + "true", True),  # a long flat chain is not nesting
    ("$.count == 1 or " * 100 + "$.flag", True),
])
def test_condition_within_bounds(source, expected):
    assert mw.Condition(source).test(COND_ENV) is expected


@pytest.mark.parametrize("source, message", [
    ("$.a == '" + "x" * mw.MAX_CONDITION_LEN + "'", f"longer than {mw.MAX_CONDITION_LEN}"),
    ("", "non-empty string"),
    ("   ", "non-empty string"),
    (None, "non-empty string"),
    (5, "non-empty string"),
])
def test_condition_length_and_type(source, message):
    with pytest.raises(mw.ConfigError, match=message):
        mw.Condition(source)


def test_condition_field_is_named():
    with pytest.raises(mw.ConfigError) as e:
        mw.Condition("$.a ==", "webhooks.deploy.filters.condition")
    assert str(e.value).startswith("webhooks.deploy.filters.condition: ")


# --- event names and globs ---

@pytest.mark.parametrize("headers, payload, expected", [
    ({"x-github-event": "pull_request"}, {"action": "opened"}, "pull_request"),
    ({"x-gitlab-event": "Push Hook"}, {"object_kind": "push"}, "Push Hook"),  # a header wins over the payload
    ({"x-event-type": "deploy"}, {}, "deploy"),
    ({"x-event-key": "repo:push"}, {}, "repo:push"),  # Bitbucket
    ({"x-github-event": "push", "x-gitlab-event": "Push Hook", "x-event-type": "a", "x-event-key": "b"}, {}, "push"),
    ({"x-gitlab-event": "Push Hook", "x-event-type": "a"}, {}, "Push Hook"),
    ({"x-github-event": "  "}, {"type": "x"}, "x"),  # blank header skipped
    ({}, {"object_kind": "merge_request"}, "merge_request"),
    ({}, {"event_type": "a", "event": "b", "type": "c", "object_kind": "d"}, "a"),
    ({}, {"event": "b", "type": "c", "object_kind": "d"}, "b"),
    ({}, {"type": "c", "object_kind": "d"}, "c"),
    ({}, {"event": "", "type": {"nested": 1}, "object_kind": "d"}, "d"),  # empty and object values skipped
    ({}, {"status": "firing"}, ""),
    ({}, [1, 2], ""),
    ({}, {}, ""),
], ids=["github", "gitlab-header", "x-event-type", "x-event-key", "header-order", "header-order-2", "blank-header",
        "object-kind", "field-order", "field-order-2", "field-order-3", "skip-empty", "none", "list-payload", "empty"])
def test_event_type_of(headers, payload, expected):
    assert mw.event_type_of(headers, payload) == expected


@pytest.mark.parametrize("event_type, context, payload, expected", [
    ("pull_request", {}, {"action": "opened"}, "pull_request.opened"),
    ("", {}, {"source": "test", "severity": "debug"}, "test.debug"),
    ("Push Hook", {}, {"object_kind": "push"}, "Push Hook"),  # no qualifier: just the kind
    ("merge_request", {}, {"object_kind": "merge_request", "object_attributes": {"action": "open"}}, "merge_request"),
    ("", {}, ALERTMANAGER, "alerts.firing"),  # no kind: the webhook's name
    ("", {}, {}, "alerts"),
    ("", {"source": "ctx", "severity": "high"}, {"source": "payload", "severity": "low"}, "ctx.high"),
    ("", {}, {"source": "payload", "severity": "low"}, "payload.low"),
    ("push", {"source": "ctx"}, {"source": "payload"}, "push"),  # event type beats source
    ("", {}, {"severity": "sev", "action": "act", "status": "st", "level": "lvl"}, "alerts.sev"),
    ("", {}, {"action": "act", "status": "st", "level": "lvl"}, "alerts.act"),
    ("", {}, {"status": "st", "level": "lvl"}, "alerts.st"),
    ("", {}, {"level": "lvl"}, "alerts.lvl"),
    ("", {"severity": ""}, {"severity": "  ", "action": "", "status": None, "level": "warn"}, "alerts.warn"),
    ("", {"source": None}, {"source": ""}, "alerts"),
    ("", {}, {"severity": True}, "alerts"),  # booleans are not qualifiers
    ("", {}, {"severity": 3}, "alerts.3"),
    ("", {}, "not an object", "alerts"),
], ids=["github-pr", "source-severity", "gitlab-no-qualifier", "nested-action-ignored", "alertmanager",
        "webhook-name", "context-first", "payload-source", "event-type-first", "severity-first", "action-second",
        "status-third", "level-fourth", "blank-skipped", "blank-source", "boolean-skipped", "number", "non-object"])
def test_event_name_of(event_type, context, payload, expected):
    assert mw.event_name_of("alerts", event_type, context, payload) == expected


def test_event_name_from_headers_end_to_end():
    payload = {"action": "opened", "number": 1}
    event_type = mw.event_type_of({"x-github-event": "pull_request"}, payload)
    assert mw.event_name_of("gh", event_type, {}, payload) == "pull_request.opened"


@pytest.mark.parametrize("patterns, name, expected", [
    (["*.critical", "*.warning"], "test.critical", "*.critical"),
    (["*.critical", "*.warning"], "test.CRITICAL", "*.critical"),
    (["*.CRITICAL"], "test.critical", "*.CRITICAL"),
    (["*.critical", "*.warning"], "Alerts.Warning", "*.warning"),
    (["*.critical"], "test.debug", None),
    (["*.critical"], "critical", None),
    (["Push*"], "push hook", "Push*"),
    (["pull_request.[oc]*"], "pull_request.opened", "pull_request.[oc]*"),
    (["pull_request.[oc]*"], "pull_request.reopened", None),
    (["deploy.?"], "deploy.1", "deploy.?"),
    (["*"], "anything.at.all", "*"),
    ("*.debug", "x.debug", "*.debug"),  # a single string is one pattern
    ([], "x", None),
    (None, "x", None),
], ids=["first", "case-name", "case-pattern", "second", "no-match", "no-dot", "space", "class", "class-no-match",
        "question-mark", "star", "string", "empty", "none"])
def test_glob_match(patterns, name, expected):
    assert mw.glob_match(mw.compile_globs(patterns, "filters.include"), name) == expected


@pytest.mark.parametrize("patterns, field", [
    ([""], "filters.include[0]"),
    (["ok", 1], "filters.include[1]"),
    (["ok", None], "filters.include[1]"),
    (["x" * 257], "filters.include[0]"),
    (5, "filters.include"),
    ({"*.x": True}, "filters.include"),
])
def test_compile_globs_errors_name_the_field(patterns, field):
    with pytest.raises(mw.ConfigError) as e:
        mw.compile_globs(patterns, "filters.include")
    assert e.value.field == field


# === Pure parts: model (validation of webhooks, agents and the whole file) ===

AGENTS = mw.compile_config({"version": 1, "agents": {"ops": {"kind": "echo"}}}).agents
SEED_WEBHOOK = {
    "name": "alert-webhook", "agent": "default", "secret": "my-secret", "response_mode": "sync",
    "transform": {"message_template": "Alert from {{source}}: {{message}}",
                  "context_mapping": {"severity": "$.severity", "service": "$.service_name"}},
    "filters": {"include": ["*.critical", "*.warning"], "exclude": ["*.debug"],
                "condition": "$.severity == 'critical'", "event": "{{source}}.{{severity}}"},
    "allowed_ips": ["10.0.0.0/8"], "enabled": True,
}


def test_validate_webhook_accepts_the_seed_example():
    wh = mw.validate_webhook("alert-webhook", SEED_WEBHOOK, AGENTS)
    assert (wh.name, wh.agent, wh.response_mode, wh.enabled) == ("alert-webhook", "default", "sync", True)
    assert wh.auth == frozenset(mw.AUTH_SCHEMES)
    assert [k for k, _ in wh.mapping] == ["severity", "service"]
    assert wh.template.render([{"source": "prom", "message": "disk full"}]) == "Alert from prom: disk full"
    assert wh.event_template.render([{"source": "prom", "severity": "critical"}]) == "prom.critical"
    assert wh.condition.test(mw.CondEnv({"severity": "critical"}, {}, {}, {}))
    assert mw.glob_match(wh.include, "prom.critical") and mw.glob_match(wh.exclude, "prom.debug")
    assert [str(n) for n in wh.allowed_ips] == ["10.0.0.0/8"]
    assert wh.valid_secrets(0) == ["my-secret"]
    assert wh.public()["secret"] == "***" and "my-secret" not in json.dumps(wh.public())


@pytest.mark.parametrize("name", ["a", "0abc", "a_b-c", "alert-webhook", "a" * 64, "gh-1"])
def test_validate_webhook_good_names(name):
    assert mw.validate_webhook(name, {"secret": "s"}, AGENTS).name == name


@pytest.mark.parametrize("name", ["Bad", "-x", "_x", "a" * 65, "a b", "", "x.y", "é", "a/b", "abc\n", "\nabc", 5, None],
                         ids=["upper", "dash-first", "underscore-first", "too-long", "space", "empty", "dot",
                              "non-ascii", "slash", "trailing-newline", "leading-newline", "number", "none"])
def test_validate_webhook_bad_names(name):
    with pytest.raises(mw.ConfigError) as e:
        mw.validate_webhook(name, {"secret": "s"}, AGENTS)
    assert e.value.field == "name"


@pytest.mark.parametrize("name", sorted(mw.RESERVED_NAMES))
def test_validate_webhook_reserved_names(name):
    with pytest.raises(mw.Conflict) as e:
        mw.validate_webhook(name, {"secret": "s"}, AGENTS)
    assert e.value.status == 409 and "reserved" in e.value.message


def _hook(**fields):
    return {"agent": "default", "secret": "s", **fields}


@pytest.mark.parametrize("cfg, field, fragment", [
    (_hook(bogus=1), "bogus", "unknown field"),
    (_hook(response_mode="later"), "response_mode", "'sync' or 'async'"),
    (_hook(response_mode=1), "response_mode", "must be string"),
    (_hook(allowed_ips=["10.0.0.0/8", "10.0.0.0/33"]), "allowed_ips[1]", "not an IP address or CIDR"),
    (_hook(allowed_ips="10.0.0.0/8, bogus"), "allowed_ips[1]", "'bogus'"),
    (_hook(allowed_ips=5), "allowed_ips", "list"),
    (_hook(transform={"message_template": "Hi {{ name | shout }}"}), "transform.message_template", "position 14"),
    (_hook(transform={"message_template": "Hi {{ name"}), "transform.message_template", "position 4"),
    (_hook(transform={"message_template": 5}), "transform.message_template", "string"),
    (_hook(transform={"context_mapping": {"sev": "severity"}}), "transform.context_mapping.sev", "JSONPath"),
    (_hook(transform={"context_mapping": {"sev": "$.["}}), "transform.context_mapping.sev", "JSONPath"),
    (_hook(transform={"context_mapping": ["$.a"]}), "transform.context_mapping", "object"),
    (_hook(transform={"split": "alerts"}), "transform.split", "JSONPath"),
    (_hook(transform={"template": "x"}), "transform.template", "unknown field"),
    (_hook(transform=[]), "transform", "object"),
    (_hook(filters={"condition": "$.a =="}), "filters.condition", "position 7"),
    (_hook(filters={"condition": "$.a == 1 and foo"}), "filters.condition", "position 14"),
    (_hook(filters={"event": "{{ source"}), "filters.event", "position 1"),
    (_hook(filters={"include": [1]}), "filters.include[0]", "non-empty string"),
    (_hook(filters={"exclude": "ok", "include": 5}), "filters.include", "list"),
    (_hook(filters={"includes": ["x"]}), "filters.includes", "unknown field"),
    (_hook(agent="nope"), "agent", "unknown agent 'nope'"),
    (_hook(agent=5), "agent", "must be string"),
    ({"agent": "default"}, "secret", "is required"),
    (_hook(secret=5), "secret", "must be string"),
    (_hook(secret="x" * 1025), "secret", "longer than"),
    (_hook(auth=["header", "magic"]), "auth", "none"),
    (_hook(auth=[]), "auth", "none"),
    (_hook(auth="all"), "auth", "none"),
    (_hook(enabled="yes"), "enabled", "must be bool"),
    (_hook(timeout=0), "timeout", "between"),
    (_hook(timeout=4000), "timeout", "between"),
    (_hook(max_concurrency=0), "max_concurrency", "at least 1"),
    (_hook(max_concurrency=True), "max_concurrency", "must be int"),
    (_hook(reply_to=[{"url": "ftp://x"}]), "reply_to[0].url", "http"),
    (_hook(reply_to=[{"url": "http://x", "header": {}}]), "reply_to[0].header", "unknown field"),
    (_hook(reply_to="http://x"), "reply_to", "must be array"),
    (_hook(previous_secrets=[{"secret": "old"}]), "previous_secrets[0]", "expires_at"),
], ids=lambda v: None)
def test_validate_webhook_errors_name_the_field(cfg, field, fragment):
    with pytest.raises(mw.ConfigError) as e:
        mw.validate_webhook("hook", cfg, AGENTS)
    assert e.value.field == field and str(e.value).startswith(field + ": ") and fragment in str(e.value)


def test_validate_webhook_auth_none_needs_no_secret():
    wh = mw.validate_webhook("open", {"auth": "none"}, AGENTS)
    assert wh.auth is None and wh.valid_secrets(0) == []


def test_validate_webhook_not_an_object():
    with pytest.raises(mw.BadRequest):
        mw.validate_webhook("hook", ["not", "an", "object"], AGENTS)


@pytest.mark.parametrize("cfg, field, fragment", [
    ({"kind": "shell"}, "kind", "must be one of echo, command, http, openai"),
    ({}, "kind", "is required"),
    ({"kind": 1}, "kind", "must be string"),
    ({"kind": "echo", "argv": ["x"]}, "argv", "unknown field"),
    ({"kind": "command"}, "argv", "is required"),
    ({"kind": "command", "argv": []}, "argv", "non-empty list"),
    ({"kind": "command", "argv": [""]}, "argv", "non-empty list"),
    ({"kind": "command", "argv": ["echo", 1]}, "argv", "non-empty list"),
    ({"kind": "command", "argv": "echo hi"}, "argv", "must be array"),
    ({"kind": "command", "argv": ["echo"], "env": {"A": 1}}, "env", "object of strings"),
    ({"kind": "http"}, "url", "http:// or https://"),
    ({"kind": "http", "url": "ftp://x"}, "url", "http:// or https://"),
    ({"kind": "http", "url": "http://x", "headers": {"a": 1}}, "headers", "object of strings"),
    ({"kind": "openai", "base_url": "http://x"}, "model", "is required"),
    ({"kind": "openai", "model": "m"}, "base_url", "http:// or https://"),
    ({"kind": "echo", "timeout": -1}, "timeout", "between"),
    ({"kind": "echo", "timeout": "5"}, "timeout", "must be int or float"),
    ({"kind": "echo", "generic": "yes"}, "generic", "must be bool"),
], ids=lambda v: None)
def test_validate_agent_errors_name_the_field(cfg, field, fragment):
    with pytest.raises(mw.ConfigError) as e:
        mw.validate_agent("ag", cfg)
    assert e.value.field == field and fragment in str(e.value)


@pytest.mark.parametrize("name", ["Bad", "", "a b", "abc\n", "a" * 65])
def test_validate_agent_bad_names(name):
    with pytest.raises(mw.ConfigError) as e:
        mw.validate_agent(name, {"kind": "echo"})
    assert e.value.field == "name"


@pytest.mark.parametrize("cfg, kind, generic, timeout", [
    ({"kind": "echo"}, "echo", True, 30.0),
    ({"kind": "command", "argv": ["moxxy", "run", "--prompt", "{message}"], "timeout": 5}, "command", False, 5.0),
    ({"kind": "command", "argv": ["cat"], "generic": True}, "command", True, 30.0),
    ({"kind": "http", "url": "http://127.0.0.1:17891/api/agents/ops/chat"}, "http", True, 30.0),
    ({"kind": "openai", "base_url": "http://127.0.0.1:11434/v1", "model": "llama3.1"}, "openai", True, 60.0),
], ids=["echo", "command", "command-generic", "http", "openai"])
def test_validate_agent_good(cfg, kind, generic, timeout):
    agent = mw.validate_agent("ag", cfg)
    assert (agent.kind, agent.generic, agent.timeout) == (kind, generic, timeout)


@pytest.mark.parametrize("raw, field, fragment", [
    ({"version": 1, "webhooks": {"x": {"secret": "s", "bogus": 1}}}, "webhooks.x", "bogus: unknown field"),
    ({"version": 1, "webhooks": {"x": {"secret": "s", "agent": "ops"}}}, "webhooks.x", "agent: unknown agent 'ops'"),
    ({"version": 1, "webhooks": {"x": {"secret": "s", "filters": {"condition": "$.a =="}}}}, "webhooks.x",
     "filters.condition: expected a value"),
    ({"version": 1, "webhooks": {"generic": {"secret": "s"}}}, "webhooks.generic", "reserved"),
    ({"version": 1, "webhooks": {"Bad": {"secret": "s"}}}, "webhooks.Bad", "name"),
    ({"version": 1, "agents": {"bad": {"kind": "shell"}}}, "agents.bad", "kind: must be one of"),
    ({"version": 1, "agents": {"Bad": {"kind": "echo"}}}, "agents.Bad", "name"),
    ({"version": 2}, "version", "unsupported version 2"),
    ({"version": 1, "extra": 1}, "extra", "unknown field"),
    ({"version": 1, "webhooks": []}, "webhooks", "must be object"),
    ({"version": 1, "agents": "echo"}, "agents", "must be object"),
], ids=["webhook-field", "webhook-agent", "webhook-condition", "reserved", "webhook-name", "agent-kind",
        "agent-name", "version", "unknown-top", "webhooks-list", "agents-string"])
def test_compile_config_errors_name_the_field(raw, field, fragment):
    with pytest.raises(mw.ConfigError) as e:
        mw.compile_config(raw)
    assert e.value.field == field and fragment in str(e.value)


def test_compile_config_builtin_default_agent():
    empty = mw.compile_config(mw.empty_config())
    assert empty.webhooks == {} and empty.agents["default"].kind == "echo"
    replaced = mw.compile_config({"version": 1, "agents": {"default": {"kind": "http", "url": "http://127.0.0.1:1"}}})
    assert replaced.agents["default"].kind == "http"
    config = mw.compile_config({"version": 1, "agents": {"ops": {"kind": "echo"}},
                                "webhooks": {"alert-webhook": {**SEED_WEBHOOK, "agent": "ops"}}})
    assert config.webhooks["alert-webhook"].agent == "ops"


# === Pure parts: platforms (text splitting, hosts, Discord messages) ===

@pytest.mark.parametrize("text, expected", [
    ("", [""]),
    ("short", ["short"]),
    ("x" * 4096, ["x" * 4096]),
    ("x" * 4097, ["x" * 4096, "x"]),
    ("x" * 10000, ["x" * 4096, "x" * 4096, "x" * 1808]),  # no break anywhere: hard cuts
], ids=["empty", "short", "exactly-limit", "limit-plus-one", "no-breaks"])
def test_split_text_exact(text, expected):
    assert mw.split_text(text, 4096) == expected


def test_split_text_breaks_at_newlines():
    text = "\n".join(f"line {i:04d} " + "x" * 50 for i in range(300))  # about 18,000 characters
    pieces = mw.split_text(text, 4096)
    assert len(pieces) > 4 and all(0 < len(p) <= 4096 for p in pieces)
    assert "\n".join(pieces) == text  # every cut fell on a line break


def test_split_text_breaks_at_spaces():
    text = " ".join(f"word{i}" for i in range(3000))  # one line, about 23,000 characters
    pieces = mw.split_text(text, 4096)
    assert len(pieces) > 5 and all(0 < len(p) <= 4096 for p in pieces)
    assert " ".join(pieces) == text  # no word was cut in two


def test_split_text_prefers_newline_over_space():
    text = "a" * 3000 + "\n" + "b " * 600
    pieces = mw.split_text(text, 4096)
    assert pieces[0] == "a" * 3000 and all(len(p) <= 4096 for p in pieces)


@pytest.mark.parametrize("text", ["short", "x" * 2000, "é" * 2000])
def test_cut_text_short_is_unchanged(text):
    assert mw.cut_text(text, 2000) == text


def test_cut_text_long_words():
    out = mw.cut_text("word " * 1000, 2000)
    assert len(out) <= 2000 and out.endswith("\u2026")
    assert set(out[:-1].split()) == {"word"} and len(out) > 1000  # cut at a word break, not far from the limit


def test_cut_text_no_spaces():
    assert mw.cut_text("x" * 3000, 2000) == "x" * 1999 + "\u2026"


@pytest.mark.parametrize("url, hosts, ok", [
    ("https://hooks.slack.com/commands/T1DC2JH3J/397700885554/96rGlfmibIGlgcZRskXaIFfN", "hooks.slack.com", True),
    ("HTTPS://HOOKS.SLACK.COM/commands/x", "hooks.slack.com", True),
    ("https://hooks.slack.com/x", "Hooks.Slack.com", True),
    ("https://hooks.slack.com:443/x", "hooks.slack.com", True),
    ("http://127.0.0.1:8080/hook", "127.0.0.1:8080", True),
    ("http://127.0.0.1:8080/hook", "localhost, 127.0.0.1", True),
    ("http://127.0.0.1:9090/hook", "127.0.0.1:8080", False),
    ("https://evil.example/x", "hooks.slack.com", False),
    ("https://hooks.slack.com.evil.example/x", "hooks.slack.com", False),
    ("https://evilhooks.slack.com/x", "hooks.slack.com", False),
    ("https://hooks.slack.com@evil.example/x", "hooks.slack.com", False),  # user info, not the host
    ("ftp://hooks.slack.com/x", "hooks.slack.com", False),
    ("javascript:alert(1)", "hooks.slack.com", False),
    ("//hooks.slack.com/x", "hooks.slack.com", False),
    ("hooks.slack.com/x", "hooks.slack.com", False),
    ("https://hooks.slack.com/x", "", False),
    ("", "hooks.slack.com", False),
    ("https://[::1/x", "hooks.slack.com", False),  # malformed: refused, not an exception
], ids=["slack", "uppercase-url", "uppercase-allowlist", "default-port", "host-port", "host-in-list", "other-port",
        "other-host", "suffix-trick", "prefix-trick", "userinfo-trick", "ftp", "javascript", "no-scheme",
        "no-scheme-2", "empty-allowlist", "empty-url", "malformed"])
def test_host_allowed(url, hosts, ok):
    assert mw.host_allowed(url, hosts) is ok


DISCORD_EXAMPLE = json.loads(
    '{"type":2,"token":"A_UNIQUE_TOKEN","id":"786008729715212338","application_id":"775799577604522054",'
    '"guild_id":"290926798626357999","channel_id":"645027906669510667",'
    '"member":{"user":{"id":"53908232506183680","username":"Mason"},"roles":[],"permissions":"2147483647"},'
    '"data":{"options":[{"type":3,"name":"cardname","value":"The Gitrog Monster"}],"type":1,"name":"cardsearch",'
    '"id":"771825006014889984"}}')


@pytest.mark.parametrize("interaction, expected", [
    (DISCORD_EXAMPLE, "/cardsearch cardname=The Gitrog Monster"),
    ({"type": 2, "data": {"name": "ping"}}, "/ping"),
    ({"type": 2, "data": {"name": "roll", "options": [{"name": "sides", "type": 4, "value": 20},
                                                      {"name": "private", "type": 5, "value": True}]}},
     "/roll sides=20 private=True"),
    ({"type": 2, "data": {"name": "config", "options": [
        {"name": "set", "type": 1, "options": [{"name": "key", "type": 3, "value": "a"}]}]}}, "/config set key=a"),
    ({"type": 2, "data": {"name": "admin", "options": [{"name": "users", "type": 2, "options": [
        {"name": "ban", "type": 1, "options": [{"name": "user", "type": 6, "value": "123"}]}]}]}},
     "/admin users ban user=123"),
    ({"type": 2, "data": {"name": "queue", "options": [{"name": "clear", "type": 1, "options": []}]}}, "/queue clear"),
    ({"type": 2, "data": {"name": "queue", "options": [{"name": "clear", "type": 1}]}}, "/queue clear"),
    ({"type": 3, "data": {"custom_id": "approve", "component_type": 2}}, "approve"),
    ({"type": 3, "data": {"custom_id": "pick", "component_type": 3, "values": ["a", "b"]}}, "pick a b"),
    ({"type": 5, "data": {"custom_id": "feedback", "components": [
        {"type": 1, "components": [{"type": 4, "custom_id": "reason", "value": "because"}]}]}},
     "feedback reason=because"),
], ids=["example", "no-options", "typed-options", "subcommand", "subcommand-group", "subcommand-empty-options",
        "subcommand-without-options", "button", "select", "modal"])
def test_discord_message(interaction, expected):
    assert mw.discord_message(interaction) == expected
