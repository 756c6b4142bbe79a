"""A refused client is told why where clients show it: the status line's reason phrase
(urllib, requests and OpenCode print it) and the body's ``error``, with host, port,
reason and hint; never the policy file's path; a header line of printable ASCII only.
(What the real OpenCode shows: tests/proxy/test_opencode_e2e.py.)"""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from support.clients import send_raw
from support.policies import make_policy
from support.proxy import ProxyFactory
from support.upstream import Upstream

from egress_guard.engine import Decision
from egress_guard.proxy.responses import MAX_PHRASE, block_response, reason_phrase


def test_connect_refusal_reason_phrase_and_body(proxy: ProxyFactory) -> None:
    p = proxy(make_policy(443))
    sock, resp = send_raw(
        p.port, b"CONNECT other.test:443 HTTP/1.1\r\nHost: other.test:443\r\n\r\n"
    )
    sock.close()
    assert resp.status == 403
    want = "egress-guard blocked other.test:443 (not_allowlisted): no catalog entry covers"
    assert resp.reason.startswith(f"Forbidden: {want}"), resp.reason
    assert "hosts: [other.test]" in resp.reason
    body = resp.json()
    assert body["error"].startswith(want) and body["host"] == "other.test"
    assert str(p.policy_path) not in resp.reason + resp.body.decode()
    assert "the policy" in resp.reason


def test_python_urllib_user_sees_why(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    p = proxy(make_policy(http_upstream.port))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": p.url}))
    with pytest.raises(urllib.error.HTTPError) as exc:
        opener.open(f"http://other.test:{http_upstream.port}/x", timeout=10)
    shown = str(exc.value)
    assert shown.startswith(
        f"HTTP Error 403: Forbidden: egress-guard blocked other.test:{http_upstream.port} "
        "(not_allowlisted)"
    ), shown
    assert http_upstream.seen.requests == []


def test_denied_and_unresolvable_say_their_reason(proxy: ProxyFactory) -> None:
    p = proxy(make_policy(443))
    sock, resp = send_raw(p.port, b"CONNECT x.denied.test:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.close()
    assert resp.status == 403
    assert resp.reason.startswith("Forbidden: egress-guard blocked x.denied.test:443 (denylisted)")
    sock, resp = send_raw(p.port, b"CONNECT nowhere.invalid:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.close()
    assert resp.status in (403, 502)
    assert resp.reason.startswith(f"{'Forbidden' if resp.status == 403 else 'Bad Gateway'}: ")
    assert "nowhere.invalid:443" in resp.reason


def _decision(host: str, hint: str | None = "add it") -> Decision:
    return Decision(
        allowed=False,
        action="block",
        reason="invalid_host",
        destination=None,
        host=host,
        port=443,
        hint=hint,
    )


def test_reason_phrase_is_printable_ascii_and_bounded() -> None:
    nasty = "a\r\nX-Injected: 1\x1b]0;t\x07\u202e\u00e9.test"
    phrase = reason_phrase(403, _decision(nasty))
    assert all(0x20 <= ord(c) <= 0x7E for c in phrase), phrase
    assert "\r" not in phrase and "\n" not in phrase
    long = reason_phrase(403, _decision("a.test", hint="x" * 5000))
    assert len(long) == MAX_PHRASE and long.endswith("...")
    assert reason_phrase(503, _decision("a.test", hint=None)) == (
        "Service Unavailable: egress-guard blocked a.test:443 (invalid_host)"
    )


def test_status_override_keeps_the_why() -> None:
    """The 503 for a refusal the audit log could not record says why, too."""
    resp = block_response(_decision("a.test"), status=503)
    assert resp.status_code == 503
    assert (
        resp.reason == "Service Unavailable: egress-guard blocked a.test:443 (invalid_host): add it"
    )
