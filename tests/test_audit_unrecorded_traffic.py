"""The audit sink's admission: traffic is forwarded only once its record is written, a
full queue makes callers wait (never drops), and nothing queued is lost at shutdown.

Unit level (real files, the real writer thread, real faults); the proxy-level threats are
in tests/adversarial/test_audit_outage_in_open_tunnel.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from egress_guard.engine import Decision
from egress_guard.sinks.audit import AuditLog, writer
from egress_guard.sinks.audit.verify import verify
from egress_guard.sinks.events import CloseEvent, DecisionEvent
from egress_guard.sinks.metrics import Metrics

SHA = "ab" * 32


def decision(i: int, action: str = "allow", reason: str = "allowlisted") -> DecisionEvent:
    d = Decision(action != "block", action, reason, "api", "api.test", 443)  # type: ignore[arg-type]
    return DecisionEvent(
        conn_id=f"conn-{i}",
        client="127.0.0.1",
        decision=d,
        mode="enforce",
        policy_sha256=SHA,
        sni="api.test",
        method="POST",
        path="/v1",
    )


def close(i: int) -> CloseEvent:
    return CloseEvent(
        conn_id=f"conn-{i}",
        client="127.0.0.1",
        host="api.test",
        port=443,
        destination="api",
        decision="allow",
        bytes_up=1,
        bytes_down=2,
        duration_s=0.5,
        mode="enforce",
        policy_sha256=SHA,
    )


def objs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


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


def test_admit_is_true_only_once_the_line_is_written(logpath: Path) -> None:
    with AuditLog(logpath, fsync="never") as log:

        async def go() -> tuple[bool, int]:
            ok = await log.admit(decision(1))
            return ok, len(objs(logpath))  # read at once, before anything else runs

        ok, lines = asyncio.run(go())
    assert ok and lines == 2  # startup + this decision, on disk when admit said yes


def test_admit_wakes_the_writer_at_once(logpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An admission is not left to the writer's poll (a request waits for it)."""
    monkeypatch.setattr(writer, "_POLL_S", 30.0)
    monkeypatch.setattr(writer, "_IDLE_WAIT_S", 30.0)
    with AuditLog(logpath, fsync="never") as log:

        async def go() -> float:
            await log.admit(decision(0))  # the writer now waits up to 30 s for the next
            t0 = time.monotonic()
            assert await log.admit(decision(1))
            return time.monotonic() - t0

        assert asyncio.run(go()) < 2.0


def test_full_queue_makes_admissions_wait_not_drop(logpath: Path) -> None:
    """200 requests at once against a queue of 2: all admitted, all written, none lost."""
    with AuditLog(logpath, fsync="never", queue_size=2) as log:

        async def go() -> list[bool]:
            return list(await asyncio.gather(*(log.admit(decision(i)) for i in range(200))))

        assert all(asyncio.run(go()))
        assert log.events_dropped == 0
    o = objs(logpath)
    assert sorted(x["id"] for x in o[1:]) == sorted(f"conn-{i}" for i in range(200))
    assert verify([str(logpath)], require_start=True).ok


def test_one_hand_off_to_the_loop_per_batch(logpath: Path) -> None:
    """The writer tells a whole batch of admissions with one call_soon_threadsafe."""
    calls = 0
    with AuditLog(logpath, fsync="never") as log:

        async def go() -> list[bool]:
            nonlocal calls
            loop = asyncio.get_running_loop()
            original = loop.call_soon_threadsafe

            def counting(*args: Any, **kw: Any) -> Any:
                nonlocal calls
                calls += 1
                return original(*args, **kw)

            loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
            return list(await asyncio.gather(*(log.admit(decision(i)) for i in range(100))))

        assert all(asyncio.run(go()))
    assert 1 <= calls < 50, calls


def test_sync_records_past_a_full_queue_are_kept_in_order(logpath: Path) -> None:
    """Blocks and closes cannot wait; they must not be dropped either."""
    logpath.mkdir()  # the writer cannot make progress, so the queue fills
    log = AuditLog(logpath, retry_interval=0.05, queue_size=3)
    try:
        for i in range(50):
            log.decision(decision(i, action="block", reason="not_allowlisted"))
            log.close(close(i))
        assert log.events_dropped == 0
        logpath.rmdir()
        assert wait_for(lambda: log.healthy)
        assert log.flush()
    finally:
        assert log.shutdown()
    o = objs(logpath)
    assert [(x["event"], x["id"]) for x in o[1:]] == [
        (ev, f"conn-{i}") for i in range(50) for ev in ("decision", "close")
    ]
    assert log.events_dropped == 0


def test_admit_is_false_when_the_write_fails(logpath: Path) -> None:
    log = AuditLog(logpath, retry_interval=0.05, fsync="never")
    try:

        async def go() -> tuple[bool, bool]:
            assert await log.admit(decision(1))
            fd = log._fd
            assert fd is not None
            ro = os.open(os.devnull, os.O_RDONLY)
            os.dup2(ro, fd)  # the log's descriptor now refuses writes (EBADF)
            os.close(ro)
            t0 = time.monotonic()
            second = await log.admit(decision(2))
            assert time.monotonic() - t0 < 2.0  # told at once, not at the timeout
            third = await log.admit(decision(3))  # unhealthy now: refused at once
            return second, third

        assert asyncio.run(go()) == (False, False)
        assert not log.healthy
    finally:
        log.shutdown(timeout=0.5)


def test_admit_is_false_when_unhealthy_or_closed(logpath: Path) -> None:
    logpath.mkdir()
    log = AuditLog(logpath, retry_interval=0.05)
    try:
        assert not asyncio.run(log.admit(decision(1)))
    finally:
        log.shutdown(timeout=0.2)
    ok = AuditLog(logpath.with_name("ok.log"))
    ok.shutdown()
    assert not asyncio.run(ok.admit(decision(2)))


def test_admit_times_out_when_the_write_hangs(
    logpath: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_write = os.write

    def hanging(fd: int, data: Any) -> int:
        if threading.current_thread().name == "egress-guard-audit":
            release.wait(10)
        return real_write(fd, data)

    log = AuditLog(logpath, fsync="never", admit_timeout=0.3)
    try:
        monkeypatch.setattr(os, "write", hanging)

        async def go() -> tuple[bool, float]:
            t0 = time.monotonic()
            ok = await log.admit(decision(1))
            return ok, time.monotonic() - t0

        ok, took = asyncio.run(go())
        assert not ok and took < 2.0
    finally:
        release.set()
        log.shutdown()


def test_shutdown_retries_a_failing_write_until_its_deadline(logpath: Path) -> None:
    """Records queued when the disk is full at shutdown are written if room comes back
    before the shutdown timeout (they used to be given up at once)."""
    log = AuditLog(logpath, retry_interval=0.05, fsync="never")
    assert log.flush()
    fd = log._fd
    assert fd is not None
    ro = os.open(os.devnull, os.O_RDONLY)
    saved = os.dup(fd)
    os.dup2(ro, fd)  # writes now fail (EBADF), as on a full disk
    os.close(ro)
    for i in range(20):
        log.close(close(i))
    assert wait_for(lambda: not log.healthy)
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(log.shutdown(timeout=10)))
    t.start()
    time.sleep(0.5)
    assert t.is_alive()  # still retrying, not given up
    os.dup2(saved, fd)  # room again
    os.close(saved)
    t.join(15)
    assert result == [True]
    o = objs(logpath)
    assert [x["id"] for x in o if x["event"] == "close"] == [f"conn-{i}" for i in range(20)]
    assert log.events_dropped == 0


def test_metrics_admits_and_counts() -> None:
    m = Metrics()
    assert asyncio.run(m.admit(decision(1)))
    assert (
        b'egress_guard_decisions_total{decision="allow",destination="unlisted"} 1.0' in m.render()
    )
