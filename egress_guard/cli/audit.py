"""``egress-guard audit verify|summary|learn``: read audit logs written by ``AuditLog``.

verify   recompute the hash chain over the files in chain order (a rotated set given in
         any order, e.g. ``audit.log*``, is put oldest first). Exit 0 intact, 1 at the first
         break, naming file:line and what happened: edited, deleted, reordered, truncated
         or invalid. A chain whose first lines were rotated away is accepted with a note
         (``--require-start`` makes that an error). Deleting lines from the very end of
         the newest file cannot be seen by any unkeyed chain: compare the printed head hash
         with one recorded elsewhere.
summary  per destination and per blocked host: counts by decision, bytes, first/last seen.
learn    the smallest version-1 policy allowing the host:port targets of allowed and
         plainly not-listed decisions, using catalog entries (``- use:``) where one covers
         the target; never a denied or non-public target (docs/audit-log.md).

Exit codes as elsewhere: 0 ok, 1 something found wrong, 2 usage or I/O error.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, BinaryIO

from egress_guard.cli.exits import EXIT_ERROR, EXIT_FAIL, EXIT_OK
from egress_guard.engine import Decision, Engine, HostIndex, Match, special_class
from egress_guard.normalize import Host, NormalizationError, canonical_ip, normalize_host
from egress_guard.policy import (
    CatalogEntry,
    EffectivePolicy,
    PolicyError,
    load_catalog,
    load_policy,
    load_policy_text,
    load_preset,
)
from egress_guard.policy.model import DenyRule
from egress_guard.policy.patterns import parse_pattern
from egress_guard.policy.writer import (
    clients_lines,
    comment_safe,
    deny_lines,
    destination_lines,
    network_lines,
)
from egress_guard.sinks.audit import GENESIS, line_hash

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
DECISIONS = ("allow", "block", "would_block")

# -- reading -------------------------------------------------------------------------------


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
        obj = json.loads(raw)
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
            for i, chunk in enumerate(f, 1):
                complete = chunk.endswith(b"\n")
                raw = chunk[:-1] if complete else chunk
                obj, problem = _parse(raw)
                yield Line(name, i, raw, complete, obj, problem)


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


# -- verify --------------------------------------------------------------------------------


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


# -- records for summary and learn ---------------------------------------------------------


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
                obj = json.loads(ln.raw)
            except (ValueError, UnicodeDecodeError):
                obj = None
        if isinstance(obj, dict):
            yield Record(ln.where, obj)
        elif stats is not None:
            stats.unreadable += 1


def _hostport(host: str, port: object) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port is None else f"{h}:{port}"


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _seen(entry: dict[str, Any], ts: object) -> None:
    if not isinstance(ts, str):
        return
    if entry["first_seen"] is None or ts < entry["first_seen"]:
        entry["first_seen"] = ts
    if entry["last_seen"] is None or ts > entry["last_seen"]:
        entry["last_seen"] = ts


def summarize(records: Iterable[Record]) -> dict[str, Any]:
    dests: dict[str, dict[str, Any]] = {}
    blocked: dict[tuple[str, int | None], dict[str, Any]] = {}
    total: dict[str, Any] = {"events": 0, "first_seen": None, "last_seen": None}
    loads = {"ok": 0, "error": 0}
    dropped = 0
    startups = 0
    for rec in records:
        o = rec.obj
        ev, ts = o.get("event"), o.get("ts")
        total["events"] += 1
        _seen(total, ts)
        if ev == "startup":
            startups += 1
        elif ev == "policy_loaded":
            loads["ok" if o.get("result") == "ok" else "error"] += 1
        elif ev == "dropped":
            dropped += _int(o.get("count"))
        if ev not in ("decision", "close"):
            continue
        label = o.get("destination") or "unlisted"
        d = dests.setdefault(
            str(label),
            {
                **dict.fromkeys(DECISIONS, 0),
                "connections": 0,
                "bytes_up": 0,
                "bytes_down": 0,
                "first_seen": None,
                "last_seen": None,
            },
        )
        _seen(d, ts)
        decision = o.get("decision")
        if ev == "close":
            d["connections"] += 1
            d["bytes_up"] += _int(o.get("bytes_up"))
            d["bytes_down"] += _int(o.get("bytes_down"))
            continue
        if decision in DECISIONS:
            d[decision] += 1
        if decision in ("block", "would_block"):
            port = o.get("port")
            key = (str(o.get("host") or ""), port if isinstance(port, int) else None)
            b = blocked.setdefault(
                key,
                {
                    "host": key[0],
                    "port": key[1],
                    "block": 0,
                    "would_block": 0,
                    "reasons": {},
                    "first_seen": None,
                    "last_seen": None,
                },
            )
            b[decision] += 1
            reason = str(o.get("reason"))
            b["reasons"][reason] = b["reasons"].get(reason, 0) + 1
            _seen(b, ts)
    return {
        **total,
        "startups": startups,
        "policy_loads": loads,
        "dropped": dropped,
        "destinations": dict(sorted(dests.items())),
        "blocked_hosts": sorted(
            blocked.values(), key=lambda b: (-(b["block"] + b["would_block"]), b["host"])
        ),
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[str(h) for h in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def render_summary(s: Mapping[str, Any]) -> str:
    out = [
        f"{s['events']} events from {s['first_seen'] or '-'} to {s['last_seen'] or '-'}; "
        f"{s['startups']} start(s); policy loads: {s['policy_loads']['ok']} ok, "
        f"{s['policy_loads']['error']} failed; events lost: {s['dropped']}",
        "",
    ]
    dest_rows = [
        [
            name,
            d["allow"],
            d["block"],
            d["would_block"],
            d["connections"],
            d["bytes_up"],
            d["bytes_down"],
            d["first_seen"],
            d["last_seen"],
        ]
        for name, d in s["destinations"].items()
    ]
    out += _table(
        [
            "DESTINATION",
            "ALLOW",
            "BLOCK",
            "WOULD_BLOCK",
            "CONNS",
            "BYTES_UP",
            "BYTES_DOWN",
            "FIRST_SEEN",
            "LAST_SEEN",
        ],
        dest_rows,
    )
    out.append("")
    if s["blocked_hosts"]:
        rows = [
            [
                _hostport(b["host"], b["port"]),
                b["block"],
                b["would_block"],
                ",".join(f"{r}={n}" for r, n in sorted(b["reasons"].items())),
                b["first_seen"],
                b["last_seen"],
            ]
            for b in s["blocked_hosts"]
        ]
        out += _table(
            ["BLOCKED HOST", "BLOCK", "WOULD_BLOCK", "REASONS", "FIRST_SEEN", "LAST_SEEN"], rows
        )
    else:
        out.append("no blocked hosts")
    return "\n".join(out) + "\n"


# -- learn ---------------------------------------------------------------------------------

#: The records a destination may be learned from, by decision: traffic the policy let
#: through, and attempts refused only because no allow rule listed the host, its port or
#: its address (``block`` is the same attempt in enforce mode). An allowlist: any other
#: reason, and any reason or decision this version does not know, is left out.
_NOT_LISTED = frozenset({"not_allowlisted", "port_not_allowed", "ip_literal_not_allowed"})
LEARNABLE: Mapping[str, frozenset[str]] = {
    "allow": frozenset({"allowlisted"}),
    "would_block": _NOT_LISTED,
    "block": _NOT_LISTED,
}
#: A target with even one record for one of these reasons is never learned, whatever its
#: other records say: a deny rule refused it, it is (or resolved to) a non-public
#: address, or it is the guard itself.
TAINTING = frozenset({"denylisted", "private_address", "self_connection"})
#: Names that are a non-public address whatever DNS answers.
_SPECIAL_NAMES = {
    "localhost": "loopback",
    "metadata.google.internal": "metadata",
    "metadata.goog": "metadata",
}


def special_target(host: Host) -> str | None:
    """The non-public class of a target itself (an IP literal, or a name such as
    ``localhost``), without DNS; None for an ordinary name or a public address."""
    if host.ip is not None:
        return special_class(canonical_ip(host.ip))
    if host.value.endswith(".localhost"):
        return "loopback"
    return _SPECIAL_NAMES.get(host.value)


def _special_pattern(raw: str) -> bool:
    """Whether a host pattern names a non-public address or name."""
    try:
        p = parse_pattern(raw)
    except ValueError:
        return True
    if p.network is not None:
        net = p.network
        return any(special_class(canonical_ip(a)) for a in (net[0], net[-1]))
    name = str(p).lstrip("*.")
    return name in _SPECIAL_NAMES or name == "localhost" or name.endswith(".localhost")


def _source_allows(src: Engine, host: Host, port: int) -> bool:
    """Whether the source policy itself allows host:port outright (in enforce terms)."""
    verdict = src.decide_normalized(host, port)
    if not isinstance(verdict, Match):
        return False
    addrs = src.static_addresses(verdict.host)
    return addrs is None or src.decide_addresses(verdict, addrs).allowed


@dataclass
class _Target:
    host: Host
    port: int
    first: str
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    #: the policy destinations it was decided under (the rule names in force then)
    dests: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        return _hostport(self.host.value, self.port)

    def describe(self) -> str:
        n = sum(self.counts.values())
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        refused = {r: c for r, c in self.reasons.items() if r != "allowlisted"}
        why = f"; {', '.join(sorted(refused))}" if refused else ""
        under = f"; policy destination {', '.join(sorted(self.dests))}" if self.dests else ""
        return f"{self.label} - {n} event(s): {counts}{why}{under}; first at {self.first}"


@dataclass
class _Left:
    """Records of one target left out for one reason."""

    count: int
    first: str


@dataclass
class _Seen:
    targets: list[_Target]
    #: (host:port, why) -> how many records, first where
    left_out: dict[tuple[str, str], _Left]
    decisions: int = 0
    first_ts: str | None = None
    last_ts: str | None = None

    def leave_out(self, label: str, why: str, where: str, count: int = 1) -> None:
        left = self.left_out.get((label, why))
        if left is None:
            self.left_out[(label, why)] = _Left(count, where)
        else:
            left.count += count


def _targets(records: Iterable[Record], src: Engine | None, src_name: str | None) -> _Seen:
    """The candidate targets, and the records left out with why."""
    found: dict[tuple[str, int], _Target] = {}
    tainted: dict[tuple[str, int], str] = {}
    seen = _Seen([], {})
    for rec in records:
        o = rec.obj
        ts = o.get("ts")
        if isinstance(ts, str):
            seen.first_ts = ts if seen.first_ts is None else min(seen.first_ts, ts)
            seen.last_ts = ts if seen.last_ts is None else max(seen.last_ts, ts)
        if o.get("event") != "decision":
            continue
        seen.decisions += 1
        host, port = o.get("host"), _int(o.get("port"))
        decision, reason = str(o.get("decision")), str(o.get("reason"))
        record_kind = f"{decision} {reason}"
        if not isinstance(host, str) or not host or port not in range(1, 65536):
            seen.leave_out("(no target)", record_kind, rec.where)
            continue
        try:
            h = normalize_host(host)
        except NormalizationError:
            seen.leave_out(_hostport(host, port), f"{record_kind}; invalid host", rec.where)
            continue
        key = (h.value, port)
        label = _hostport(h.value, port)
        if reason in TAINTING:
            tainted.setdefault(key, reason)
        if reason not in LEARNABLE.get(decision, ()):
            seen.leave_out(label, record_kind, rec.where)
            continue
        cls = special_target(h)
        if cls is not None:
            if cls.startswith("metadata"):
                why = f"{record_kind}; {cls} address: never learned"
            elif src is None:
                why = f"{record_kind}; {cls} address (give --policy if your policy allows it)"
            elif not _source_allows(src, h, port):
                why = f"{record_kind}; {cls} address not allowed by {src_name}"
            else:
                why = None
            if why is not None:
                seen.leave_out(label, why, rec.where)
                continue
        t = found.setdefault(key, _Target(h, port, rec.where))
        t.counts[decision] = t.counts.get(decision, 0) + 1
        t.reasons[reason] = t.reasons.get(reason, 0) + 1
        if isinstance(o.get("destination"), str):
            t.dests.add(o["destination"])
    for key, t in found.items():
        if key in tainted:
            n = sum(t.counts.values())
            seen.leave_out(t.label, f"also recorded as {tainted[key]}: never learned", t.first, n)
        else:
            seen.targets.append(t)
    return seen


def _covering(
    targets: Sequence[_Target], catalog: Mapping[str, CatalogEntry]
) -> dict[str, list[int]]:
    # An entry that names a non-public address or name (local model servers) is never
    # taken whole: a target it covers gets a destination of its own, no wider.
    usable = [
        (n, e)
        for n, e in catalog.items()
        if e.usable is None and not any(_special_pattern(h) for h in e.hosts)
    ]
    index = HostIndex((i, e.hosts) for i, (_, e) in enumerate(usable))
    covers: dict[str, list[int]] = {}
    for ti, t in enumerate(targets):
        ids = index.match_ip(t.host.ip) if t.host.ip is not None else index.match_name(t.host.value)
        for i in ids:
            name, entry = usable[i]
            if t.port in entry.ports:
                covers.setdefault(name, []).append(ti)
    return covers


def _choose(
    targets: Sequence[_Target], catalog: Mapping[str, CatalogEntry]
) -> tuple[list[tuple[str, list[int]]], list[int]]:
    """Greedy cover: the catalog entry covering most unexplained targets first; on a tie
    the narrower entry (fewer hosts x ports), then the name. Returns (entry, targets) in
    order of first appearance, and the targets no catalog entry covers."""
    covers = _covering(targets, catalog)
    left = {i for ids in covers.values() for i in ids}
    chosen: list[tuple[str, list[int]]] = []
    while left:
        name = min(
            covers,
            key=lambda n: (
                -len(left.intersection(covers[n])),
                len(catalog[n].hosts) * len(catalog[n].ports),
                n,
            ),
        )
        got = sorted(left.intersection(covers[name]))
        chosen.append((name, got))
        left.difference_update(got)
    chosen.sort(key=lambda c: c[1][0])
    covered = {i for _, ids in chosen for i in ids}
    return chosen, [i for i in range(len(targets)) if i not in covered]


def _dest_name(host: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9_-]+", "-", host.lower()).strip("-_")[:56] or "destination"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


@dataclass(frozen=True)
class Source:
    """The policy the audit log was written under (``audit learn --policy``)."""

    policy: EffectivePolicy
    path: str


def _render(
    seen: _Seen,
    targets: Sequence[_Target],
    catalog: Mapping[str, CatalogEntry],
    sources: Sequence[str],
    source: Source | None,
    deny: Sequence[DenyRule],
) -> str:
    chosen, uncovered = _choose(targets, catalog)
    c = comment_safe
    out = [
        f"# Learned by `egress-guard audit learn` from {c(', '.join(sources))}",
        f"# {seen.decisions} decision event(s)"
        + (f" from {c(seen.first_ts)} to {c(seen.last_ts or '')}" if seen.first_ts else "")
        + f"; {len(targets)} host:port target(s) learned; "
        + f"{sum(x.count for x in seen.left_out.values())} record(s) left out (listed at the end).",
        "# It allows what was contacted or attempted in that window, nothing else known.",
        "# Review every line before use: an attempt is not proof that a destination is needed.",
        "# Never learned: denied, non-public (private, loopback, link-local, metadata ...),",
        "# DNS-failed, malformed or client-refused attempts, or any other refusal reason.",
    ]
    if source is not None:
        out.append(f"# deny, network and clients: copied from {c(source.path)}.")
    else:
        out.append("# deny: the minimal preset's (cloud metadata); give --policy to copy yours.")
    out += ["version: 1", "mode: enforce"]
    if not targets:
        out.append("destinations: []  # nothing learned: this policy blocks everything")
    else:
        out.append("destinations:")
    for name, ids in chosen:
        entry = catalog[name]
        out.append(f"  # catalog entry {name!r} ({c(entry.purpose)}) covers:")
        out += [f"  #   {c(targets[i].describe())}" for i in ids]
        out.append(f"  - use: {name}")
    by_host: dict[str, list[_Target]] = {}
    for i in uncovered:
        by_host.setdefault(targets[i].host.value, []).append(targets[i])
    taken = set(catalog)
    for host, group in by_host.items():
        ports = sorted(t.port for t in group)
        out.append("  # no catalog entry covers:")
        out += [f"  #   {c(t.describe())}" for t in group]
        purpose = "learned: first seen at " + group[0].first
        out += [
            f"  {line}"
            for line in destination_lines(_dest_name(host, taken), purpose, [host], ports)
        ]
    out.append("deny:" if deny else "deny: []")
    out += deny_lines(deny)
    if source is not None:
        out += network_lines(source.policy.network)
        out += clients_lines(source.policy.clients, FsPath(source.path).parent)
    if seen.left_out:
        out += ["", "# Left out, never learned (host:port - why - records - first at):"]
        for (label, why), left in sorted(
            seen.left_out.items(), key=lambda kv: (-kv[1].count, kv[0])
        ):
            out.append(f"#   {c(label)} - {c(why)} - {left.count} - {c(left.first)}")
    return "\n".join(out) + "\n"


def _refused(eng: Engine, t: _Target) -> Decision | None:
    """The learned policy's own verdict on a learned target: None when it allows it."""
    verdict = eng.decide_normalized(t.host, t.port)
    if isinstance(verdict, Decision):
        return verdict
    addrs = eng.static_addresses(verdict.host)
    if addrs is None:
        return None  # a name: its addresses are checked when it is used
    d = eng.decide_addresses(verdict, addrs)
    return None if d.allowed else d


@dataclass(frozen=True)
class Learned:
    text: str
    #: targets learned, and (host:port, why) pairs left out
    learned: int
    left_out: int


def learn(
    records: Iterable[Record],
    catalog: Mapping[str, CatalogEntry],
    sources: Sequence[str],
    source: Source | None = None,
) -> Learned:
    """A version-1 policy allowing the host:port targets the rules above may learn, as
    YAML text; with ``source``, its deny, network and clients sections too.

    Each candidate is run through the engine built from the learned policy itself (deny
    rules included): one the policy would not allow is left out and the policy written
    again, until it allows every target it names. Raises PolicyError when the text does
    not load (a bug)."""
    src = Engine(source.policy, catalog) if source is not None else None
    seen = _targets(records, src, source.path if source is not None else None)
    deny = source.policy.deny if source is not None else load_preset("minimal").deny
    deny_from = source.path if source is not None else "the minimal preset"
    targets = list(seen.targets)
    while True:
        text = _render(seen, targets, catalog, sources, source, deny)
        eng = Engine(load_policy_text(text, "learned.yaml"), catalog)
        keep: list[_Target] = []
        for t in targets:
            d = _refused(eng, t)
            if d is None:
                keep.append(t)
                continue
            why = (
                f"denied by the deny rules of {deny_from}"
                if d.reason == "denylisted"
                else f"{d.reason} under the learned policy ({d.detail or d.hint or ''})"
            )
            seen.leave_out(t.label, why, t.first, sum(t.counts.values()))
        if len(keep) == len(targets):
            return Learned(text, len(targets), len(seen.left_out))
        targets = keep


# -- commands ------------------------------------------------------------------------------


def _files(args: argparse.Namespace) -> list[str]:
    files = order_files(args.files)
    if files != list(args.files):
        print(f"reading in rotation order: {' '.join(files)}", file=sys.stderr)
    return files


def cmd_verify(args: argparse.Namespace) -> int:
    files = _files(args)
    try:
        res = verify(files, require_start=args.require_start)
    except OSError as e:
        print(f"egress-guard audit verify: {e}", file=sys.stderr)
        return EXIT_ERROR
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    if res.broken is not None:
        print(f"FAIL {res.broken}")
        return EXIT_FAIL
    if res.lines == 0:
        print("OK: no lines")
        return EXIT_OK
    print(
        f"OK: {res.lines} lines in {len(files)} file(s), seq {res.first_seq}..{res.last_seq}, "
        f"head {res.head}"
    )
    return EXIT_OK


def cmd_summary(args: argparse.Namespace) -> int:
    stats = ReadStats()
    try:
        s = summarize(iter_records(_files(args), stats))
    except OSError as e:
        print(f"egress-guard audit summary: {e}", file=sys.stderr)
        return EXIT_ERROR
    if stats.unreadable:
        print(f"warning: {stats.unreadable} unreadable line(s) skipped", file=sys.stderr)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        sys.stdout.write(render_summary(s))
    return EXIT_OK


def cmd_learn(args: argparse.Namespace) -> int:
    files = _files(args)
    stats = ReadStats()
    source: Source | None = None
    if args.policy:
        try:
            source = Source(load_policy(args.policy), args.policy)
        except PolicyError as e:
            print(e.render(), file=sys.stderr)
            return EXIT_ERROR
    try:
        learned = learn(iter_records(files, stats), load_catalog(), files, source)
    except OSError as e:
        print(f"egress-guard audit learn: {e}", file=sys.stderr)
        return EXIT_ERROR
    except PolicyError as e:  # never hand out a policy that does not load
        print(
            "egress-guard audit learn: the learned policy does not load (a bug):", file=sys.stderr
        )
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    if stats.unreadable:
        print(f"warning: {stats.unreadable} unreadable line(s) skipped", file=sys.stderr)
    if learned.left_out:
        print(
            f"note: {learned.left_out} left-out target(s) and reason(s), never learned: "
            "listed at the end of the policy",
            file=sys.stderr,
        )
    if args.output:
        tmp = f"{args.output}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(learned.text)
        os.replace(tmp, args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(learned.text)
    return EXIT_OK


def add_audit_parser(sub: Any) -> None:
    a = sub.add_parser("audit", help="verify, summarise or learn a policy from audit logs")
    asub = a.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    files_help = (
        "audit log files in chain order (a rotated set such as audit.log* is sorted); - for stdin"
    )

    v = asub.add_parser("verify", help="check the hash chain; exit 1 naming the first broken line")
    v.add_argument("files", nargs="+", metavar="FILE", help=files_help)
    v.add_argument(
        "--require-start",
        action="store_true",
        help="fail unless the chain starts at its first line ever written (seq 1)",
    )
    v.set_defaults(func=cmd_verify)

    s = asub.add_parser("summary", help="per destination and per blocked host counts")
    s.add_argument("files", nargs="+", metavar="FILE", help=files_help)
    s.add_argument("--json", action="store_true", help="JSON instead of tables")
    s.set_defaults(func=cmd_summary)

    lp = asub.add_parser(
        "learn",
        help="a minimal policy allowing the host:port targets seen (never denied or "
        "non-public ones)",
    )
    lp.add_argument("files", nargs="+", metavar="FILE", help=files_help)
    lp.add_argument(
        "--policy",
        metavar="FILE",
        help="the policy the log was written under: its deny, network and clients sections "
        "are copied, and nothing its deny rules deny is learned",
    )
    lp.add_argument("-o", "--output", metavar="FILE", help="write the policy here (default stdout)")
    lp.set_defaults(func=cmd_learn)
