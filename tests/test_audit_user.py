"""The proxy user is in every decision and close record, and ``audit summary --by user``.

Threat: with ``clients.auth`` several agents share one proxy; an operator who cannot tell
whose request was refused (or whose connection moved the bytes) cannot act on the log.
The other side of it: a name that did not prove itself (a wrong password) is the
client's text, and must never appear in the log as if it were a user.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from pathlib import Path

import httpx
from support.hygiene import plain_exchange
from support.policies import make_policy
from support.proxy import EGRESS_GUARD, ProxyFactory
from support.upstream import Upstream


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_user_in_decision_and_close_records_and_summary_by_user(
    proxy: ProxyFactory, http_upstream: Upstream, tmp_path: Path
) -> None:
    users = tmp_path / "users"
    users.write_text(f"agent-a:sha256:{hashlib.sha256(b'pw').hexdigest()}\nagent-b:pw2\n")
    extra = f"clients:\n  auth:\n    users_file: {users}\n"
    p = proxy(make_policy(http_upstream.port, extra=extra))
    up = http_upstream.port

    # an allowed plain-HTTP request (its decision and, once closed, its close record)
    with httpx.Client(proxy=f"http://agent-a:pw@{p.host}:{p.port}", trust_env=False) as c:
        assert c.get(f"http://api.test:{up}/x").status_code == 200
    # a refused CONNECT by the other user
    req = (
        f"CONNECT other.test:443 HTTP/1.1\r\nHost: other.test:443\r\n"
        f"Proxy-Authorization: Basic {_auth('agent-b', 'pw2')}\r\n\r\n"
    )
    assert plain_exchange(p, req.encode()).status == 403
    # a wrong password under a real user's name, and an unknown name
    for name, pw in (("agent-a", "wrong"), ("mallory", "x")):
        req = (
            f"GET http://api.test:{up}/y HTTP/1.1\r\nHost: api.test:{up}\r\n"
            f"Proxy-Authorization: Basic {_auth(name, pw)}\r\n\r\n"
        )
        assert plain_exchange(p, req.encode()).status == 407

    decisions = p.wait_audit(lambda r: True, count=4)
    by_outcome = {(r["host"], r["decision"], r["reason"]): r.get("user") for r in decisions}
    assert by_outcome[("api.test", "allow", "allowlisted")] == "agent-a"
    assert by_outcome[("other.test", "block", "not_allowlisted")] == "agent-b"
    refused = [r for r in decisions if r["reason"] == "proxy_auth_required"]
    assert len(refused) == 2 and all(r["user"] is None for r in refused)
    # every decision record has the field (null, not omitted)
    assert all("user" in r for r in decisions)
    closes = p.wait_audit(lambda r: True, event="close")
    assert [c["user"] for c in closes] == ["agent-a"]
    p.stop()
    assert "mallory" not in p.audit_path.read_text()

    out = subprocess.run(
        [EGRESS_GUARD, "audit", "summary", "--by", "user", str(p.audit_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line}
    # USER ALLOW BLOCK WOULD_BLOCK CONNS ...
    assert rows["agent-a"][1:5] == ["1", "0", "0", "1"]
    assert rows["agent-b"][1:5] == ["0", "1", "0", "0"]
    assert rows["-"][1:5] == ["0", "2", "0", "0"]
    assert "DESTINATION " not in out.stdout  # the per-user view, not the default one

    js = subprocess.run(
        [EGRESS_GUARD, "audit", "summary", "--json", str(p.audit_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    users_view = {u["user"]: u for u in json.loads(js.stdout)["users"]}
    assert users_view["agent-a"]["destinations"] == ["test-api"]
    assert users_view["agent-a"]["bytes_down"] > 0
    assert users_view["agent-b"]["block"] == 1
    assert users_view[None]["block"] == 2


def test_summary_by_user_escapes_names(tmp_path: Path) -> None:
    """A log is input: a user name holding terminal controls is printed escaped."""
    log = tmp_path / "audit.log"
    rec = {
        "ts": "2026-01-01T00:00:00.000Z",
        "event": "decision",
        "user": "evil\x1b]0;pwned\x07",
        "host": "x.test",
        "port": 443,
        "decision": "block",
        "reason": "not_allowlisted",
    }
    log.write_text(json.dumps(rec) + "\n")
    out = subprocess.run(
        [EGRESS_GUARD, "audit", "summary", "--by", "user", str(log)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout
    assert "evil\\x1b]0;pwned\\x07" in out.stdout
