"""``egress-guard policy from-opencode|show``.

``from-opencode``: the policy an opencode.json needs. The generated text is loaded
before it is handed out (a policy that does not load is a bug, reported as such), and
written atomically so a failed write never leaves half a policy where a proxy might
read it.

``show``: the effective policy, what the proxy enforces once ``include`` and ``use`` are
resolved: every destination in policy order (the first that allows a port wins) with
the ``file:line`` it comes from, the deny rules, network and clients. It is itself a
policy file (no ``include``, no ``use``) that loads to the same destinations, so it can
be diffed, reviewed, or pinned.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from egress_guard.cli.exits import EXIT_ERROR, EXIT_OK
from egress_guard.cli.shared import fail, policy_and_catalog
from egress_guard.opencode.config import load_config
from egress_guard.opencode.contacts import parse_url
from egress_guard.opencode.jsonc import ConfigError
from egress_guard.opencode.policygen import generate
from egress_guard.policy import EffectivePolicy, PolicyError, load_catalog, load_policy_text
from egress_guard.policy.model import CatalogEntry, Destination
from egress_guard.policy.writer import (
    clients_lines,
    comment_safe,
    deny_lines,
    destination_lines,
    flow_list,
    network_lines,
    write_atomically,
)


def cmd_from_opencode(args: argparse.Namespace) -> int:
    for url in args.remote_config:
        ep, _unresolved, problem = parse_url(url)
        if ep is None:
            return fail(
                "policy from-opencode",
                f"--remote-config {url!r}: {problem or 'substitutions are not resolved here'}",
            )
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    gen = generate(cfg, load_catalog(), args.config, args.remote_config)
    try:  # never hand out a policy that does not load
        load_policy_text(gen.text, args.output or "<stdout>")
    except PolicyError as e:
        print(
            "egress-guard policy from-opencode: the generated policy does not load (a bug):",
            file=sys.stderr,
        )
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    if args.output:
        try:
            write_atomically(args.output, gen.text)
        except OSError as e:
            return fail("policy from-opencode", f"cannot write {args.output}: {e.strerror or e}")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(gen.text)
    for w in gen.warnings:
        print(f"warning: {comment_safe(w)}", file=sys.stderr)
    for n in gen.notes:
        print(f"note: {comment_safe(n)}", file=sys.stderr)
    return EXIT_OK


def _destination(dest: Destination, origin: str, catalog: dict[str, CatalogEntry]) -> list[str]:
    entry = catalog.get(dest.name)
    if entry is not None and entry.usable is None and entry.as_destination() == dest:
        origin += f" (catalog entry {dest.name!r})"
    lines = [f"  # {comment_safe(origin)}"]
    lines += [
        "  " + ln for ln in destination_lines(dest.name, dest.purpose, dest.hosts, dest.ports)
    ]
    for key in ("methods", "paths", "models"):
        values = getattr(dest, key)
        if values:
            lines.append(f"    {key}: {flow_list(values)}")
    return lines


def effective_text(pol: EffectivePolicy, catalog: dict[str, CatalogEntry]) -> str:
    """The effective policy as a policy file, each rule under a comment with its origin."""
    out = [
        f"# effective policy of {comment_safe(pol.source)} (sha256 {pol.sha256})",
        "# include and use resolved; destinations in the order they are matched",
        "version: 1",
        f"mode: {pol.mode}",
        "destinations:" if pol.destinations else "destinations: []",
    ]
    for dest in pol.destinations:
        out += _destination(dest, pol.origins.get(dest.name, "?"), catalog)
    if pol.deny:
        out.append("deny:")
        for rule, origin in zip(pol.deny, pol.deny_origins, strict=False):
            out.append(f"  # {comment_safe(origin)}")
            out += deny_lines([rule])
    else:
        out.append("deny: []")
    out += network_lines(pol.network)
    source = Path(pol.source)
    out += clients_lines(pol.clients, source.parent if source.is_file() else None)
    return "\n".join(out) + "\n"


def effective_json(pol: EffectivePolicy) -> dict[str, Any]:
    return {
        "source": pol.source,
        "sha256": pol.sha256,
        "mode": pol.mode,
        "destinations": [
            {**d.model_dump(exclude_none=True), "origin": pol.origins.get(d.name)}
            for d in pol.destinations
        ],
        "deny": [
            {**r.model_dump(), "origin": o}
            for r, o in zip(pol.deny, pol.deny_origins, strict=False)
        ],
        "network": pol.network.model_dump(),
        "clients": pol.clients.model_dump(),
    }


def cmd_show(args: argparse.Namespace) -> int:
    loaded = policy_and_catalog(args.policy)
    if loaded is None:
        return EXIT_ERROR
    pol, catalog = loaded
    if args.json:
        print(json.dumps(effective_json(pol), indent=2))
    else:
        sys.stdout.write(effective_text(pol, catalog))
    return EXIT_OK


def add_policy_parser(sub: Any) -> None:
    """Register ``policy`` and its actions, ``from-opencode`` and ``show``."""
    pol = sub.add_parser(
        "policy", help="policy tools: derive a policy from opencode.json, show the effective one"
    )
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    fo = psub.add_parser(
        "from-opencode",
        help="the policy an opencode.json / opencode.jsonc needs (exit 2 if it is invalid)",
    )
    fo.add_argument("config", metavar="opencode.json")
    fo.add_argument("-o", "--output", metavar="FILE", help="write the policy here (default stdout)")
    fo.add_argument(
        "--remote-config",
        metavar="URL",
        action="append",
        default=[],
        help="the URL given to `opencode auth login <url>` (its /.well-known/opencode is "
        "fetched at start-up); repeatable",
    )
    fo.set_defaults(func=cmd_from_opencode)
    sh = psub.add_parser(
        "show",
        help="the effective policy (include and use resolved), each rule with its file:line",
    )
    sh.add_argument(
        "--policy", metavar="FILE", help="policy file (default: built-in minimal preset)"
    )
    sh.add_argument("--json", action="store_true", help="as one JSON object")
    sh.set_defaults(func=cmd_show)
