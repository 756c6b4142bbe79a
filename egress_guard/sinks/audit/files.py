"""The log files: opening and locking, writing and syncing, size rotation, and linking
each committed line into the chain. Run on the writer thread only (writer.py).

``LogFile`` is the file side of ``AuditLog``: its state is set up by ``_init_file`` (the
settings it reads, such as ``path`` and ``max_bytes``, by ``AuditLog.__init__``; declared
below so mypy checks both halves) and used by the writer's loop. It is a base
class rather than a separate object so that the byte accounting the admissions rely on
(``bytes_written`` plus what is pending) stays one set of fields.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import sys
import time
from typing import Any, BinaryIO, Literal

from egress_guard import __version__
from egress_guard.sinks.audit.chain import GENESIS, Tail, line_hash, read_tail
from egress_guard.sinks.audit.record import encode, rfc3339
from egress_guard.sinks.logsafe import escape

#: past this many pending bytes a commit writes at once (bounds memory in a burst)
PENDING_HIGH_WATER = 64 * 1024
OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


class LogFile:
    """The file side of the audit log (see the module docstring)."""

    path: str
    fsync_policy: Literal["always", "interval", "never"]
    fsync_interval: float
    max_bytes: int
    backups: int
    policy_sha256: str | None
    bytes_written: int
    lines_written: int
    fsyncs: int
    rotations: int
    _stream: BinaryIO | None
    _fd: int | None
    _opened: bool
    _regular: bool
    _size: int
    _pending: bytearray
    _pending_lines: int
    _dirty: bool
    _last_sync: float
    _seq: int
    _prev: str
    _started_at: float

    def _init_file(self) -> None:
        """The file state before the first open (``AuditLog.__init__`` calls this)."""
        #: lines on disk (or on stdout)
        self.lines_written = 0
        self.bytes_written = 0
        self.fsyncs = 0
        self.rotations = 0
        self._fd = None
        self._opened = False
        self._regular = False
        self._size = 0
        self._pending = bytearray()
        self._pending_lines = 0
        self._dirty = False
        self._last_sync = time.monotonic()
        self._seq = 0
        self._prev = GENESIS
        self._started_at = time.time()

    # -- file handling ---------------------------------------------------------------------

    def _open(self) -> None:
        """Open the file, pick up the chain where the last run left it, commit the startup
        line. All or nothing: on failure the next attempt starts again from scratch."""
        try:
            tail: Tail | None = None
            if self._stream is None:
                self._fd = os.open(self.path, OPEN_FLAGS, 0o600)
                lock_file(self._fd, self.path)
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
            warn(
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
        fd = os.open(self.path, OPEN_FLAGS, 0o600)
        try:
            lock_file(fd, self.path)
        except OSError:
            os.close(fd)
            raise
        old, self._fd, self._size = self._fd, fd, 0
        with contextlib.suppress(OSError):
            os.close(old)
        if self.fsync_policy != "never":
            sync_dir(os.path.dirname(os.path.abspath(self.path)))
        self.rotations += 1

    # -- the chain -----------------------------------------------------------------------

    def _commit(self, event: str, t: float, fields: dict[str, Any]) -> None:
        """Add one line to the chain. Raises OSError (and changes nothing) if a rotation
        it needs fails; the caller retries the same record later."""
        obj: dict[str, Any] = {"ts": rfc3339(t), "seq": self._seq + 1, "event": event}
        obj.update(fields)
        obj["prev"] = self._prev
        raw = encode(obj)
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
        if len(self._pending) >= PENDING_HIGH_WATER:
            self._drain()


def lock_file(fd: int, path: str) -> None:
    """One writer per file: a second guard appending to the same log would fork the
    chain. Where the filesystem has no locks (some network filesystems) carry on."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OSError(e.errno, "in use by another egress-guard process (locked)") from e
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise


def sync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def warn(message: str) -> None:
    with contextlib.suppress(Exception):
        print(f"egress-guard: {escape(message)}", file=sys.stderr, flush=True)
