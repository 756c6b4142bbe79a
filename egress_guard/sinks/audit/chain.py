"""The hash chain: how a line is linked to the one before it, and where an existing log
leaves the chain (a restart continues it, never rewrites it). The writer (files.py)
links lines; the readers (verify.py) recompute the same hashes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from typing import Final

#: ``prev`` of the first line of a brand-new chain
GENESIS: Final = "0" * 64
_TAIL_WINDOW = 256 * 1024


def line_hash(raw: bytes) -> str:
    """The chain hash of one line: sha256 hex of its exact bytes, without the newline."""
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class Tail:
    """What a restart needs from the existing log."""

    prev: str
    seq: int
    #: bytes of a partial last line (no newline) that must be sealed before appending
    torn: bytes | None = None


def loads(raw: bytes | str) -> object:
    """``json.loads`` for one audit line read back: a line nested too deeply to parse
    (``[[[[...``) raises ValueError like any other line that is no record, never
    RecursionError (a hostile line must not crash a reader, or the guard's start)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


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
            obj = loads(raw)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("seq"), int):
            seq = int(obj["seq"])
            break
    return Tail(line_hash(last), seq, torn)
