"""``egress-guard check``: decide targets with the engine, without a proxy.

It decides the target (name, port, addresses with ``--resolve``), not requests: request
rules need ``run --inspect`` for tunnels and are not evaluated here.

Exit codes (README): 0 every target allowed, 1 any blocked, 2 any target unusable (empty,
not a host name, a port outside 1-65535): a script asking about a typo must not read
"blocked" as an answer about a real destination. ``--json`` speaks the audit log's
vocabulary (``decision``: ``allow``, ``block``, ``would_block``), so the same ``jq``
filter reads both.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

from egress_guard.cli.exits import EXIT_ERROR, EXIT_FAIL, EXIT_OK
from egress_guard.cli.shared import inspection_warning, policy_or_minimal
from egress_guard.engine import Approved, Engine, Target
from egress_guard.engine.verdicts import invalid_host
from egress_guard.normalize import NormalizationError, parse_target, socket_ip
from egress_guard.policy import Destination, load_catalog
from egress_guard.sinks.logsafe import escape


def _check_one(engine: Engine, target: str, resolve: bool) -> dict[str, object]:
    note = None
    dest: Destination | None = None
    try:
        host, port = parse_target(target)
    except NormalizationError as e:
        d = invalid_host(target, str(e))
    else:
        # decided on the name as a parent proxy would, then (--resolve) on the addresses
        # DNS gives a name the policy lists
        facts = Target(host, port, parent_resolves=True)
        verdict = engine.decide(facts)
        if type(verdict) is Approved and verdict.address is None and verdict.destination:
            if resolve:
                try:
                    infos = socket.getaddrinfo(host.value, port, type=socket.SOCK_STREAM)
                    addrs = tuple(socket_ip(str(i[4][0])) for i in infos)
                except OSError as e:
                    note = f"DNS lookup failed: {e}"
                    addrs = ()
                verdict = engine.decide(facts._replace(addresses=addrs))
            else:
                note = "addresses not checked (run with --resolve to look the name up)"
        if type(verdict) is Approved:
            d, dest = verdict.decision, verdict.destination
        else:
            d = verdict  # type: ignore[assignment]
            # a refusal after the name matched (its addresses) keeps the destination
            named = d.reason != "port_not_allowed"
            dest = engine.destination(d.destination) if named else None
    return {
        "target": target,
        "host": d.host,
        "port": d.port,
        "decision": d.action,  # allow, block, would_block: as the audit log writes it
        "destination": d.destination,
        "reason": d.reason,
        "hint": d.hint,
        "detail": d.detail or note,
        # `check` decides the target, not requests: request rules need `run --inspect`
        # for tunnels, and are not evaluated here
        "needs_inspection": bool(dest is not None and dest.needs_inspection),
        "warning": inspection_warning(dest) if dest is not None and dest.needs_inspection else None,
    }


def cmd_check(args: argparse.Namespace) -> int:
    pol = policy_or_minimal(args.policy)
    engine = Engine(pol, load_catalog())
    results = [_check_one(engine, t, args.resolve) for t in args.targets]
    for r in results:
        if args.json:
            print(json.dumps(r, sort_keys=False))
        else:
            where = f"{r['host']}:{r['port']}" if r["port"] else str(r["host"])
            dest = f" ({r['destination']})" if r["destination"] else ""
            label = _LABELS[str(r["decision"])]
            print(f"{label:<11} {escape(where)}{dest}  {r['reason']}")
            for key in ("detail", "hint", "warning"):
                if r[key] and (r["decision"] != "allow" or key != "hint"):
                    print(f"            {key}: {escape(str(r[key]))}")
    unusable = [r for r in results if r["reason"] == "invalid_host"]
    for r in unusable:  # why the exit is 2, on stderr: stdout stays one answer per target
        target, why = escape(repr(r["target"])), escape(str(r["detail"]))
        print(f"egress-guard check: {target} is not a target: {why}", file=sys.stderr)
    if unusable:
        return EXIT_ERROR
    return EXIT_FAIL if any(r["decision"] == "block" for r in results) else EXIT_OK


#: the human lines keep the words a reader scans for
_LABELS = {"allow": "ALLOWED", "block": "BLOCKED", "would_block": "WOULD_BLOCK"}


def add_check_parser(sub: Any) -> None:
    c = sub.add_parser("check", help="decide targets (host, host:port or URL) without a proxy")
    c.add_argument(
        "--policy", metavar="FILE", help="policy file (default: built-in minimal preset)"
    )
    c.add_argument("--json", action="store_true", help="one JSON object per target")
    c.add_argument(
        "--resolve", action="store_true", help="look names up in DNS and check the addresses"
    )
    c.add_argument("targets", nargs="+", metavar="TARGET")
    c.set_defaults(func=cmd_check)
