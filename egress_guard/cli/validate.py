"""``egress-guard validate``: load policy files and say what each allows, or where it is
wrong: every error, each at its ``file:line`` (policy/errors.py), so one run shows all
there is to fix. A catalog (``policies/catalog.yaml``) is validated as a catalog, so the
README's ``validate policies/*.yaml`` checks everything shipped."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from egress_guard.cli.exits import EXIT_ERROR, EXIT_OK
from egress_guard.cli.shared import inspection_warning
from egress_guard.policy import PolicyError, load_catalog, load_policy
from egress_guard.policy.loader import is_catalog_file


def cmd_validate(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for f in args.files:
        if is_catalog_file(f):
            try:
                entries = load_catalog(Path(f))
            except PolicyError as e:
                print(e.render(), file=sys.stderr)
                status = EXIT_ERROR
                continue
            usable = sum(1 for e in entries.values() if e.usable is None)
            print(f"{f}: ok (catalog; {len(entries)} entries, {usable} usable with '- use:')")
            continue
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
        "validate",
        help="check policy (or catalog) files; report every error at its file:line, exit 2",
    )
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=cmd_validate)
