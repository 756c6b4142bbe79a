"""``egress-guard policy from-opencode``: the policy an opencode.json needs.

The generated text is loaded before it is handed out (a policy that does not load is a
bug, reported as such), and written atomically so a failed write never leaves half a
policy where a proxy might read it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from egress_guard.cli.exits import EXIT_ERROR, EXIT_OK
from egress_guard.cli.shared import fail
from egress_guard.opencode.config import load_config
from egress_guard.opencode.contacts import parse_url
from egress_guard.opencode.jsonc import ConfigError
from egress_guard.opencode.policygen import generate
from egress_guard.policy import PolicyError, load_catalog, load_policy_text
from egress_guard.policy.writer import comment_safe, write_atomically


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


def add_policy_parser(sub: Any) -> None:
    """Register ``policy`` (today one action, ``from-opencode``)."""
    pol = sub.add_parser("policy", help="policy tools: derive a policy from opencode.json")
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
