"""``egress-guard tail AUDIT_LOG``: follow the audit log, one human line per decision.

The audit log is JSON Lines for machines; an operator watching a running guard (its
stderr may be a service's journal) wants what ``run`` writes to stderr: one readable
line per decision (``sinks/console.describe``, the same rendering). ``--blocks``
shows only refusals (block and would_block), ``--json`` prints the decision records as
the log holds them (for ``jq``).

Following survives rotation: the audit writer renames the file to ``.1`` and opens a new
one; ``tail`` finishes the old file (a record written just before the rename is not
lost) and continues from the start of the new one. A file cut shorter (truncated) is
read again from its start. A line is handled once it is whole (ends in a newline), so a
record caught half-written is never shown twice or cut.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import stat
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Final, TextIO

from egress_guard.cli.exits import EXIT_INTERRUPTED, EXIT_OK
from egress_guard.cli.shared import fail
from egress_guard.sinks.audit.chain import loads
from egress_guard.sinks.audit.read import MAX_LINE as READ_MAX_LINE
from egress_guard.sinks.console import describe

#: how often a quiet log is looked at again (new lines, rotation)
POLL_S: Final = 0.2
#: how much is read at once
CHUNK: Final = 64 * 1024
#: the longest line read as a record (``audit.read.MAX_LINE``); a longer one is skipped
#: as unreadable, never held whole or copied over and over
MAX_LINE: Final = READ_MAX_LINE
#: what a skipped over-long line is read as (no record: counted unreadable)
TOO_LONG: Final = b"<line too long>"
#: rotated files looked for after a rotation (``--audit-backups`` beyond this: the
#: oldest of a burst of rotations may be missed by ``tail``, never by the log)
MAX_BACKUPS: Final = 1000


def decision_record(raw: bytes) -> dict[str, Any] | None:
    """The decision record on one audit line, or None (another event, or not a record)."""
    try:
        obj = loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(obj, dict) and obj.get("event") == "decision":
        return obj
    return None


def is_record(raw: bytes) -> bool:
    """The line is one of the audit log's (a JSON object with ``seq`` and ``event``)."""
    try:
        obj = loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and "seq" in obj and "event" in obj


def _open_regular(path: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file. A FIFO would block the open
    until a writer comes (``tail`` hung), and a device such as ``/dev/zero`` never ends:
    neither is an audit log to follow. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or socket)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class Follower:
    """The whole lines appended to ``path``, across rotations and truncations.

    ``lines()`` yields what is in the file now; ``follow()`` then yields new lines as
    they come, forever (``sleep`` between looks; tests pass a bounded one)."""

    def __init__(self, path: str, sleep: Callable[[float], None] = time.sleep) -> None:
        self.path = path
        self._sleep = sleep
        self._f: BinaryIO = _open_regular(path)
        self._ino = os.fstat(self._f.fileno()).st_ino
        #: the start of a line not yet whole (its pieces; joined once, at its newline)
        self._parts: list[bytes] = []
        self._size = 0
        #: the line being read is over MAX_LINE: the rest of it is dropped
        self._long = False

    def close(self) -> None:
        self._f.close()

    def _reset(self) -> None:
        self._parts, self._size, self._long = [], 0, False

    def _read(self) -> Iterator[bytes]:
        """The whole lines in what is read now; each chunk is looked at once (a line
        without a newline is not searched again for each chunk added to it)."""
        while True:
            chunk = self._f.read(CHUNK)
            if not chunk:
                return
            start = 0
            while (nl := chunk.find(b"\n", start)) >= 0:
                if self._long:
                    line = TOO_LONG
                else:
                    self._parts.append(chunk[start:nl])
                    line = b"".join(self._parts)
                    if len(line) > MAX_LINE:
                        line = TOO_LONG
                self._reset()
                start = nl + 1
                yield line
            if start < len(chunk) and not self._long:
                self._parts.append(chunk[start:])
                self._size += len(chunk) - start
                if self._size > MAX_LINE:
                    self._parts, self._size, self._long = [], 0, True

    def lines(self) -> Iterator[bytes]:
        """The whole lines from where reading stopped to the file's current end."""
        yield from self._read()

    def follow(self) -> Iterator[bytes]:
        """New whole lines as they are written, across rotations; never returns."""
        while True:
            got = False
            for line in self._read():
                got = True
                yield line
            if got:
                continue
            yield from self._reopen_if_moved()
            self._sleep(POLL_S)

    def _reopen_if_moved(self) -> Iterator[bytes]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return  # between the rename and the new file: look again later
        if st.st_ino != self._ino:
            # rotated: what was written to the old file before the rename comes first,
            # then the files rotated since (several, if the log rotated more than once
            # between two looks), oldest first, then the new file
            yield from self._read()
            newer = self._open_newer_rotated()
            try:
                current = _open_regular(self.path)
            except OSError:  # gone again, or no regular file: look again later
                for f in newer:
                    f.close()
                return
            self._f.close()
            for f in newer:
                self._f = f
                self._reset()
                yield from self._read()
                f.close()
            self._f = current
            self._reset()
            self._ino = os.fstat(current.fileno()).st_ino
        elif st.st_size < self._f.tell():
            self._f.seek(0)  # truncated: its records start again from the beginning
            self._reset()

    def _open_newer_rotated(self) -> list[BinaryIO]:
        """The rotated files newer than the one being read (``log.k`` is it: ``log.k-1``
        down to ``log.1``), opened, oldest first. If it was deleted already (more
        rotations than backups), every rotated file there is is newer."""
        names: list[str] = []
        i = 1
        while i <= MAX_BACKUPS:
            name = f"{self.path}.{i}"
            try:
                if os.stat(name).st_ino == self._ino:
                    break
            except FileNotFoundError:
                break
            names.append(name)
            i += 1
        opened: list[BinaryIO] = []
        for name in reversed(names):
            with contextlib.suppress(OSError):
                opened.append(open(name, "rb"))  # noqa: SIM115
        return opened


class Printer:
    """Prints the decision lines the options ask for; counts lines that are no record."""

    def __init__(self, out: TextIO, *, blocks: bool, as_json: bool) -> None:
        self.out = out
        self.blocks = blocks
        self.as_json = as_json
        self.unreadable = 0

    def wanted(self, raw: bytes) -> dict[str, Any] | None:
        rec = decision_record(raw)
        if rec is None:
            if raw.strip() and not is_record(raw):
                self.unreadable += 1
            return None
        if self.blocks and rec.get("decision") == "allow":
            return None
        return rec

    def show(self, rec: dict[str, Any]) -> None:
        if self.as_json:
            # the log's own encoding: ASCII only, nothing a terminal would act on
            line = json.dumps(rec, separators=(",", ":"), ensure_ascii=True)
        else:
            line = describe(rec)
        self.out.write(line + "\n")
        self.out.flush()


def run_tail(args: argparse.Namespace, out: TextIO) -> int:
    path: str = args.audit_log
    if os.path.isdir(path):
        return fail("tail", f"{path}: is a directory, not an audit log")
    try:
        follower = Follower(path)
    except OSError as e:
        return fail("tail", f"cannot read {path}: {e.strerror or e}")
    printer = Printer(out, blocks=args.blocks, as_json=args.json)
    try:
        last: deque[dict[str, Any]] = deque(maxlen=max(0, args.lines))
        seen = 0
        for raw in follower.lines():
            seen += 1
            rec = printer.wanted(raw)
            if rec is not None:
                last.append(rec)
        if seen and printer.unreadable == seen:
            return fail("tail", f"{path}: not an audit log (no line is an audit record)")
        for rec in last:
            printer.show(rec)
        if not args.follow:
            return EXIT_OK
        for raw in follower.follow():
            rec = printer.wanted(raw)
            if rec is not None:
                printer.show(rec)
    except OSError as e:
        return fail("tail", f"cannot read {path}: {e.strerror or e}")
    finally:
        follower.close()
    return EXIT_OK  # pragma: no cover (follow never ends by itself)


def cmd_tail(args: argparse.Namespace) -> int:
    try:
        return run_tail(args, sys.stdout)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (``tail ... | head``): nothing more to say
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush error at exit)
        return EXIT_OK


def add_tail_parser(sub: Any) -> None:
    t = sub.add_parser(
        "tail",
        help="follow an audit log: one human line per decision (rotation included)",
    )
    t.add_argument("audit_log", metavar="AUDIT_LOG", help="the file `run --audit-log` writes")
    t.add_argument("--blocks", action="store_true", help="only refusals (block and would_block)")
    t.add_argument("--json", action="store_true", help="print the decision records as JSON lines")
    t.add_argument(
        "-n",
        "--lines",
        type=int,
        default=10,
        metavar="N",
        help="decisions already in the log to show first (default 10)",
    )
    t.add_argument(
        "--no-follow",
        dest="follow",
        action="store_false",
        help="print and exit instead of waiting for new decisions",
    )
    t.set_defaults(func=cmd_tail)
