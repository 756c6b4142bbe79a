"""``egress-guard validate``: load policy files and say what each allows, or where it is
wrong (``file:line``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from egress_guard.cli.exits import EXIT_ERROR, EXIT_OK
from egress_guard.cli.shared import inspection_warning
from egress_guard.policy import PolicyError, load_policy


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
                print(f"{f}: warning: {inspection_warning(dest)}", file=sys.stderr)
    return status


def add_validate_parser(sub: Any) -> None:
    v = sub.add_parser(
        "validate", help="check policy files; exit 2 on the first error, naming file:line"
    )
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=cmd_validate)
