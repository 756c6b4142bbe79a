"""Reading audit logs written by ``AuditLog``: the lines of a rotated set in chain order,
streamed (a large set is never held in memory), and the JSON records in them. Shared by
the verify, summary and learn readers."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

from egress_guard.sinks.audit.chain import loads

_HEX64 = re.compile(r"^[0-9a-f]{64}$")

#: the longest line read as a record: a record is a few KiB (its fields are bounded); a
#: longer line (a file that is no audit log, ``/dev/zero`` behind a symlink) is skipped
#: as unreadable in bounded memory, never held whole
MAX_LINE: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Line:
    file: str
    lineno: int
    raw: bytes
    #: False for a last line without its newline (a cut-off write or a truncated file)
    complete: bool
    #: the parsed object when it is a chain line (a JSON object with seq and prev)
    obj: dict[str, Any] | None
    problem: str | None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.lineno}"


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    if not raw:
        return None, "empty line"
    try:
        obj = loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, "not valid JSON"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    seq, prev = obj.get("seq"), obj.get("prev")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return None, "no valid seq field"
    if not isinstance(prev, str) or not _HEX64.match(prev):
        return None, "no valid prev field"
    return obj, None


def iter_lines(paths: Iterable[str]) -> Iterator[Line]:
    """Every line of the files in turn (``-``: standard input), streamed: a rotated set
    of large files is never held in memory. Raises OSError."""
    for path in paths:
        with contextlib.ExitStack() as stack:
            if path == "-":
                f: BinaryIO = sys.stdin.buffer
                name = "<stdin>"
            else:
                f = stack.enter_context(open(path, "rb"))
                name = path
                mode = os.fstat(f.fileno()).st_mode
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                    # /dev/zero behind a symlink never ends: no log is a device
                    raise OSError(errno.EINVAL, f"{path}: a device, not an audit log")
            for i, (raw, complete, too_long) in enumerate(_bounded_lines(f), 1):
                if too_long:
                    yield Line(name, i, raw, complete, None, "line too long")
                    continue
                obj, problem = _parse(raw)
                yield Line(name, i, raw, complete, obj, problem)


def _bounded_lines(f: BinaryIO) -> Iterator[tuple[bytes, bool, bool]]:
    """(line without its newline, whole, over MAX_LINE) for each line of ``f``; of an
    over-long line only its first MAX_LINE bytes are kept, the rest is read and dropped."""
    while True:
        chunk = f.readline(MAX_LINE + 1)
        if not chunk:
            return
        if len(chunk) > MAX_LINE and not chunk.endswith(b"\n"):
            complete = False
            while more := f.readline(MAX_LINE):
                if more.endswith(b"\n"):
                    complete = True
                    break
            yield chunk[:MAX_LINE], complete, True
            continue
        complete = chunk.endswith(b"\n")
        yield (chunk[:-1] if complete else chunk), complete, False


_ROTATED = re.compile(r"^(?P<base>.+)\.(?P<n>[1-9][0-9]*)$")


def order_files(paths: Sequence[str]) -> list[str]:
    """Put a rotated set (``log``, ``log.1``, ``log.2`` ...) oldest first: ``log.2``,
    ``log.1``, ``log``. Any other list is kept in the order given (chain order)."""
    if len(paths) < 2:
        return list(paths)
    keyed: list[tuple[str, int, str]] = []
    for p in paths:
        m = _ROTATED.match(p)
        keyed.append((m.group("base"), int(m.group("n")), p) if m else (p, 0, p))
    if len({base for base, _, _ in keyed}) != 1:
        return list(paths)
    return [p for _, _, p in sorted(keyed, key=lambda k: -k[1])]


@dataclass(frozen=True, slots=True)
class Record:
    where: str
    obj: dict[str, Any]


@dataclass
class ReadStats:
    unreadable: int = 0


def iter_records(paths: Sequence[str], stats: ReadStats | None = None) -> Iterator[Record]:
    """The JSON objects in the files with their file:line, streamed; lines that are not
    JSON objects are counted in ``stats`` and skipped. Raises OSError."""
    for ln in iter_lines(paths):
        obj: object = ln.obj
        if obj is None and ln.complete:
            try:
                obj = loads(ln.raw)
            except (ValueError, UnicodeDecodeError):
                obj = None
        if isinstance(obj, dict):
            yield Record(ln.where, obj)
        elif stats is not None:
            stats.unreadable += 1


def as_int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0
