"""The ``egress-guard`` command line.

Exit codes are part of the interface, for scripts and CI: 0 success / all allowed,
1 something was blocked or found wrong, 2 usage or policy errors.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Sequence

from egress_guard import __version__
from egress_guard.engine import Decision, Engine, Match
from egress_guard.engine.decide import request_rules
from egress_guard.normalize import NormalizationError, normalize_host, parse_target
from egress_guard.policy import (
    Destination,
    EffectivePolicy,
    PolicyError,
    load_catalog,
    load_policy,
    load_preset,
)

EXIT_OK, EXIT_BLOCKED, EXIT_ERROR = 0, 1, 2


def _policy(path: str | None) -> EffectivePolicy:
    """``--policy`` or the built-in minimal preset (the documented minimal allowlist)."""
    return load_policy(path) if path else load_preset("minimal")


def cmd_validate(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for f in args.files:
        try:
            pol = load_policy(f)
        except PolicyError as e:
            print(e.render(), file=sys.stderr)
            status = EXIT_ERROR
            continue
        names = ", ".join(d.name for d in pol.destinations) or "none"
        print(f"{f}: ok (mode {pol.mode}; destinations: {names}; sha256 {pol.sha256[:16]})")
        for dest in pol.destinations:
            if dest.needs_inspection:
                print(f"{f}: warning: {_inspection_warning(dest)}", file=sys.stderr)
    return status


def _inspection_warning(dest: Destination) -> str:
    rules = ", ".join(request_rules(dest))
    return (
        f"destination {dest.name!r} has request rules ({rules}): HTTPS tunnels to it are "
        "refused as inspection_required unless the proxy runs with `run --inspect` "
        "(audit mode: let through unchecked, recorded as would_block); plain-HTTP "
        "requests to it are checked as they are"
    )


def _check_one(engine: Engine, target: str, resolve: bool) -> dict[str, object]:
    try:
        host, port = parse_target(target)
    except NormalizationError as e:
        d: Decision | Match = Decision(
            False, "block", "invalid_host", None, target, None, None, str(e)
        )
    else:
        d = engine.decide_normalized(host, port)
    note = None
    dest: Destination | None = None
    if isinstance(d, Match):
        dest = d.destination
        addrs = engine.static_addresses(d.host)
        if addrs is None and resolve:
            try:
                infos = socket.getaddrinfo(d.host.value, d.port, type=socket.SOCK_STREAM)
                addrs = tuple(
                    ip for ip in (normalize_host(str(i[4][0])).ip for i in infos) if ip is not None
                )
            except OSError as e:
                note = f"DNS lookup failed: {e}"
                addrs = ()
        if addrs is None:
            note = "addresses not checked (run with --resolve to look the name up)"
            d = Decision(True, "allow", "allowlisted", d.destination.name, d.host.value, d.port)
        else:
            d = engine.decide_addresses(d, addrs)
    d = engine.finalize(d)
    return {
        "target": target,
        "host": d.host,
        "port": d.port,
        "decision": "allowed"
        if d.action == "allow"
        else ("blocked" if d.action == "block" else "would_block"),
        "destination": d.destination,
        "reason": d.reason,
        "hint": d.hint,
        "detail": d.detail or note,
        # `check` decides the target, not requests: request rules need `run --inspect`
        # for tunnels, and are not evaluated here
        "needs_inspection": bool(dest is not None and dest.needs_inspection),
        "warning": _inspection_warning(dest)
        if dest is not None and dest.needs_inspection
        else None,
    }


def cmd_check(args: argparse.Namespace) -> int:
    pol = _policy(args.policy)
    engine = Engine(pol, load_catalog())
    results = [_check_one(engine, t, args.resolve) for t in args.targets]
    for r in results:
        if args.json:
            print(json.dumps(r, sort_keys=False))
        else:
            where = f"{r['host']}:{r['port']}" if r["port"] else str(r["host"])
            dest = f" ({r['destination']})" if r["destination"] else ""
            print(f"{str(r['decision']).upper():<11} {where}{dest}  {r['reason']}")
            for key in ("detail", "hint", "warning"):
                if r[key] and (r["decision"] != "allowed" or key != "hint"):
                    print(f"            {key}: {r[key]}")
    return EXIT_BLOCKED if any(r["decision"] == "blocked" for r in results) else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="egress-guard",
        description="Egress policy proxy for AI coding agents (OpenCode).",
    )
    p.add_argument("--version", action="version", version=f"egress-guard {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser(
        "validate", help="check policy files; exit 2 on the first error, naming file:line"
    )
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=cmd_validate)

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

    from egress_guard.cli.audit import add_audit_parser
    from egress_guard.cli.ca import add_ca_parser
    from egress_guard.cli.opencode import add_opencode_parsers
    from egress_guard.cli.run import add_run_parser

    add_run_parser(sub)
    add_ca_parser(sub)
    add_audit_parser(sub)
    add_opencode_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PolicyError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
