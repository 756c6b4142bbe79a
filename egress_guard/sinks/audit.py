"""The audit log: a tamper-evident JSON Lines sink (DESIGN section 6).

One JSON object per line, append-only. Every line carries ``seq`` (its line number in the
chain, continuing across rotations and restarts) and ``prev``, the sha256 of the exact
bytes of the previous line (without its newline); the first line of a brand-new log
chains from 64 zeros. ``egress-guard audit verify`` recomputes the chain, so an edited,
deleted, inserted or reordered line breaks it at a named place.

What the chain does and does not prove: it is unkeyed, so it detects edits made by
someone who did not rewrite every later line as well, and it cannot detect lines cut off
the end of the newest file. Anchor it outside the machine when that matters: ship the
lines to a remote collector, or record ``AuditLog.head`` (the hash of the last line, also
printed by ``audit verify``) somewhere the agent cannot write.

Events (``event`` field)
    ``startup``        the sink opened: version, pid, policy_sha256 (when known), and
                       ``recovered: "torn_line"`` when the previous run left a partial line
    ``policy_loaded``  from PolicyEvent: result ok|error, source, policy_sha256, error
    ``decision``       from DecisionEvent: id, client, host, port, sni, method, path,
                       decision (allow|block|would_block), reason, destination, catalog
                       (the catalog entry covering an unlisted target), mode,
                       policy_sha256, detail, hint
    ``close``          from CloseEvent: the decision fields that apply, plus bytes_up,
                       bytes_down, duration_ms, error
    ``dropped``        events that could not be logged: count and reason (queue_full,
                       closed, encode_error). Written as soon as the writer can.

Never written: header values (Authorization, Proxy-Authorization, x-api-key, api-key,
cookies), bodies, query strings, path parameters, userinfo. The events do not carry
them; as a second line of defence (egress_guard/sinks/redact.py, docs/audit-log.md) ``path``
loses everything from the first ``?``, ``#`` or ``;`` or an encoding of one (``%3F``,
``%23``, ``%3B``, any case, ``%25``-encoded again) and the userinfo of an absolute URL,
``host`` and ``sni`` lose userinfo, and free-text fields get markers in place of
queries, parameters and userinfo.

Threading and back-pressure: one writer thread serialises, hashes, writes and fsyncs.
Decisions that let traffic through are *admitted*: ``await admit(event)`` queues the
record, wakes the writer at once, and returns True only once the line is written
(``os.write`` returned; with fsync ``always`` also after that batch's fsync), so the proxy
forwards nothing whose record is not in the file. The writer tells all admissions of a
batch with one ``call_soon_threadsafe``. False (the caller refuses the traffic) when the
log is unhealthy or shutting down, when the write fails (every admission not yet written
is told at once), or when there was no room or no write within ``admit_timeout``. A full
queue makes an admission wait for room (asynchronously), never drops it.

The other Sink methods (refusals, closes, policy loads: nothing waits for them) never
block and never raise for ordinary input. They do not wake the writer (that would hand
the GIL to it in the middle of the proxy's work); it looks for new records every 20 ms,
so such a record reaches the file within about 20 ms (after a quiet second the writer
sleeps until the next record wakes it). Past a full queue they go to an overflow list
(``overflow_size``), in order; while it holds anything, new records and admissions queue
behind it. Only when that is full too is a record *counted* as lost, and ``healthy``
turns False at once: the proxy refuses new connections and requests (reason
internal_error) instead of letting traffic through unrecorded. The loss is written into
the chain as a ``dropped`` line when the writer catches up, after which the sink is
healthy again. Nothing is dropped silently.

Write failures (permission, disk full, any OSError): ``healthy`` turns False, the failure
is printed on stderr once per episode, ``write_errors`` counts every failed attempt, and
the writer retries every ``retry_interval`` seconds. Bytes already committed to the chain
are kept and written on recovery (a short write resumes where it stopped), so a recovered
log still verifies. While it fails the writer stops taking events off the queue, so
memory stays bounded; overflow is counted as above.

fsync: ``always`` (after every batch the writer writes: a machine crash loses at most the
events in flight, and no admitted one), ``interval`` (default: at most every
``fsync_interval`` seconds while there is unsynced data), ``never`` (leave it to the OS; a
proxy crash still loses nothing that reached the writer, a machine crash may).

Rotation by size: when the next line would take ``audit.log`` past ``max_bytes`` it is
renamed ``audit.log.1`` (``.1`` -> ``.2`` ..., keeping ``backups`` files) and a new file
started. The chain runs on across files. On restart the sink reads the last line of the
existing file (or of ``.1`` if the current file is empty) and chains from it; it never
rewrites a byte. A partial last line left by a crash is sealed with a newline and named in
the next ``startup`` line, which verify reports as a note rather than tampering.

One process per file: the sink takes an exclusive ``flock`` on the file it appends to,
and a second guard pointed at the same file stays unhealthy (two writers would fork the
chain). Rotation is the sink's own; an external logrotate would cut the chain.

Path ``-`` writes to standard output (container log pipelines): no rotation, no fsync,
and each process start begins a new chain from 64 zeros.

Lifecycle: the Sink method ``close(event)`` records a CloseEvent (the protocol's name);
shutting the log down is ``shutdown()``: it writes everything queued, retrying a failing
write until its timeout. ``flush()`` waits until everything queued so far
is written and synced. An ``atexit`` hook shuts the log down at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import queue
import stat
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO, Final, Literal

from egress_guard import __version__
from egress_guard.sinks import redact
from egress_guard.sinks.events import CloseEvent, DecisionEvent, PolicyEvent
from egress_guard.sinks.logsafe import escape

FsyncPolicy = Literal["always", "interval", "never"]
FSYNC_POLICIES: Final = ("always", "interval", "never")

#: ``prev`` of the first line of a brand-new chain
GENESIS: Final = "0" * 64

DEFAULT_MAX_BYTES: Final = 100 * 1024 * 1024
DEFAULT_BACKUPS: Final = 10
DEFAULT_QUEUE_SIZE: Final = 10_000
#: records that must not wait (blocks, closes, policy loads) kept past a full queue; past
#: this many the sink counts the loss and turns unhealthy
DEFAULT_OVERFLOW_SIZE: Final = 100_000
#: how long an admission (AuditLog.admit) waits for room in the queue and for its line
#: to be written before the request it stands for is refused
DEFAULT_ADMIT_TIMEOUT: Final = 5.0

_MAX_PATH = 2048
_MAX_TEXT = 1024
_BATCH = 256
#: how often the writer looks for new events (events do not wake it, see _QuietQueue)
_POLL_S = 0.02
#: after this long without an event the writer waits to be woken instead of polling
_IDLE_AFTER_S = 1.0
#: the longest the writer sleeps (it also checks the log file's health then)
_IDLE_WAIT_S = 1.0
_PENDING_HIGH_WATER = 64 * 1024
_TAIL_WINDOW = 256 * 1024
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


def line_hash(raw: bytes) -> str:
    """The chain hash of one line: sha256 hex of its exact bytes, without the newline."""
    return hashlib.sha256(raw).hexdigest()


def rfc3339(t: float) -> str:
    """RFC 3339 UTC with milliseconds and ``Z``: ``2025-01-31T12:00:00.123Z``."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def scrub_path(path: str | None) -> str | None:
    """A request path fit for the log: no query, fragment, parameters (nor their
    percent-encodings), no userinfo, bounded (``redact.path``)."""
    p = redact.path(path)
    return None if p is None else _clip(p, _MAX_PATH)


def scrub_host(host: str | None) -> str | None:
    """A host or authority as a client wrote it, without userinfo (``redact.host``)."""
    h = redact.host(host)
    return None if h is None else _clip(h, _MAX_TEXT)


def scrub_text(text: str | None) -> str | None:
    """Free text (details, error messages): queries, parameters and userinfo replaced
    by markers (``redact.text``), bounded."""
    t = redact.text(text)
    return None if t is None else _clip(t, _MAX_TEXT)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _encode(obj: dict[str, Any]) -> bytes:
    # ensure_ascii: every line is plain ASCII, so no byte-level ambiguity and no raw
    # newline can ever appear inside a line.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


class _Waiter:
    """An admission waiting for its line: the writer thread tells ``future`` (on
    ``loop``) True once the line is written, False if it cannot be written now."""

    __slots__ = ("end", "future", "loop", "settled")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[bool]) -> None:
        self.loop = loop
        self.future = future
        #: where the line ends in the log's byte stream (bytes_written), once committed
        self.end = -1
        #: a verdict was sent (writer thread only)
        self.settled = False


@dataclass(frozen=True, slots=True)
class _Entry:
    kind: Literal["decision", "close", "policy"]
    t: float
    event: DecisionEvent | CloseEvent | PolicyEvent
    #: an admission (AuditLog.admit): the caller waits until the line is written
    waiter: _Waiter | None = None


@dataclass(frozen=True, slots=True)
class _Flush:
    done: threading.Event


_Item = _Entry | _Flush | None  # None only wakes the writer


@dataclass(frozen=True, slots=True)
class Tail:
    """What a restart needs from the existing log."""

    prev: str
    seq: int
    #: bytes of a partial last line (no newline) that must be sealed before appending
    torn: bytes | None = None


def read_tail(path: str) -> Tail | None:
    """The chain state at the end of an existing log file; None if empty or missing."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None
        start = max(0, st.st_size - _TAIL_WINDOW)
        data = os.pread(fd, st.st_size - start, start)
    finally:
        os.close(fd)
    parts = data.split(b"\n")
    torn: bytes | None = None
    if parts[-1]:
        torn = parts[-1]
    parts = parts[:-1]
    if start > 0 and parts:
        parts = parts[1:]  # the window's first line may be cut
    last = torn if torn is not None else (parts[-1] if parts else b"")
    seq = 0
    for raw in reversed(parts):
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("seq"), int):
            seq = int(obj["seq"])
            break
    return Tail(line_hash(last), seq, torn)


class _QuietQueue(queue.Queue[_Item]):
    """A bounded queue whose event puts do not wake the writer thread.

    A wake-up per event is a thread hand-off on the proxy's hot path: the woken writer
    takes the GIL from the event loop in the middle of a CONNECT (measured: about 0.4 ms
    of a tunnel's set-up latency at concurrency 1). The writer polls every ``_POLL_S``
    instead and takes whatever has gathered; markers (flush, shutdown) and admissions
    (``put_now``: a request waits for the write) still wake it.
    Once nothing has come for ``_IDLE_AFTER_S``, the writer stops polling (an idle proxy
    on a laptop should not wake 50 times a second) and the next event wakes it, once.
    """

    #: the writer sleeps until notified (set and cleared by the writer, under mutex)
    idle = False

    def put_quiet(self, item: _Item) -> None:
        """put_nowait(), notifying the consumer only when it is idle. Raises queue.Full."""
        with self.mutex:
            if 0 < self.maxsize <= self._qsize():
                raise queue.Full
            self._put(item)
            self.unfinished_tasks += 1
            if self.idle:
                self.idle = False
                self.not_empty.notify()

    def put_now(self, item: _Item) -> bool:
        """put_nowait() that always wakes the consumer (an admission is waiting for the
        write). False when the queue is full."""
        with self.mutex:
            if 0 < self.maxsize <= self._qsize():
                return False
            self._put(item)
            self.unfinished_tasks += 1
            self.idle = False
            self.not_empty.notify()
            return True

    def set_idle(self, idle: bool) -> None:
        with self.mutex:
            self.idle = idle

    def waiters(self) -> list[_Waiter]:
        """The admissions still in the queue."""
        with self.mutex:
            return [i.waiter for i in self.queue if isinstance(i, _Entry) and i.waiter]


class AuditLog:
    """JSON Lines audit sink with a hash chain, a writer thread and size rotation.

    Sink protocol: ``admit(event)`` (awaitable), ``decision(event)``, ``close(event)``,
    ``policy(event)``, ``healthy``.
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
        #: lines on disk (or on stdout)
        self.lines_written = 0
        self.bytes_written = 0
        self.fsyncs = 0
        self.rotations = 0
        #: the most recent write failure, "path: reason"; stays set after recovery
        self.last_error: str | None = None

        # -- writer-thread state ---------------------------------------------------------
        self._q: _QuietQueue = _QuietQueue(maxsize=queue_size)
        #: records that found the queue full; they follow the queue (under _lock)
        self._overflow: deque[_Entry | _Flush] = deque()
        self._backlog: deque[_Item] = deque()
        #: admissions whose lines are committed, waiting for the write
        self._admitting: list[_Waiter] = []
        #: admissions decided without a line of theirs (unencodable)
        self._verdicts: list[tuple[_Waiter, bool]] = []
        self._fd: int | None = None
        self._opened = False
        self._regular = False
        self._size = 0
        self._pending = bytearray()
        self._pending_lines = 0
        self._dirty = False
        self._last_sync = time.monotonic()
        self._seq = 0
        self._prev = GENESIS
        self._failing: str | None = None
        self._started_at = time.time()

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
        waiter = _Waiter(loop, loop.create_future())
        entry = _Entry("decision", time.time(), event, waiter)
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
        self._put(_Entry("decision", time.time(), event))

    def close(self, event: CloseEvent) -> None:
        """Record a connection's close (Sink protocol). To stop the log, ``shutdown()``."""
        self._put(_Entry("close", time.time(), event))

    def policy(self, event: PolicyEvent) -> None:
        self._put(_Entry("policy", time.time(), event))

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
        marker = _Flush(threading.Event())
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
            _warn(
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

    def _put(self, item: _Entry) -> None:
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
            _warn(
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
            _warn(f"audit log {self.path}: writer thread died: {e!r}")
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
            _warn(f"audit log {self.path}: writable again; resuming")
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
            keep: list[_Waiter] = []
            for w in self._admitting:
                if w.end <= written:
                    verdicts.append((w, True))
                elif failed:
                    verdicts.append((w, False))
                else:
                    keep.append(w)
            self._admitting = keep
        if failed:
            waiting = [i.waiter for i in self._backlog if isinstance(i, _Entry) and i.waiter]
            waiting += self._q.waiters()
            with self._lock:
                waiting += [i.waiter for i in self._overflow if isinstance(i, _Entry) and i.waiter]
            verdicts += [(w, False) for w in waiting]
        _deliver(verdicts)

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
            _warn(
                f"audit log cannot be written ({msg}); new connections are refused "
                f"until it can (retrying every {self.retry_interval:g}s)"
            )
        self._failing = msg

    def _finish(self) -> None:
        left = sum(isinstance(i, _Entry) for i in self._backlog)
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            left += isinstance(item, _Entry)
            self._backlog.append(item)
        with self._lock:
            left += sum(isinstance(i, _Entry) for i in self._overflow)
            self._backlog.extend(self._overflow)
            self._overflow.clear()
        self._settle(failed=True)  # whatever still waits was not written
        if self._pending:
            self._clean_exit = False
            _warn(
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
            _warn(f"audit log {self.path}: shut down with {left} events not written")

    # -- file handling ---------------------------------------------------------------------

    def _open(self) -> None:
        """Open the file, pick up the chain where the last run left it, commit the startup
        line. All or nothing: on failure the next attempt starts again from scratch."""
        try:
            tail: Tail | None = None
            if self._stream is None:
                self._fd = os.open(self.path, _OPEN_FLAGS, 0o600)
                _lock(self._fd, self.path)
                st = os.fstat(self._fd)
                self._regular = stat.S_ISREG(st.st_mode)
                self._size = st.st_size if self._regular else 0
                if self._regular:
                    tail = read_tail(self.path)
                    if tail is None and self.max_bytes:
                        tail = read_tail(f"{self.path}.1")
            startup: dict[str, Any] = {
                "version": __version__,
                "pid": os.getpid(),
                "policy_sha256": self.policy_sha256,
            }
            if tail is not None:
                self._prev, self._seq = tail.prev, tail.seq
                if tail.torn is not None:
                    # seal the partial line so nothing is appended to it; it stays in the
                    # chain (hashed as it is) and verify reports it as an interrupted write
                    self._pending += b"\n"
                    startup["recovered"] = "torn_line"
            self._commit("startup", self._started_at, startup)
        except BaseException:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
            self._pending.clear()
            self._pending_lines = 0
            self._prev, self._seq = GENESIS, 0
            raise
        self._opened = True
        if tail is not None and tail.torn is not None:
            _warn(
                f"audit log {self.path}: the last line was incomplete "
                f"({len(tail.torn)} bytes, an interrupted write); sealed it and carried on"
            )

    def _drain(self) -> None:
        while self._pending:
            if self._fd is not None:
                n = os.write(self._fd, self._pending)
            else:
                assert self._stream is not None
                n = len(self._pending)
                self._stream.write(bytes(self._pending))
                self._stream.flush()
            del self._pending[:n]
            self._size += n
            self.bytes_written += n
            self._dirty = True
        self.lines_written += self._pending_lines
        self._pending_lines = 0

    def _sync(self) -> None:
        if self._dirty and self._fd is not None and self._regular:
            os.fsync(self._fd)
            self.fsyncs += 1
        self._dirty = False
        self._last_sync = time.monotonic()

    def _sync_if_due(self) -> None:
        if (
            self.fsync_policy == "interval"
            and self._dirty
            and time.monotonic() - self._last_sync >= self.fsync_interval
        ):
            self._sync()

    def _rotate(self) -> None:
        assert self._fd is not None
        self._drain()
        if self.fsync_policy != "never":
            self._sync()
        for i in range(self.backups - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.lexists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        if os.path.lexists(self.path):
            os.replace(self.path, f"{self.path}.1")
        fd = os.open(self.path, _OPEN_FLAGS, 0o600)
        try:
            _lock(fd, self.path)
        except OSError:
            os.close(fd)
            raise
        old, self._fd, self._size = self._fd, fd, 0
        with contextlib.suppress(OSError):
            os.close(old)
        if self.fsync_policy != "never":
            _sync_dir(os.path.dirname(os.path.abspath(self.path)))
        self.rotations += 1

    # -- records ---------------------------------------------------------------------------

    def _commit(self, event: str, t: float, fields: dict[str, Any]) -> None:
        """Add one line to the chain. Raises OSError (and changes nothing) if a rotation
        it needs fails; the caller retries the same record later."""
        obj: dict[str, Any] = {"ts": rfc3339(t), "seq": self._seq + 1, "event": event}
        obj.update(fields)
        obj["prev"] = self._prev
        raw = _encode(obj)
        if (
            self.max_bytes
            and self._regular
            and self._size + len(self._pending) > 0
            and self._size + len(self._pending) + len(raw) + 1 > self.max_bytes
        ):
            self._rotate()
        self._pending += raw + b"\n"
        self._pending_lines += 1
        self._seq += 1
        self._prev = line_hash(raw)
        if len(self._pending) >= _PENDING_HIGH_WATER:
            self._drain()

    def _handle(self, item: _Item) -> None:
        if item is None:
            return
        if isinstance(item, _Flush):
            self._drain()
            if self.fsync_policy != "never":
                self._sync()
            item.done.set()
            return
        try:
            fields = _fields(item.event)
        except Exception as e:  # never wedge the writer on one odd event
            _warn(f"audit log {self.path}: cannot encode {item.kind} event: {e!r}")
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


def _deliver(verdicts: list[tuple[_Waiter, bool]]) -> None:
    """Send admissions their verdicts (writer thread): one call into each event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[bool], bool]]] = {}
    for w, ok in verdicts:
        if not w.settled:
            w.settled = True
            by_loop.setdefault(w.loop, []).append((w.future, ok))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: list[tuple[asyncio.Future[bool], bool]]) -> None:
    for future, ok in items:
        if not future.done():  # (timed out or cancelled meanwhile)
            future.set_result(ok)


def _fields(ev: DecisionEvent | CloseEvent | PolicyEvent) -> dict[str, Any]:
    if isinstance(ev, DecisionEvent):
        d = ev.decision
        return {
            "id": ev.conn_id,
            "client": ev.client,
            "host": scrub_host(d.host),
            "port": d.port,
            "sni": scrub_host(ev.sni),
            "method": ev.method,
            "path": scrub_path(ev.path),
            "decision": d.action,
            "reason": d.reason,
            "destination": d.destination,
            "catalog": d.catalog,
            "mode": ev.mode,
            "policy_sha256": ev.policy_sha256 or None,
            "detail": scrub_text(d.detail),
            # the operator's way out (file:line of the rule); clients get it without paths
            "hint": scrub_text(d.hint),
        }
    if isinstance(ev, CloseEvent):
        dur = ev.duration_s
        return {
            "id": ev.conn_id,
            "client": ev.client,
            "host": scrub_host(ev.host),
            "port": ev.port,
            "decision": ev.decision,
            "destination": ev.destination,
            "mode": ev.mode,
            "policy_sha256": ev.policy_sha256 or None,
            "bytes_up": int(ev.bytes_up),
            "bytes_down": int(ev.bytes_down),
            "duration_ms": round(max(0.0, dur) * 1000) if math.isfinite(dur) else None,
            "error": scrub_text(ev.error),
        }
    return {
        "result": "ok" if ev.ok else "error",
        "source": ev.source,
        "policy_sha256": ev.sha256,
        "policy_version": ev.version,
        "mode": ev.mode,
        "error": scrub_text(ev.error),
    }


def _lock(fd: int, path: str) -> None:
    """One writer per file: a second guard appending to the same log would fork the
    chain. Where the filesystem has no locks (some network filesystems) carry on."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OSError(e.errno, "in use by another egress-guard process (locked)") from e
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise


def _sync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _warn(message: str) -> None:
    with contextlib.suppress(Exception):
        print(f"egress-guard: {escape(message)}", file=sys.stderr, flush=True)


def rotated_set(path: str) -> list[str]:
    """The existing files of a rotated log, oldest first: ``path.N`` ... ``path.1``, ``path``."""
    base = os.path.basename(path)
    folder = os.path.dirname(path) or "."
    numbered: list[tuple[int, str]] = []
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            suffix = name[len(base) + 1 :] if name.startswith(base + ".") else ""
            if suffix.isdigit() and not suffix.startswith("0"):
                numbered.append((int(suffix), os.path.join(os.path.dirname(path), name)))
    out = [p for _, p in sorted(numbered, reverse=True)]
    if os.path.exists(path):
        out.append(path)
    return out
