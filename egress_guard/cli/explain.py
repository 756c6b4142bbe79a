"""``egress-guard explain TARGET...``: why a target is allowed or blocked, and by what.

``check`` says allowed or blocked; an operator fixing a policy needs to know *which*
rule decided, where it is written, and, when nothing matched, which rule came closest
(a typo in a host, a missing port). For each target this prints the decision, then:

* the destination that allowed it (or refused its port), with the host pattern that
  matched and its ``file:line`` (``include``d and ``use``d entries say so);
* the deny rule that refused it, with its ``file:line``;
* when nothing lists it: the catalog entries that cover it (``- use:`` would allow
  it), and the nearest rule in the policy, by host, with its ``file:line``.

The verdict itself comes from the engine, as the proxy's does: every engine call is
in ``verdict`` below, the one place to change when the engine's entry point does. What
this module adds is reading: which pattern of the deciding rule covers the host, and
how close the other rules come.
"""

from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from egress_guard.cli.exits import EXIT_ERROR, EXIT_FAIL, EXIT_OK
from egress_guard.cli.shared import policy_and_catalog
from egress_guard.engine import Approved, Decision, Engine, HostIndex, Target
from egress_guard.engine.rules.names import catalog_entries
from egress_guard.normalize import Host, NormalizationError, join_hostport, parse_target
from egress_guard.policy import EffectivePolicy, policies_dir
from egress_guard.policy.model import CatalogEntry
from egress_guard.policy.patterns import parse_pattern
from egress_guard.policy.yamlsrc import parse_yaml
from egress_guard.sinks.logsafe import escape

#: how many near rules are named when nothing matched
NEAREST = 3
#: how close (0..1) a rule's host must come to be named as a near rule
NEAR_ENOUGH = 0.6


class Verdict(NamedTuple):
    decision: Decision
    #: why the addresses were not checked, if they were not
    note: str | None
    #: usable catalog entries that cover the target (``- use:`` would allow it)
    catalog: list[str]


def verdict(engine: Engine, host: Host, port: int) -> Verdict:
    """The engine's decision for ``host:port`` as ``check`` makes it, and the catalog
    entries covering the target. No DNS here: decided on the name as a parent proxy
    would, so only IP literals and ``network.resolve`` entries have their addresses
    checked. The one place this module calls the engine."""
    answer = engine.decide(Target(host, port, parent_resolves=True))
    note = None
    if type(answer) is Approved:
        if answer.address is None and answer.destination is not None:
            note = (
                "addresses not checked (explain does not use DNS; a private address "
                "would still be refused)"
            )
        d = answer.decision
    else:
        d = answer  # type: ignore[assignment]
    return Verdict(d, note, catalog_entries(engine.compiled, host, port))


@dataclass
class Explanation:
    target: str
    decision: str
    reason: str
    host: str
    port: int | None
    #: what decided, each a line for people (``file:line`` included)
    matched: list[str] = field(default_factory=list)
    catalog: list[str] = field(default_factory=list)
    nearest: list[str] = field(default_factory=list)
    hint: str | None = None
    detail: str | None = None
    note: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            # the audit log's (and check --json's) words: allow, block, would_block
            "decision": _JSON_DECISION.get(self.decision, self.decision),
            "reason": self.reason,
            "host": self.host,
            "port": self.port,
            "matched": self.matched,
            "catalog": self.catalog,
            "nearest": self.nearest,
            "hint": self.hint,
            "detail": self.detail,
            "note": self.note,
        }


def _covering(patterns: list[str], host: Host, deny: bool = False) -> list[str]:
    """The patterns in ``patterns`` that cover ``host`` (the engine's own matcher)."""
    out = []
    for raw in patterns:
        try:
            index = HostIndex([(0, [parse_pattern(raw, deny=deny)])])
        except ValueError:
            continue
        ids = index.match_ip(host.ip) if host.ip is not None else index.match_name(host.value)
        if ids:
            out.append(raw)
    return out


def _closeness(host: str, pattern: str) -> float:
    bare = pattern.lstrip("*").lstrip(".")
    if pattern.startswith("*") and (host == bare or host.endswith("." + bare)):
        return 1.0
    return difflib.SequenceMatcher(None, host, bare).ratio()


def _nearest(pol: EffectivePolicy, host: Host) -> list[str]:
    scored: list[tuple[float, str]] = []
    for dest in pol.destinations:
        best = max(dest.hosts, key=lambda p: _closeness(host.value, p), default=None)
        if best is None:
            continue
        where = pol.origins.get(dest.name, "?")
        scored.append(
            (
                _closeness(host.value, best),
                f"destination {dest.name!r} ({where}): hosts {dest.hosts}, ports {dest.ports}",
            )
        )
    scored.sort(key=lambda s: -s[0])
    return [text for score, text in scored[:NEAREST] if score >= NEAR_ENOUGH]


def _catalog_lines(
    names: list[str], catalog: dict[str, CatalogEntry], lines: dict[str, int]
) -> list[str]:
    out = []
    where = policies_dir() / "catalog.yaml"
    for name in names:
        entry = catalog[name]
        line = lines.get(name)
        out.append(
            f"catalog entry {name!r} ({where}:{line if line else '?'}) covers it "
            f"({entry.purpose}): add '- use: {name}' to destinations to allow it"
        )
    return out


def explain_one(
    engine: Engine,
    pol: EffectivePolicy,
    catalog: dict[str, CatalogEntry],
    catalog_lines: dict[str, int],
    target: str,
) -> Explanation:
    try:
        host, port = parse_target(target)
    except NormalizationError as e:
        return Explanation(target, "invalid", "invalid_host", target, None, detail=str(e))
    d, note, covering = verdict(engine, host, port)
    ex = Explanation(
        target,
        {"allow": "allowed", "block": "blocked"}.get(d.action, d.action),
        d.reason,
        d.host,
        d.port,
        hint=d.hint,
        detail=d.detail,
        note=note,
    )
    dest = next((x for x in pol.destinations if x.name == d.destination), None)
    if d.reason == "denylisted":
        for i, rule in enumerate(pol.deny):
            hit = _covering(list(rule.hosts), host, deny=True)
            if hit and (rule.ports is None or port in rule.ports):
                ports = "all ports" if rule.ports is None else f"ports {rule.ports}"
                ex.matched.append(
                    f"deny rule ({pol.deny_origins[i]}): {hit[0]} ({ports}); "
                    "deny rules win over every allow"
                )
    elif dest is not None:
        where = pol.origins.get(dest.name, "?")
        hit = _covering(list(dest.hosts), host)
        pattern = f"host pattern {hit[0]!r}" if hit else "its hosts"
        ex.matched.append(f"destination {dest.name!r} ({where}): {pattern}, ports {dest.ports}")
        if dest.needs_inspection:
            ex.matched.append(
                "its request rules (methods, paths, models) apply only to plain HTTP, "
                "or to HTTPS with `run --inspect`"
            )
    else:
        ex.catalog = _catalog_lines(covering, catalog, catalog_lines)
        ex.nearest = _nearest(pol, host)
    return ex


_JSON_DECISION = {"allowed": "allow", "blocked": "block"}


def render(ex: Explanation) -> str:
    where = ex.host if ex.port is None else join_hostport(ex.host, ex.port)
    lines = [f"{escape(ex.target)}: {ex.decision.upper()} {escape(where)} ({ex.reason})"]
    if ex.matched:
        lines += [f"  matched: {escape(m)}" for m in ex.matched]
    elif ex.decision != "invalid":
        lines.append("  matched: no destination and no deny rule lists it")
    lines += [f"  catalog: {escape(c)}" for c in ex.catalog]
    if ex.nearest:
        lines += [f"  nearest rule: {escape(n)}" for n in ex.nearest]
    elif not ex.matched and ex.decision != "invalid":
        lines.append("  nearest rule: none comes close")
    for key in ("detail", "note", "hint"):
        value = getattr(ex, key)
        if value and not (key == "hint" and ex.decision == "allowed"):
            lines.append(f"  {key}: {escape(value)}")
    return "\n".join(lines)


def _catalog_entry_lines() -> dict[str, int]:
    """Line of each entry in the shipped catalog (its ``- name:``), for ``file:line``."""
    path = policies_dir() / "catalog.yaml"
    doc = parse_yaml(path.read_text(), str(path))
    entries = doc.data.get("entries", []) if isinstance(doc.data, dict) else []
    out: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            line = doc.line_of(("entries", i))
            if line is not None:
                out[entry["name"]] = line
    return out


def cmd_explain(args: argparse.Namespace) -> int:
    loaded = policy_and_catalog(args.policy)
    if loaded is None:
        return EXIT_ERROR
    pol, catalog = loaded
    try:
        catalog_lines = _catalog_entry_lines()
    except (OSError, ValueError):
        catalog_lines = {}
    engine = Engine(pol, catalog)
    results = [explain_one(engine, pol, catalog, catalog_lines, t) for t in args.targets]
    for i, ex in enumerate(results):
        if args.json:
            print(json.dumps(ex.as_json()))
        else:
            print(("\n" if i else "") + render(ex))
    if any(ex.decision == "invalid" for ex in results):
        return EXIT_ERROR
    return EXIT_FAIL if any(ex.decision == "blocked" for ex in results) else EXIT_OK


def add_explain_parser(sub: Any) -> None:
    e = sub.add_parser(
        "explain",
        help="which rule or catalog entry decides a target, with its file:line; "
        "or why nothing did, and the nearest rule",
    )
    e.add_argument(
        "--policy", metavar="FILE", help="policy file (default: built-in minimal preset)"
    )
    e.add_argument("--json", action="store_true", help="one JSON object per target")
    e.add_argument("targets", nargs="+", metavar="TARGET", help="host, host:port or URL")
    e.set_defaults(func=cmd_explain)
