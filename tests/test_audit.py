"""The audit log sink: chain, restart, rotation, fsync, failures, secrets.

Real files, the real writer thread, real faults (/dev/full, a directory in the way).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.prereq import missing
from support.rotated import rotated_set

from egress_guard.engine import Decision
from egress_guard.sinks.audit import (
    GENESIS,
    AuditLog,
    read_tail,
    scrub_path,
    scrub_text,
    writer,
)
from egress_guard.sinks.audit.read import order_files
from egress_guard.sinks.audit.verify import verify
from egress_guard.sinks.events import CloseEvent, DecisionEvent, PolicyEvent

SHA = "ab" * 32
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
PY = sys.executable


def decision(
    i: int = 0,
    host: str = "api.anthropic.com",
    port: int | None = 443,
    action: str = "allow",
    reason: str = "allowlisted",
    destination: str | None = "anthropic",
    path: str | None = "/v1/messages",
    detail: str | None = None,
) -> DecisionEvent:
    d = Decision(action != "block", action, reason, destination, host, port, None, detail)  # type: ignore[arg-type]
    return DecisionEvent(
        conn_id=f"conn-{i}",
        client="127.0.0.1",
        decision=d,
        mode="enforce",
        policy_sha256=SHA,
        sni=host,
        method="POST",
        path=path,
    )


def close(i: int = 0, up: int = 100, down: int = 2000, error: str | None = None) -> CloseEvent:
    return CloseEvent(
        conn_id=f"conn-{i}",
        client="127.0.0.1",
        host="api.anthropic.com",
        port=443,
        destination="anthropic",
        decision="allow",
        bytes_up=up,
        bytes_down=down,
        duration_s=1.2345,
        mode="enforce",
        policy_sha256=SHA,
        error=error,
    )


def raw_lines(*paths: Path) -> list[bytes]:
    out: list[bytes] = []
    for p in paths:
        data = p.read_bytes()
        assert data.endswith(b"\n")
        out += data.split(b"\n")[:-1]
    return out


def objs(*paths: Path) -> list[dict[str, Any]]:
    return [json.loads(r) for r in raw_lines(*paths)]


def assert_chain(lines: list[bytes], start_prev: str = GENESIS, start_seq: int = 1) -> None:
    prev, seq = start_prev, start_seq
    for raw in lines:
        o = json.loads(raw)
        assert o["prev"] == prev
        assert o["seq"] == seq
        prev, seq = hashlib.sha256(raw).hexdigest(), seq + 1


def wait_for(cond: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


@pytest.fixture
def logpath(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


# -- format and chain ------------------------------------------------------------------------


def test_fresh_log_fields_and_chain(logpath: Path) -> None:
    log = AuditLog(logpath, policy_sha256=SHA)
    log.policy(PolicyEvent(True, "/etc/eg/policy.yaml", SHA, 1, "enforce"))
    log.policy(PolicyEvent(False, "/etc/eg/policy.yaml", None, 1, None, "bad: line 3"))
    log.decision(decision(1, detail="resolved to 10.0.0.1"))
    log.close(close(1))
    assert log.flush()
    assert log.healthy
    assert log.shutdown()

    lines = raw_lines(logpath)
    assert_chain(lines)
    o = [json.loads(r) for r in lines]
    assert [x["event"] for x in o] == [
        "startup",
        "policy_loaded",
        "policy_loaded",
        "decision",
        "close",
    ]
    assert all(TS_RE.match(x["ts"]) for x in o)
    assert o[0]["pid"] == os.getpid() and o[0]["policy_sha256"] == SHA and o[0]["version"]
    assert o[1] | {"ts": None, "prev": None} == {
        "ts": None,
        "seq": 2,
        "event": "policy_loaded",
        "result": "ok",
        "source": "/etc/eg/policy.yaml",
        "policy_sha256": SHA,
        "policy_version": 1,
        "mode": "enforce",
        "error": None,
        "prev": None,
    }
    assert o[2]["result"] == "error" and o[2]["error"] == "bad: line 3"
    assert {k: o[3][k] for k in o[3] if k not in ("ts", "prev")} == {
        "seq": 4,
        "event": "decision",
        "id": "conn-1",
        "client": "127.0.0.1",
        "user": None,
        "host": "api.anthropic.com",
        "port": 443,
        "sni": "api.anthropic.com",
        "method": "POST",
        "path": "/v1/messages",
        "decision": "allow",
        "reason": "allowlisted",
        "destination": "anthropic",
        "catalog": None,
        "mode": "enforce",
        "policy_sha256": SHA,
        "detail": "resolved to 10.0.0.1",
        "hint": None,
    }
    assert (o[4]["bytes_up"], o[4]["bytes_down"], o[4]["duration_ms"]) == (100, 2000, 1234)
    assert log.lines_written == 5 and log.last_seq == 5
    assert log.head == hashlib.sha256(lines[-1]).hexdigest()
    assert verify([str(logpath)], require_start=True).ok
    # owner-only: the log names clients and destinations
    assert logpath.stat().st_mode & 0o077 == 0


def test_no_secrets_are_written(logpath: Path) -> None:
    with AuditLog(logpath) as log:
        log.decision(decision(1, path="/v1/models?key=SECRET1&x=y"))
        log.decision(decision(2, path="http://user:SECRET2@example.com/p?api-key=SECRET3#frag"))
        log.decision(decision(3, detail="Host 'a.example?token=SECRET4' does not match"))
        log.close(close(3, error="upstream said GET /x?access_token=SECRET5"))
        log.policy(PolicyEvent(False, "p.yaml", None, 1, None, "fetch /p?sig=SECRET6 failed"))
    text = logpath.read_text()
    assert "SECRET" not in text
    o = objs(logpath)
    assert o[1]["path"] == "/v1/models"
    assert o[2]["path"] == "http://example.com/p"
    assert "?<query removed>" in o[3]["detail"]
    assert "api-key" not in text and "authorization" not in text.lower()


def test_scrub_helpers() -> None:
    assert scrub_path("/a/b?c=d") == "/a/b"
    assert scrub_path("/a#x?y=z") == "/a"
    assert scrub_path("https://u:p@h.example:8443/x?y") == "https://h.example:8443/x"
    assert scrub_path(None) is None
    assert scrub_path("/" + "a" * 5000) is not None
    assert len(scrub_path("/" + "a" * 5000) or "") < 2100
    assert scrub_text("see /x?k=v now") == "see /x?<query removed> now"
    assert scrub_text("did you mean 'deny'?") == "did you mean 'deny'?"


# -- restart ---------------------------------------------------------------------------------


def test_restart_appends_and_continues_the_chain(logpath: Path) -> None:
    with AuditLog(logpath) as log:
        for i in range(3):
            log.decision(decision(i))
    first = logpath.read_bytes()
    with AuditLog(logpath) as log:
        for i in range(3, 5):
            log.decision(decision(i))
    data = logpath.read_bytes()
    assert data.startswith(first)  # append-only: not a byte of the first run changed
    lines = raw_lines(logpath)
    assert len(lines) == 4 + 3
    assert_chain(lines)
    restart = json.loads(lines[4])
    assert restart["event"] == "startup"
    assert restart["prev"] == hashlib.sha256(lines[3]).hexdigest()
    assert restart["seq"] == 5
    assert verify([str(logpath)], require_start=True).ok


def test_restart_seals_a_torn_last_line(logpath: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with AuditLog(logpath) as log:
        log.decision(decision(1))
    torn = b'{"ts":"2025-01-01T00:00:00.000Z","seq":3,"event":"deci'
    with logpath.open("ab") as f:
        f.write(torn)
    assert not verify([str(logpath)]).ok  # a cut-off line is reported ...
    with AuditLog(logpath) as log:
        log.decision(decision(2))
    assert "incomplete" in capsys.readouterr().err
    parts = logpath.read_bytes().split(b"\n")
    assert parts[2] == torn  # ... kept as it was, and sealed
    start = json.loads(parts[3])
    assert start["recovered"] == "torn_line"
    assert start["prev"] == hashlib.sha256(torn).hexdigest()
    assert start["seq"] == 3  # the torn line never got a number in the chain
    res = verify([str(logpath)], require_start=True)
    assert res.ok, res.broken
    assert any("interrupted write" in n for n in res.notes)


def test_restart_chains_from_rotated_file_when_current_is_empty(logpath: Path) -> None:
    with AuditLog(logpath) as log:
        log.decision(decision(1))
    logpath.rename(f"{logpath}.1")
    logpath.write_bytes(b"")
    with AuditLog(logpath) as log:
        log.decision(decision(2))
    assert json.loads(raw_lines(logpath)[0])["seq"] == 3
    assert verify([f"{logpath}.1", str(logpath)], require_start=True).ok


def test_read_tail_of_missing_and_empty(tmp_path: Path) -> None:
    assert read_tail(str(tmp_path / "nope")) is None
    (tmp_path / "empty").write_bytes(b"")
    assert read_tail(str(tmp_path / "empty")) is None


# -- rotation --------------------------------------------------------------------------------


def test_rotation_keeps_the_chain_across_files(logpath: Path) -> None:
    with AuditLog(logpath, max_bytes=2000, backups=50) as log:
        for i in range(40):
            log.decision(decision(i))
    files = rotated_set(str(logpath))
    assert len(files) > 5
    assert log.rotations == len(files) - 1
    for f in files:
        assert 0 < os.path.getsize(f) <= 2000
    paths = [Path(f) for f in files]
    lines = raw_lines(*paths)
    assert len(lines) == 41
    assert_chain(lines)
    # each newer file's first line chains from the last line of the older one
    for older, newer in itertools.pairwise(paths):
        assert (
            json.loads(raw_lines(newer)[0])["prev"]
            == hashlib.sha256(raw_lines(older)[-1]).hexdigest()
        )
    # `audit verify audit.log*` gives them in shell order; they are put oldest first
    shell_order = sorted(files)
    assert order_files(shell_order) == files
    assert verify(files, require_start=True).ok
    assert not verify(shell_order).ok


def test_rotation_keeps_only_backups_files(logpath: Path) -> None:
    with AuditLog(logpath, max_bytes=1500, backups=2) as log:
        for i in range(30):
            log.decision(decision(i))
    files = rotated_set(str(logpath))
    assert [os.path.basename(f) for f in files] == ["audit.log.2", "audit.log.1", "audit.log"]
    res = verify(files)
    assert res.ok and res.first_seq is not None and res.first_seq > 1
    assert any("rotated away" in n for n in res.notes)
    strict = verify(files, require_start=True)
    assert strict.broken is not None and strict.broken.kind == "incomplete"
    assert res.last_seq == 31


# -- fsync -------------------------------------------------------------------------------------


class FsyncSpy:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay
        self.real = os.fsync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        time.sleep(self.delay)
        self.real(fd)


def test_fsync_always_syncs_every_write(logpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = FsyncSpy()
    monkeypatch.setattr(os, "fsync", spy)
    log = AuditLog(logpath, fsync="always", max_bytes=0)
    for i in range(5):
        log.decision(decision(i))
        assert log.flush()
    log.shutdown()
    assert spy.calls >= 6  # the startup line and each flushed event
    assert log.fsyncs == spy.calls


def test_fsync_never(logpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = FsyncSpy()
    monkeypatch.setattr(os, "fsync", spy)
    log = AuditLog(logpath, fsync="never", max_bytes=0)
    for i in range(5):
        log.decision(decision(i))
    assert log.flush()
    log.shutdown()
    assert spy.calls == 0 and log.fsyncs == 0
    assert len(raw_lines(logpath)) == 6  # written all the same


def test_fsync_interval_is_timer_driven_and_batched(
    logpath: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = FsyncSpy()
    monkeypatch.setattr(os, "fsync", spy)
    log = AuditLog(logpath, fsync="interval", fsync_interval=0.2, max_bytes=0)
    for i in range(200):
        log.decision(decision(i))
    # no flush(): the writer syncs on its own once the interval has passed
    assert wait_for(lambda: spy.calls >= 1, 3.0)
    assert wait_for(lambda: log.queue_depth == 0 and not log._dirty, 3.0)
    assert spy.calls <= 3  # 201 lines, a handful of syncs
    log.shutdown()


def test_event_methods_do_not_wait_for_the_disk(
    logpath: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", FsyncSpy(delay=0.3))
    log = AuditLog(logpath, fsync="always", max_bytes=0)
    t0 = time.perf_counter()
    for i in range(200):
        log.decision(decision(i))
    elapsed = time.perf_counter() - t0
    # writing in the caller would take 200 x 0.3 s; one slow fsync alone takes 0.3 s
    assert elapsed < 0.25, elapsed
    assert log.shutdown()
    assert len(raw_lines(logpath)) == 201


def test_shutdown_writes_everything_queued(logpath: Path) -> None:
    log = AuditLog(logpath, fsync="never")
    for i in range(3000):
        log.decision(decision(i))
    assert log.shutdown()  # no flush first
    lines = raw_lines(logpath)
    assert len(lines) == 3001
    assert_chain(lines)
    assert log.events_dropped == 0


def test_events_after_shutdown_are_counted_not_silent(logpath: Path) -> None:
    log = AuditLog(logpath)
    log.shutdown()
    assert not log.healthy
    log.decision(decision(1))
    assert log.events_dropped == 1
    assert not log.flush(timeout=0.1)


# -- failures --------------------------------------------------------------------------------


def test_unwritable_path_is_unhealthy_then_recovers(
    logpath: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logpath.mkdir()  # a directory where the log should be: open() fails with EISDIR
    log = AuditLog(logpath, retry_interval=0.05)
    try:
        assert not log.healthy  # at once: the constructor tried
        assert log.write_errors >= 1
        assert log.last_error is not None and str(logpath) in log.last_error
        assert "cannot be written" in capsys.readouterr().err
        log.decision(decision(1))
        assert wait_for(lambda: log.write_errors >= 3)  # it keeps retrying
        assert not log.healthy
        logpath.rmdir()
        assert wait_for(lambda: log.healthy)
        assert log.flush()
        assert "writable again" in capsys.readouterr().err
    finally:
        log.shutdown()
    o = objs(logpath)
    assert [x["event"] for x in o] == ["startup", "decision"]
    assert verify([str(logpath)], require_start=True).ok


def test_disk_full_flips_healthy(capsys: pytest.CaptureFixture[str]) -> None:
    if not os.path.exists("/dev/full"):
        missing("no /dev/full")
    log = AuditLog("/dev/full", retry_interval=0.05)
    try:
        assert not log.healthy
        assert log.last_error is not None and "No space left" in log.last_error
        errors = log.write_errors
        assert wait_for(lambda: log.write_errors > errors)
        log.decision(decision(1))
        assert not log.healthy
        assert not log.flush(timeout=0.2)
    finally:
        assert not log.shutdown(timeout=2)  # it could not write: say so
    assert "No space left" in capsys.readouterr().err


def test_write_failure_mid_run(logpath: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = AuditLog(logpath, retry_interval=0.05, fsync="never")
    try:
        log.decision(decision(1))
        assert log.flush() and log.healthy
        fd = log._fd
        assert fd is not None
        ro = os.open(os.devnull, os.O_RDONLY)
        os.dup2(ro, fd)  # the log's descriptor now refuses writes (EBADF)
        os.close(ro)
        log.decision(decision(2))
        assert wait_for(lambda: not log.healthy)
        assert log.write_errors >= 1
        assert "cannot be written" in capsys.readouterr().err
    finally:
        log.shutdown(timeout=1)


def test_queue_and_overflow_full_makes_unhealthy_and_the_loss_is_logged(logpath: Path) -> None:
    logpath.mkdir()  # the writer cannot make progress, so the queue fills
    log = AuditLog(logpath, retry_interval=0.05, queue_size=3, overflow_size=1)
    try:
        for i in range(6):
            log.decision(decision(i))
        assert log.events_dropped == 2  # 3 queued, 1 kept past the queue, 2 lost
        assert not log.healthy
        logpath.rmdir()
        assert wait_for(lambda: log.healthy)  # healthy again once the loss is on record
        assert log.flush()
    finally:
        log.shutdown()
    o = objs(logpath)
    assert [x["event"] for x in o] == ["startup"] + ["decision"] * 4 + ["dropped"]
    assert [x["id"] for x in o[1:5]] == [f"conn-{i}" for i in range(4)]
    assert (o[-1]["count"], o[-1]["reason"]) == (2, "queue_full")
    assert verify([str(logpath)]).ok


def test_unencodable_event_is_recorded_as_dropped(logpath: Path) -> None:
    bad = DecisionEvent(
        conn_id="c", client="127.0.0.1", decision=None, mode="enforce", policy_sha256=SHA
    )  # type: ignore[arg-type]
    with AuditLog(logpath) as log:
        log.decision(bad)
        log.decision(decision(1))
        assert log.flush()
        assert wait_for(lambda: log.healthy)
    o = objs(logpath)
    assert [x["event"] for x in o] == ["startup", "decision", "dropped"]
    assert o[-1]["reason"] == "encode_error"


def test_second_writer_on_the_same_file_is_refused(logpath: Path) -> None:
    first = AuditLog(logpath, retry_interval=0.05)
    second = AuditLog(logpath, retry_interval=0.05)
    try:
        assert first.healthy
        assert not second.healthy  # it would fork the chain
        assert second.last_error is not None and "another egress-guard" in second.last_error
        first.decision(decision(1))
        assert first.shutdown()
        assert wait_for(lambda: second.healthy)  # the lock is free: it takes over
        second.decision(decision(2))
    finally:
        first.shutdown()
        second.shutdown()
    assert [x["event"] for x in objs(logpath)] == ["startup", "decision", "startup", "decision"]
    assert verify([str(logpath)], require_start=True).ok


def test_constructor_rejects_bad_settings(logpath: Path) -> None:
    with pytest.raises(ValueError):
        AuditLog(logpath, fsync="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AuditLog(logpath, max_bytes=100, backups=0)


# -- stdout -----------------------------------------------------------------------------------


def test_stdout_mode_writes_a_verifiable_chain(tmp_path: Path) -> None:
    script = (
        "from egress_guard.sinks.audit import AuditLog\n"
        "from egress_guard.engine import Decision\n"
        "from egress_guard.sinks.events import CloseEvent, DecisionEvent\n"
        "d = Decision(True, 'allow', 'allowlisted', 'a', 'api.anthropic.com', 443)\n"
        "log = AuditLog('-')\n"
        "log.decision(DecisionEvent(conn_id='c1', client='127.0.0.1', decision=d,"
        " mode='enforce', policy_sha256='', path='/x?k=SECRET'))\n"
        "log.close(CloseEvent(conn_id='c1', client='127.0.0.1', host='api.anthropic.com',"
        " port=443, destination='a', decision='allow', bytes_up=1, bytes_down=2,"
        " duration_s=0.1, mode='enforce', policy_sha256=''))\n"
        "assert log.shutdown()\n"
    )
    out = subprocess.run(
        [PY, "-c", script], capture_output=True, timeout=30, check=True, cwd=tmp_path
    )
    lines = out.stdout.split(b"\n")[:-1]
    assert [json.loads(x)["event"] for x in lines] == ["startup", "decision", "close"]
    assert_chain(lines)
    assert b"SECRET" not in out.stdout
    assert not list(tmp_path.iterdir())


def _wakes(thread_id: int) -> int:
    status = Path(f"/proc/self/task/{thread_id}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("voluntary_ctxt")).split()[1])


def test_idle_writer_sleeps_and_the_next_event_wakes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle proxy's audit writer does not poll (it did, 50 times a second), and an
    event after a quiet spell is written at once, not at the writer's next timeout."""
    monkeypatch.setattr(writer, "_IDLE_WAIT_S", 60.0)  # so only a wake-up can write it
    with AuditLog(tmp_path / "audit.log", fsync="interval") as log:
        log.decision(decision(0))
        assert log.flush(5)
        tid = log._thread.native_id
        assert tid is not None
        time.sleep(1.5)  # past the idle threshold, and the interval fsync is done
        before = _wakes(tid)
        time.sleep(2)
        assert _wakes(tid) - before <= 2  # not 100 polls
        written = log.lines_written
        t0 = time.monotonic()
        log.decision(decision(1))
        while log.lines_written == written and time.monotonic() - t0 < 20:
            time.sleep(0.005)
        assert log.lines_written == written + 1  # woken: its timeout is a minute away
