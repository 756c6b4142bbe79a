"""The ``egress-guard`` argument parser: the top level and one sub-command per module.

Each command module owns its own flags next to the code that reads them
(``add_<command>_parser``); this module only puts them together, in the order
``--help`` lists them. Exit codes: ``egress_guard.cli.exits``.
"""

from __future__ import annotations

import argparse

from egress_guard import __version__
from egress_guard.cli.audit import add_audit_parser
from egress_guard.cli.ca import add_ca_parser
from egress_guard.cli.check import add_check_parser
from egress_guard.cli.doctor import add_doctor_parser
from egress_guard.cli.explain import add_explain_parser
from egress_guard.cli.policy import add_policy_parser
from egress_guard.cli.run import add_run_parser
from egress_guard.cli.sandbox import add_sandbox_parser
from egress_guard.cli.tail import add_tail_parser
from egress_guard.cli.validate import add_validate_parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="egress-guard",
        description="Egress policy proxy for AI coding agents (OpenCode).",
    )
    p.add_argument("--version", action="version", version=f"egress-guard {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_validate_parser(sub)
    add_check_parser(sub)
    add_explain_parser(sub)
    add_run_parser(sub)
    add_sandbox_parser(sub)
    add_ca_parser(sub)
    add_audit_parser(sub)
    add_tail_parser(sub)
    add_policy_parser(sub)
    add_doctor_parser(sub)
    return p
