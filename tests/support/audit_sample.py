"""A sample audit log with known values, written by the real AuditLog, for the
``egress-guard audit`` readers (verify, summary, learn) and the tamper tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress_guard.cli import app as cli
from egress_guard.engine import Decision
from egress_guard.sinks.audit import AuditLog
from egress_guard.sinks.events import CloseEvent, DecisionEvent, PolicyEvent

SHA = "cd" * 32


def dec(
    i: int,
    host: str,
    port: int | None,
    action: str,
    reason: str,
    dest: str | None = None,
) -> DecisionEvent:
    d = Decision(action != "block", action, reason, dest, host, port)  # type: ignore[arg-type]
    return DecisionEvent(
        conn_id=f"c{i}",
        client="127.0.0.1",
        decision=d,
        mode="enforce",
        policy_sha256=SHA,
        sni=None,
        method=None,
        path=None,
    )


def closed(i: int, host: str, dest: str | None, up: int, down: int) -> CloseEvent:
    return CloseEvent(
        conn_id=f"c{i}",
        client="127.0.0.1",
        host=host,
        port=443,
        destination=dest,
        decision="allow",
        bytes_up=up,
        bytes_down=down,
        duration_s=0.25,
        mode="enforce",
        policy_sha256=SHA,
    )


def write_sample(path: Path) -> None:
    """14 lines: startup, policy_loaded, then decisions and closes with known values."""
    with AuditLog(path) as log:
        log.policy(PolicyEvent(True, "policy.yaml", SHA, 1, "enforce"))
        log.decision(dec(1, "api.anthropic.com", 443, "allow", "allowlisted", "anthropic"))
        log.close(closed(1, "api.anthropic.com", "anthropic", 100, 2000))
        log.decision(dec(2, "api.anthropic.com", 443, "allow", "allowlisted", "anthropic"))
        log.close(closed(2, "api.anthropic.com", "anthropic", 50, 500))
        log.decision(dec(3, "models.opencode.ai", 443, "would_block", "not_allowlisted"))
        log.decision(dec(4, "github.com", 443, "block", "not_allowlisted"))
        log.decision(dec(5, "example.org", 8443, "block", "not_allowlisted"))
        log.decision(dec(6, "example.org", 8443, "block", "not_allowlisted"))
        log.decision(dec(7, "db.corp.example", 443, "block", "private_address", "corp"))
        log.decision(dec(8, "bad host", None, "block", "invalid_host"))
        log.decision(dec(9, "127.0.0.1", 8080, "block", "self_connection"))
        log.decision(dec(10, "", None, "block", "client_not_allowed"))


def lines_of(p: Path) -> list[bytes]:
    return p.read_bytes().split(b"\n")[:-1]


def rewrite(p: Path, lines: list[bytes]) -> None:
    p.write_bytes(b"".join(x + b"\n" for x in lines))


def run_verify(capsys: pytest.CaptureFixture[str], *files: str) -> tuple[int, str]:
    rc = cli.main(["audit", "verify", *files])
    return rc, capsys.readouterr().out


@contextlib.contextmanager
def edited_lines(path: Path) -> Iterator[list[bytes]]:
    """The log's lines, to tamper with in place; written back when the block ends."""
    lines = lines_of(path)
    yield lines
    rewrite(path, lines)
