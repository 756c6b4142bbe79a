"""``audit verify``: recompute the hash chain over the files in chain order and name the
first break, file:line and what happened: edited, deleted, reordered, truncated or
invalid. A chain whose first lines were rotated away is accepted with a note
(``require_start`` makes that an error). Deleting lines from the very end of the newest
file cannot be seen by any unkeyed chain: compare the head hash with one recorded
elsewhere."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from egress_guard.sinks.audit.chain import GENESIS, line_hash
from egress_guard.sinks.audit.read import Line, iter_lines


@dataclass(frozen=True, slots=True)
class Break:
    where: str
    kind: str  # edited | deleted | reordered | truncated | invalid | incomplete
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}: {self.message}"


@dataclass
class VerifyResult:
    files: list[str]
    lines: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: str | None = None
    broken: Break | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.broken is None


def verify(paths: Sequence[str], require_start: bool = False) -> VerifyResult:
    """Check the hash chain across ``paths`` (already in chain order). Raises OSError."""
    res = VerifyResult(files=list(paths))
    res.broken = _walk(iter_lines(paths), res, require_start)
    return res


def _walk(lines: Iterator[Line], res: VerifyResult, require_start: bool) -> Break | None:
    """One pass with one line of lookahead (the next line is needed to tell which of two
    lines was edited, and to recognise a torn line sealed at restart)."""
    expected_prev: str | None = None
    expected_seq: int | None = None
    before: Line | None = None
    ln = next(lines, None)
    while ln is not None:
        nxt = next(lines, None)
        res.lines += 1
        h = line_hash(ln.raw)
        if not ln.complete:
            return Break(
                ln.where,
                "truncated",
                f"partial last line ({len(ln.raw)} bytes, no newline): the file was "
                "truncated or the last write was cut short",
            )
        if ln.obj is None:
            if (
                nxt is not None
                and nxt.obj is not None
                and nxt.obj.get("event") == "startup"
                and nxt.obj.get("recovered") == "torn_line"
                and nxt.obj["prev"] == h
            ):
                res.notes.append(
                    f"{ln.where}: partial line from an interrupted write, sealed at the "
                    f"restart recorded at {nxt.where}"
                )
                expected_prev, before, ln = h, ln, nxt
                continue
            return Break(
                ln.where,
                "invalid",
                f"{ln.problem}: the line was edited, corrupted or cut short",
            )
        seq: int = ln.obj["seq"]
        prev: str = ln.obj["prev"]
        if expected_prev is None:
            if prev == GENESIS:
                if seq != 1:
                    return Break(ln.where, "edited", f"the chain's first line has seq {seq}, not 1")
            else:
                msg = (
                    f"the chain starts at seq {seq} with prev {prev[:16]}...: the earlier "
                    "lines are not in these files (rotated away, or cut off)"
                )
                if require_start:
                    return Break(ln.where, "incomplete", msg)
                res.notes.append(f"{ln.where}: {msg}")
        elif prev != expected_prev:
            rest = itertools.chain([nxt], lines) if nxt is not None else lines
            return _diagnose(ln, nxt, rest, before, expected_seq)
        elif expected_seq is not None and seq != expected_seq:
            return Break(
                ln.where,
                "edited",
                f"seq is {seq}, expected {expected_seq} (the chain itself is intact, so the "
                "seq field was changed)",
            )
        if res.first_seq is None:
            res.first_seq = seq
        expected_prev, expected_seq, before = h, seq + 1, ln
        res.last_seq = seq
        ln = nxt
    res.head = expected_prev
    return None


def _diagnose(
    ln: Line,
    nxt: Line | None,
    rest: Iterator[Line],
    before: Line | None,
    expected_seq: int | None,
) -> Break:
    """Name what broke the chain at ``ln`` (its prev does not match the line before)."""
    assert ln.obj is not None
    seq: int = ln.obj["seq"]
    boundary = ""
    if ln.lineno == 1 and before is not None and before.file != ln.file:
        boundary = f" (first line of {ln.file}: is a rotated file missing or out of order?)"
    if expected_seq is not None and seq != expected_seq:
        if seq > expected_seq:
            later = next(
                (x for x in rest if x.obj is not None and x.obj["seq"] == expected_seq), None
            )
            if later is not None:
                return Break(
                    ln.where,
                    "reordered",
                    f"seq {seq} where {expected_seq} was expected; seq {expected_seq} comes "
                    f"later, at {later.where}: lines were moved",
                )
            missing = seq - expected_seq
            return Break(
                ln.where,
                "deleted",
                f"{missing} line(s) missing before this one (seq {seq} follows seq "
                f"{expected_seq - 1}){boundary}",
            )
        return Break(
            ln.where,
            "reordered",
            f"seq {seq} where {expected_seq} was expected: lines were moved or duplicated"
            f"{boundary}",
        )
    # The sequence is continuous, so no line is missing: a line's bytes changed. Either the
    # previous line (its hash no longer matches this line's prev) or this line's prev.
    if nxt is not None and nxt.obj is not None and nxt.obj["prev"] != line_hash(ln.raw):
        return Break(
            ln.where,
            "edited",
            "neither does this line chain to the previous one nor the next to this: "
            "this line was edited",
        )
    where = before.where if before is not None else ln.where
    return Break(
        where,
        "edited",
        f"its content no longer matches the hash recorded as prev in the next line ({ln.where})",
    )
