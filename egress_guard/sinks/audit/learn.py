"""``audit learn``: the smallest version-1 policy allowing the host:port targets of allowed
and plainly not-listed decisions, using catalog entries (``- use:``) where one covers the
target; never a denied or non-public target (docs/audit-log.md). The learned policy is
checked by the engine built from it before it is handed out."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath

from egress_guard.engine import Approved, Decision, Engine, HostIndex, Target, special_class
from egress_guard.normalize import (
    Host,
    NormalizationError,
    canonical_ip,
    join_hostport,
    normalize_host,
)
from egress_guard.policy import (
    CatalogEntry,
    EffectivePolicy,
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
from egress_guard.sinks.audit.read import Record, as_int

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
    """Whether the source policy itself allows host:port outright (in enforce terms: an
    ``allow``, not a would_block). A name is decided on the name (its addresses are
    checked when it is used), as a parent proxy would."""
    verdict = src.decide(Target(host, port, parent_resolves=True))
    return type(verdict) is Approved and verdict.decision.action == "allow"


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
        return join_hostport(self.host.value, self.port)

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
        host, port = o.get("host"), as_int(o.get("port"))
        decision, reason = str(o.get("decision")), str(o.get("reason"))
        record_kind = f"{decision} {reason}"
        if not isinstance(host, str) or not host or port not in range(1, 65536):
            seen.leave_out("(no target)", record_kind, rec.where)
            continue
        try:
            h = normalize_host(host)
        except NormalizationError:
            seen.leave_out(join_hostport(host, port), f"{record_kind}; invalid host", rec.where)
            continue
        key = (h.value, port)
        label = join_hostport(h.value, port)
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
    """The learned policy's own verdict on a learned target: None when it allows it (a
    name: its addresses are checked when it is used)."""
    verdict = eng.decide(Target(t.host, t.port, parent_resolves=True))
    if type(verdict) is Approved:
        d = verdict.decision
        return None if d.action == "allow" else d
    return verdict  # type: ignore[return-value]


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
