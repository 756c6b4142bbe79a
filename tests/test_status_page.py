"""The live status page (``/`` on the metrics listener): its sink (``StatusBoard``), what
the listener serves, and the whole path through a real proxy. The browser test is in
test_status_page_browser.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support.clients import curl
from support.policies import make_policy
from support.ports import free_port
from support.proxy import ProxyFactory

from egress_guard.engine import Decision
from egress_guard.sinks import status as status_mod
from egress_guard.sinks.events import CloseEvent, DecisionEvent, PolicyEvent
from egress_guard.sinks.metrics import Metrics
from egress_guard.sinks.metrics_http import MetricsServer, start_http_server
from egress_guard.sinks.status import MAX_DESTINATIONS, RECENT, StatusBoard


def decision(
    action: str,
    destination: str | None,
    host: str = "api.example",
    reason: str = "policy_allow",
    path: str | None = None,
    method: str | None = None,
    catalog: str | None = None,
) -> DecisionEvent:
    d = Decision(
        allowed=action == "allow",
        action=action,  # type: ignore[arg-type]
        reason=reason,  # type: ignore[arg-type]
        destination=destination,
        host=host,
        port=443,
        catalog=catalog,
    )
    return DecisionEvent(
        conn_id="c1",
        client="127.0.0.1:5000",
        decision=d,
        mode="enforce",
        policy_sha256="sha",
        method=method,
        path=path,
    )


def closed(destination: str | None, up: int, down: int) -> CloseEvent:
    return CloseEvent(
        conn_id="c1",
        client="127.0.0.1:5000",
        host="h",
        port=443,
        destination=destination,
        decision="allow",
        bytes_up=up,
        bytes_down=down,
        duration_s=1.0,
        mode="enforce",
        policy_sha256="sha",
    )


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


class FakeAudit:
    healthy = True
    write_errors = 0
    events_dropped = 0


def test_snapshot_policy_counts_and_recent_newest_first() -> None:
    clock = Clock()
    audit = FakeAudit()
    board = StatusBoard(audit=audit, clock=clock)
    board.policy(
        PolicyEvent(True, "/etc/eg/policy.yaml", "abc123", 3, "enforce", destinations=("a", "b"))
    )
    board.decision(decision("allow", "a", host="one.example"))
    clock.t += 5
    board.decision(
        decision("block", None, host="evil.example", reason="not_allowlisted", catalog="models")
    )
    board.decision(decision("would_block", "b", host="two.example"))
    board.close(closed("a", 100, 2000))
    board.policy(PolicyEvent(False, "/etc/eg/policy.yaml", None, 3, None, error="bad key"))
    clock.t += 60
    s = board.snapshot(healthy=True)

    assert s["uptime_s"] == 65.0
    assert s["healthy"] is True
    p = s["policy"]
    assert (p["source"], p["sha256"], p["version"], p["mode"], p["destinations"]) == (
        "/etc/eg/policy.yaml",
        "abc123",
        3,
        "enforce",
        2,
    )
    assert (p["reloads_ok"], p["reloads_error"]) == (1, 1)
    assert p["last_error"]["error"] == "bad key"
    assert s["audit"] == {
        "configured": True,
        "healthy": True,
        "write_errors": 0,
        "events_dropped": 0,
    }
    rows = {d["name"]: d for d in s["destinations"]}
    assert set(rows) == {"a", "b", "unlisted"}
    assert (
        rows["a"]["allow"],
        rows["a"]["connections"],
        rows["a"]["bytes_up"],
        rows["a"]["bytes_down"],
    ) == (1, 1, 100, 2000)
    assert rows["unlisted"]["block"] == 1
    assert rows["b"]["would_block"] == 1
    assert [r["host"] for r in s["recent"]] == ["two.example", "evil.example", "one.example"]
    assert [r["host"] for r in s["recent_blocks"]] == ["two.example", "evil.example"]
    evil = s["recent"][1]
    assert (evil["decision"], evil["reason"], evil["catalog"], evil["client"], evil["port"]) == (
        "block",
        "not_allowlisted",
        "models",
        "127.0.0.1:5000",
        443,
    )
    assert evil["user"] is None  # no proxy user recorded: an empty cell
    json.dumps(s, allow_nan=False)  # what the page gets: plain JSON

    audit.healthy = False
    assert board.snapshot()["audit"]["healthy"] is False


def test_blocks_are_kept_apart_from_a_burst_of_allowed_traffic() -> None:
    board = StatusBoard()
    board.decision(decision("block", None, host="evil.example", reason="not_allowlisted"))
    for _ in range(RECENT + 10):
        board.decision(decision("allow", "a"))
    s = board.snapshot()
    assert len(s["recent"]) == RECENT
    assert all(r["decision"] == "allow" for r in s["recent"])
    assert [r["host"] for r in s["recent_blocks"]] == ["evil.example"]


def test_destination_rows_are_bounded() -> None:
    board = StatusBoard()
    for i in range(MAX_DESTINATIONS + 50):
        board.decision(decision("allow", f"rule-{i}"))
    rows = board.snapshot()["destinations"]
    assert len(rows) == MAX_DESTINATIONS + 1
    assert {d["name"]: d for d in rows}["(other)"]["allow"] == 50


def test_only_what_the_audit_log_shows() -> None:
    """The page renders decisions with the audit log's own fields and redaction."""
    board = StatusBoard()
    board.decision(
        decision(
            "block", None, host="u:pw@evil.example", method="GET", path="/v1?key=sk-SECRET;tok=x"
        )
    )
    text = json.dumps(board.snapshot())
    assert "SECRET" not in text and "pw@" not in text
    assert board.snapshot()["recent"][0]["path"].startswith("/v1")


def test_the_proxy_user_is_shown_when_the_record_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    real = status_mod.record_fields
    monkeypatch.setattr(status_mod, "record_fields", lambda ev: {**real(ev), "user": "alice"})
    board = StatusBoard()
    board.decision(decision("block", None))
    assert board.snapshot()["recent"][0]["user"] == "alice"


# -- the listener --------------------------------------------------------------------------


@pytest.fixture
def board() -> StatusBoard:
    return StatusBoard()


@pytest.fixture
def server(board: StatusBoard) -> Iterator[MetricsServer]:
    srv = start_http_server(Metrics(), "127.0.0.1", 0, lambda: True, status=board)
    try:
        yield srv
    finally:
        srv.stop()


def test_page_and_assets_are_served_self_contained(server: MetricsServer) -> None:
    with httpx.Client() as c:
        page = c.get(f"{server.url}/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assets = {
            "/status.js": "text/javascript",
            "/status.css": "text/css",
        }
        bodies = [page.text]
        for path, ctype in assets.items():
            r = c.get(f"{server.url}{path}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
            bodies.append(r.text)
        # nothing fetched from anywhere else (air-gapped sites): no absolute URL at all
        for body in bodies:
            assert not re.search(r"(https?:)?//[a-z0-9]", body, re.I), body[:200]
        # client text goes in as text, never as markup
        assert not re.search(
            r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", bodies[1]
        )
        # the old endpoints are unchanged
        assert c.get(f"{server.url}/metrics").status_code == 200
        assert c.get(f"{server.url}/healthz").text == "ok\n"
        assert c.get(f"{server.url}/nope").status_code == 404


def test_status_json_is_the_snapshot(server: MetricsServer, board: StatusBoard) -> None:
    board.decision(decision("block", None, host="evil.example", reason="not_allowlisted"))
    r = httpx.get(f"{server.url}/status.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["healthy"] is True
    assert body["recent"][0]["host"] == "evil.example"


@pytest.mark.parametrize("broken", [lambda: False, lambda: 1 / 0])
def test_status_json_says_when_the_guard_is_unhealthy(board: StatusBoard, broken: Any) -> None:
    srv = start_http_server(Metrics(), "127.0.0.1", 0, broken, status=board)
    try:
        assert httpx.get(f"{srv.url}/status.json").json()["healthy"] is False
    finally:
        srv.stop()


def test_without_a_board_the_page_is_not_served() -> None:
    srv = start_http_server(Metrics(), "127.0.0.1", 0, lambda: True)
    try:
        assert httpx.get(f"{srv.url}/").status_code == 404
        assert httpx.get(f"{srv.url}/status.json").status_code == 404
    finally:
        srv.stop()


# -- through the real proxy ---------------------------------------------------------------


def status(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/status.json", timeout=5)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def test_real_proxy_shows_a_block_with_its_policy(proxy: ProxyFactory, http_upstream: Any) -> None:
    mport = free_port()
    p = proxy(make_policy(http_upstream.port), "--metrics", f"127.0.0.1:{mport}")
    url = f"http://127.0.0.1:{mport}"
    assert "egress-guard status" in httpx.get(f"{url}/", timeout=5).text
    assert curl(p.url, f"http://other.test:{http_upstream.port}/x?token=sk-SECRET").code == 403
    assert curl(p.url, f"http://api.test:{http_upstream.port}/ok").code == 200
    blocks = p.wait_audit(lambda r: r["decision"] == "block")
    loaded = p.audit("policy_loaded")[-1]
    s = status(url)
    assert s["policy"]["sha256"] == loaded["policy_sha256"]
    assert s["policy"]["destinations"] == 2
    assert s["audit"]["configured"] and s["audit"]["healthy"]
    top = s["recent_blocks"][0]
    assert (top["host"], top["port"], top["reason"]) == (
        "other.test",
        http_upstream.port,
        blocks[0]["reason"],
    )
    assert "SECRET" not in json.dumps(s)
    rows = {d["name"]: d for d in s["destinations"]}
    assert rows["unlisted"]["block"] >= 1 and rows["test-api"]["allow"] >= 1
