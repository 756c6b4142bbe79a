"""``AuditLog``: the audit sink and its writer thread (the behaviour is described in the
package docstring, egress_guard/sinks/audit/__init__.py, and docs/audit-log.md).

The event-loop side (the Sink methods) only queues; the writer thread serialises,
hashes, writes and fsyncs (files.py), and tells waiting admissions their verdicts
(handoff.py). Losses are counted here and written into the chain as ``dropped`` lines.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from typing import BinaryIO, Final, Literal

from egress_guard.sinks.audit.files import LogFile, warn
from egress_guard.sinks.audit.handoff import Entry, Flush, Item, QuietQueue, Waiter, deliver
from egress_guard.sinks.audit.record import record_fields
from egress_guard.sinks.events import CloseEvent, DecisionEvent, PolicyEvent

FsyncPolicy = Literal["always", "interval", "never"]
FSYNC_POLICIES: Final = ("always", "interval", "never")

DEFAULT_MAX_BYTES: Final = 100 * 1024 * 1024
DEFAULT_BACKUPS: Final = 10
DEFAULT_QUEUE_SIZE: Final = 10_000
#: records that must not wait (blocks, closes, policy loads) kept past a full queue; past
#: this many the sink counts the loss and turns unhealthy
DEFAULT_OVERFLOW_SIZE: Final = 100_000
#: how long an admission (AuditLog.admit) waits for room in the queue and for its line
#: to be written before the request it stands for is refused
DEFAULT_ADMIT_TIMEOUT: Final = 5.0

_BATCH = 256
#: how often the writer looks for new events (events do not wake it, see QuietQueue)
_POLL_S = 0.02
#: after this long without an event the writer waits to be woken instead of polling
_IDLE_AFTER_S = 1.0
#: the longest the writer sleeps (it also checks the log file's health then)
_IDLE_WAIT_S = 1.0


class AuditLog(LogFile):
    """JSON Lines audit sink with a hash chain, a writer thread and size rotation.

    Sink protocol: ``admit(event)`` (awaitable), ``decision(event)``, ``close(event)``,
    ``policy(event)``, ``tunnel_accepted(conn_id)`` (nothing to record), ``healthy``.
    Lifecycle: ``flush(timeout)``, ``shutdown(timeout)`` (also a context manager).
    For metrics: ``write_errors``, ``events_dropped``, ``lines_written``, ``bytes_written``,
    ``fsyncs``, ``rotations``, ``queue_depth``, ``last_error``, ``head``, ``last_seq``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "interval",
        fsync_interval: float = 1.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        overflow_size: int = DEFAULT_OVERFLOW_SIZE,
        admit_timeout: float = DEFAULT_ADMIT_TIMEOUT,
        policy_sha256: str | None = None,
        retry_interval: float = 1.0,
        stream: BinaryIO | None = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        if not fsync_interval > 0 or not retry_interval > 0 or not admit_timeout > 0:
            raise ValueError("fsync_interval, retry_interval and admit_timeout must be positive")
        if max_bytes < 0 or (max_bytes and backups < 1):
            raise ValueError("max_bytes must be >= 0 (0: no rotation) and backups >= 1")
        if queue_size < 1 or overflow_size < 0:
            raise ValueError("queue_size must be >= 1 and overflow_size >= 0")
        self.path: str = os.fspath(path)
        self.fsync_policy: FsyncPolicy = fsync
        self.fsync_interval = fsync_interval
        self.max_bytes = max_bytes
        self.backups = backups
        self.retry_interval = retry_interval
        self.admit_timeout = admit_timeout
        self.overflow_size = overflow_size
        self.policy_sha256 = policy_sha256
        if stream is not None and self.path != "-":
            raise ValueError("stream is only for path '-'")
        self._stream: BinaryIO | None = (
            (stream if stream is not None else sys.stdout.buffer) if self.path == "-" else None
        )

        # -- counters for metrics (written by the writer thread, read anywhere) ----------
        #: failed write/open/fsync/rotate attempts (each retry of a failing write counts)
        self.write_errors = 0
        #: the most recent write failure, "path: reason"; stays set after recovery
        self.last_error: str | None = None

        # -- writer-thread state ---------------------------------------------------------
        self._q: QuietQueue = QuietQueue(maxsize=queue_size)
        #: records that found the queue full; they follow the queue (under _lock)
        self._overflow: deque[Entry | Flush] = deque()
        self._backlog: deque[Item] = deque()
        #: admissions whose lines are committed, waiting for the write
        self._admitting: list[Waiter] = []
        #: admissions decided without a line of theirs (unencodable)
        self._verdicts: list[tuple[Waiter, bool]] = []
        self._failing: str | None = None
        self._init_file()

        # -- loss accounting (written by callers under the lock, logged by the writer) ----
        self._lock = threading.Lock()
        self._lost: dict[str, int] = {}
        self._lost_logged: dict[str, int] = {}
        self._lost_total = 0
        self._logged_total = 0
        self._lost_since = 0.0
        self._closing = False
        self._stop = threading.Event()
        #: once stopping, the writer retries a failing write until then (monotonic)
        self._stop_deadline = math.inf

        self._clean_exit = False
        # Open and write the startup line now, so a log that cannot be written is
        # unhealthy (and said so on stderr) before the first connection arrives. The
        # writer thread takes over from here, retrying if this failed.
        self._service()
        self._thread = threading.Thread(target=self._run, name="egress-guard-audit", daemon=True)
        self._atexit = self._at_exit
        atexit.register(self._atexit)
        self._thread.start()

    # -- Sink protocol (event loop side: never blocks, never raises) ---------------------

    async def admit(self, event: DecisionEvent) -> bool:
        """Record a decision that lets traffic through, and wait until its line is
        written (``os.write`` done; fsync as the policy says: with ``always`` this waits
        for the batch's fsync too). False, and the caller must refuse, when the log is
        unhealthy or shutting down, when the write fails, or when there is no room in the
        queue or no write within ``admit_timeout`` seconds. A full queue makes this wait
        (the event loop runs on), never drop. The writer is woken at once for it."""
        if not self.healthy:
            return False
        loop = asyncio.get_running_loop()
        waiter = Waiter(loop, loop.create_future())
        entry = Entry("decision", time.time(), event, waiter)
        deadline = loop.time() + self.admit_timeout
        delay = 0.001
        while True:
            with self._lock:
                if self._closing:
                    return False
                # behind records that overflowed, so the log keeps their order
                if not self._overflow and self._q.put_now(entry):
                    break
            remaining = deadline - loop.time()
            if remaining <= 0 or not self.healthy:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                return await waiter.future
        except TimeoutError:
            return False

    def decision(self, event: DecisionEvent) -> None:
        self._put(Entry("decision", time.time(), event))

    def close(self, event: CloseEvent) -> None:
        """Record a connection's close (Sink protocol). To stop the log, ``shutdown()``."""
        self._put(Entry("close", time.time(), event))

    def policy(self, event: PolicyEvent) -> None:
        self._put(Entry("policy", time.time(), event))

    def tunnel_accepted(self, conn_id: str) -> None:
        """Nothing to record: the log holds every decision from when it was made (the
        CONNECT's was admitted before the tunnel opened). Only the metrics count a
        tunnel's CONNECT once its first bytes pass."""

    @property
    def healthy(self) -> bool:
        """False while the log cannot be written, while events are being lost, and after
        shutdown: the proxy must then refuse new connections."""
        return (
            self._failing is None
            and not self._closing
            and self._lost_total == self._logged_total
            and self._thread.is_alive()
        )

    # -- metrics helpers -----------------------------------------------------------------

    @property
    def events_dropped(self) -> int:
        """Events that never reached the log (queue full, after shutdown, unencodable)."""
        return self._lost_total

    @property
    def queue_depth(self) -> int:
        return self._q.qsize() + len(self._overflow)

    @property
    def head(self) -> str:
        """sha256 of the last line committed to the chain (anchor it elsewhere)."""
        return self._prev

    @property
    def last_seq(self) -> int:
        return self._seq

    # -- lifecycle -----------------------------------------------------------------------

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every event queued before this call is written (and synced, unless
        fsync is never). False if that did not happen within ``timeout`` seconds."""
        if not self._thread.is_alive():
            return False
        marker = Flush(threading.Event())
        with self._lock:
            if self._overflow or not self._q.put_now(marker):
                self._overflow.append(marker)  # after what overflowed before it
        return marker.done.wait(timeout)

    def shutdown(self, timeout: float | None = 10.0) -> bool:
        """Write everything queued, sync, close the file. Events arriving afterwards are
        counted as dropped. A write that fails is retried until ``timeout`` has passed
        (the writer then gives up and says how much it could not write; the call returns
        at most about a second later). True if everything queued was written.
        Idempotent."""
        with self._lock:
            if not self._closing and timeout is not None:
                self._stop_deadline = time.monotonic() + timeout
            self._closing = True
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)
        self._thread.join(None if timeout is None else timeout + 1.0)
        if self._thread.is_alive():
            warn(
                f"audit log {self.path}: the writer did not finish in {timeout:g}s; "
                f"{self.queue_depth} queued events may not be written"
            )
        with contextlib.suppress(Exception):
            atexit.unregister(self._atexit)
        return not self._thread.is_alive() and self._clean_exit

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"AuditLog({self.path!r}, fsync={self.fsync_policy!r})"

    def _at_exit(self) -> None:
        self.shutdown(timeout=5.0)

    # -- enqueue side ----------------------------------------------------------------------

    def _put(self, item: Entry) -> None:
        # Under the lock so that nothing is queued after shutdown() has started draining:
        # such an event would be neither written nor counted.
        with self._lock:
            if self._closing:
                reason = "closed"
            else:
                if not self._overflow:
                    try:
                        self._q.put_quiet(item)
                        return
                    except queue.Full:
                        pass
                # A full queue: these records cannot wait (sync hooks, and records of
                # refusals), so they are kept past it rather than dropped.
                if len(self._overflow) < self.overflow_size:
                    self._overflow.append(item)
                    return
                reason = "queue_full"
        self._lose(reason)

    def _lose(self, reason: str) -> None:
        with self._lock:
            first = self._lost_total == self._logged_total
            if first:
                self._lost_since = time.monotonic()
            self._lost[reason] = self._lost.get(reason, 0) + 1
            self._lost_total += 1
        if first:
            warn(
                f"audit log {self.path}: event lost ({reason}); "
                "new connections are refused until the loss is recorded"
            )

    # -- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        last_item = time.monotonic()
        try:
            while True:
                if not self._service():
                    if self._stop.is_set():
                        # stopping: keep retrying (a full disk may get room) until the
                        # shutdown deadline, so nothing queued is given up early
                        left = self._stop_deadline - time.monotonic()
                        if left <= 0:
                            break
                        time.sleep(min(self.retry_interval, left))
                    else:
                        self._stop.wait(self.retry_interval)
                    continue
                if self._stop.is_set() and self._q.empty() and not self._overflow:
                    self._clean_exit = True
                    break
                if self._overflow:  # the queue was full: take what waits, no sleeping
                    self._take()
                    last_item = time.monotonic()
                    continue
                due = self._wait_time()
                idle = due >= _IDLE_WAIT_S and time.monotonic() - last_item > _IDLE_AFTER_S
                self._q.set_idle(idle)
                try:
                    item = self._q.get(timeout=due if idle else min(due, _POLL_S))
                except queue.Empty:
                    continue  # _service() syncs when the interval is due
                last_item = time.monotonic()
                self._backlog.append(item)
                self._take()
        except BaseException as e:  # a bug: make it loud; healthy turns False (thread dead)
            warn(f"audit log {self.path}: writer thread died: {e!r}")
            raise
        finally:
            self._finish()

    def _take(self) -> None:
        """Fill the backlog up to a batch: the queue first, then what overflowed it (all
        of which came later: while anything has overflowed, new records go there too)."""
        while len(self._backlog) < _BATCH:
            try:
                self._backlog.append(self._q.get_nowait())
            except queue.Empty:
                break
        if self._overflow and len(self._backlog) < _BATCH:
            with self._lock:
                while self._overflow and len(self._backlog) < _BATCH:
                    self._backlog.append(self._overflow.popleft())

    def _service(self) -> bool:
        """Open, write what is pending, process the backlog. False while failing.
        Admissions learn their fate before it returns."""
        try:
            if not self._opened:
                self._open()
            self._drain()
            while self._backlog:
                self._handle(self._backlog[0])
                self._backlog.popleft()
            self._log_losses()
            self._drain()
            if self.fsync_policy == "always":
                self._sync()
            else:
                self._sync_if_due()
        except OSError as e:
            self._fail(e)
            self._settle(failed=True)
            return False
        if self._failing is not None:
            warn(f"audit log {self.path}: writable again; resuming")
            self._failing = None
        self._settle(failed=False)
        return True

    def _settle(self, failed: bool) -> None:
        """Tell waiting admissions whether their lines are written: one hand-off to the
        event loop per batch. After a failure, every admission not written yet is told
        False at once (its request is refused; the line, if committed, stays in the chain
        and is written on recovery), including those still queued."""
        verdicts, self._verdicts = self._verdicts, []
        if self._admitting:
            written = self.bytes_written
            keep: list[Waiter] = []
            for w in self._admitting:
                if w.end <= written:
                    verdicts.append((w, True))
                elif failed:
                    verdicts.append((w, False))
                else:
                    keep.append(w)
            self._admitting = keep
        if failed:
            waiting = [i.waiter for i in self._backlog if isinstance(i, Entry) and i.waiter]
            waiting += self._q.waiters()
            with self._lock:
                waiting += [i.waiter for i in self._overflow if isinstance(i, Entry) and i.waiter]
            verdicts += [(w, False) for w in waiting]
        deliver(verdicts)

    def _wait_time(self) -> float:
        """How long the writer may sleep: until a due fsync, at most _IDLE_WAIT_S."""
        if self.fsync_policy == "interval" and self._dirty:
            due = self._last_sync + self.fsync_interval - time.monotonic()
            return min(_IDLE_WAIT_S, max(0.0, due))
        return _IDLE_WAIT_S

    def _fail(self, e: OSError) -> None:
        self.write_errors += 1
        msg = f"{self.path}: {e.strerror or e}"
        self.last_error = msg
        if self._failing is None:
            warn(
                f"audit log cannot be written ({msg}); new connections are refused "
                f"until it can (retrying every {self.retry_interval:g}s)"
            )
        self._failing = msg

    def _finish(self) -> None:
        left = sum(isinstance(i, Entry) for i in self._backlog)
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            left += isinstance(item, Entry)
            self._backlog.append(item)
        with self._lock:
            left += sum(isinstance(i, Entry) for i in self._overflow)
            self._backlog.extend(self._overflow)
            self._overflow.clear()
        self._settle(failed=True)  # whatever still waits was not written
        if self._pending:
            self._clean_exit = False
            warn(
                f"audit log {self.path}: shut down with {len(self._pending)} bytes "
                "committed to the chain but not written"
            )
        with contextlib.suppress(OSError):
            if self.fsync_policy != "never" and self._dirty:
                self._sync()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.flush()
        if left:
            self._clean_exit = False
            warn(f"audit log {self.path}: shut down with {left} events not written")

    def _handle(self, item: Item) -> None:
        if item is None:
            return
        if isinstance(item, Flush):
            self._drain()
            if self.fsync_policy != "never":
                self._sync()
            item.done.set()
            return
        try:
            fields = record_fields(item.event)
        except Exception as e:  # never wedge the writer on one odd event
            warn(f"audit log {self.path}: cannot encode {item.kind} event: {e!r}")
            self._lose("encode_error")
            if item.waiter is not None:
                self._verdicts.append((item.waiter, False))
            return
        if item.kind == "policy" and isinstance(item.event, PolicyEvent) and item.event.ok:
            self.policy_sha256 = item.event.sha256
        name = "policy_loaded" if item.kind == "policy" else item.kind
        self._commit(name, item.t, fields)
        if item.waiter is not None:
            item.waiter.end = self.bytes_written + len(self._pending)
            self._admitting.append(item.waiter)

    def _log_losses(self) -> None:
        """Put losses on record once the events queued before them are written (the
        queue is empty), or after a second if the queue never empties."""
        if self._lost_total == self._logged_total:
            return
        if (not self._q.empty() or self._overflow) and time.monotonic() - self._lost_since < 1.0:
            return
        with self._lock:
            lost = dict(self._lost)
        for reason, count in sorted(lost.items()):
            delta = count - self._lost_logged.get(reason, 0)
            if delta > 0:
                self._commit("dropped", time.time(), {"count": delta, "reason": reason})
                with self._lock:
                    self._lost_logged[reason] = count
                    self._logged_total += delta
