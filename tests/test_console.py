"""Decision lines on the proxy's stderr (``sinks/console.py``): one per block, one per
allow with ``--verbose``, also when the audit log goes to a file; escaped; bounded."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from support.clients import curl, send_raw
from support.policies import make_policy
from support.proxy import ProxyFactory
from support.upstream import Upstream

from egress_guard.engine import Decision
from egress_guard.sinks.audit.record import record_fields
from egress_guard.sinks.console import Console, describe
from egress_guard.sinks.events import DecisionEvent


def _event(host: str = "evil.test", action: str = "block", **kw: object) -> DecisionEvent:
    d = Decision(
        allowed=action == "allow",
        action=action,  # type: ignore[arg-type]
        reason="allowlisted" if action == "allow" else "not_allowlisted",
        destination=None,
        host=host,
        port=443,
        hint="add it to policy.yaml:3",
    )
    return DecisionEvent(
        conn_id="c1", client="127.0.0.1:5000", decision=d, mode="enforce", policy_sha256="x", **kw
    )  # type: ignore[arg-type]


def _lines(wait_for: str, p: object, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in p.log().splitlines() if "egress_guard.decisions" in ln]  # type: ignore[attr-defined]
        if any(wait_for in ln for ln in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_block_line_on_stderr_when_audit_log_is_a_file(
    proxy: ProxyFactory, http_upstream: Upstream, tmp_path: Path
) -> None:
    p = proxy(make_policy(http_upstream.port))  # --audit-log FILE (support/proxy.py)
    assert curl(p.url, f"http://api.test:{http_upstream.port}/ok").code == 200
    r = curl(p.url, f"http://other.test:{http_upstream.port}/secret?key=sk-LEAK")
    assert r.code == 403
    lines = _lines("BLOCK", p)
    blocks = [ln for ln in lines if " BLOCK " in ln]
    assert len(blocks) == 1, lines
    line = blocks[0]
    assert f"GET other.test:{http_upstream.port}/secret" in line
    assert "not_allowlisted" in line and "from 127.0.0.1" in line and "hint:" in line
    assert "sk-LEAK" not in p.log()  # the query is not shown (as in the audit log)
    assert not any(" ALLOW " in ln for ln in lines)  # allows only with --verbose
    assert len(p.wait_audit(lambda r: r["decision"] == "block")) == 1


def test_allow_lines_with_verbose(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    p = proxy(make_policy(http_upstream.port), "--verbose")
    assert curl(p.url, f"http://api.test:{http_upstream.port}/ok").code == 200
    lines = _lines("ALLOW", p)
    assert any(
        f" ALLOW GET api.test:{http_upstream.port}/ok allowlisted" in ln
        and "(destination test-api)" in ln
        for ln in lines
    ), lines


def test_client_text_is_escaped_on_stderr(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    p = proxy(make_policy(http_upstream.port))
    # an escape sequence and a bidi override in the Host header (mitmproxy refuses them
    # in the request line itself, with a 400 before the guard sees the request)
    raw = (
        f"GET http://api.test:{http_upstream.port}/ HTTP/1.1\r\n"
        f"Host: api.\x1b]0;pwned\x07\u202etest:{http_upstream.port}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    sock, resp = send_raw(p.port, raw)
    sock.close()
    assert resp.headers.get("x-egress-guard-decision") == "block", resp
    lines = _lines("BLOCK", p)
    # the detail quotes the Host header, escaped (and redacted: ";..." could be a secret)
    assert any(" BLOCK " in ln and "host 'api.\\x1b]0;" in ln for ln in lines), lines
    text = p.log_path.read_bytes()
    assert b"\x1b" not in text and "\u202e".encode() not in text and b"\x07" not in text


def test_describe_escapes_and_keeps_one_line() -> None:
    rec = record_fields(_event(host="a\x1b[2Jb.test\n2026 ALLOW fake", sni="x\u202ey"))
    line = describe(rec)
    assert "\n" not in line and "\x1b" not in line and "\u202e" not in line
    assert "\\x1b[2J" in line and "\\x0a2026 ALLOW fake" in line
    assert line.startswith("BLOCK ")  # no ts in record_fields: none shown


def test_describe_an_audit_line() -> None:
    rec = {
        "ts": "2026-01-31T12:00:00.000Z",
        "event": "decision",
        "host": "2001:db8::1",
        "port": 443,
        "method": "CONNECT",
        "decision": "would_block",
        "reason": "not_allowlisted",
        "client": "10.0.0.5:40000",
        "user": "ci-bot",
        "catalog": "npm-registry",
        "mode": "audit",
        "hint": "use: npm-registry",
    }
    assert describe(rec) == (
        "2026-01-31T12:00:00.000Z WOULD_BLOCK CONNECT [2001:db8::1]:443 not_allowlisted "
        "from 10.0.0.5:40000 user ci-bot (catalog npm-registry) - hint: use: npm-registry"
    )


def test_console_bounds_lines_per_second(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    c = Console(logger=logging.getLogger("t.console"), clock=lambda: now[0], max_per_s=3)
    with caplog.at_level(logging.INFO, logger="t.console"):
        for _ in range(10):
            c.decision(_event())
        c.decision(_event(action="allow"))  # not shown without allows
        assert len(caplog.records) == 3
        now[0] = 101.2
        c.decision(_event())
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 5, msgs
    assert "7 decision lines left out" in msgs[3]
    assert msgs[4].startswith("BLOCK evil.test:443 not_allowlisted")
