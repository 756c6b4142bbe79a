"""Small pieces more than one command needs: the ``--policy`` default, the warning about
request rules without inspection, and the one-line error every command prints."""

from __future__ import annotations

import sys

from egress_guard.cli.exits import EXIT_ERROR
from egress_guard.engine.decide import request_rules
from egress_guard.policy import Destination, EffectivePolicy, load_policy, load_preset


def policy_or_minimal(path: str | None) -> EffectivePolicy:
    """``--policy`` or the built-in minimal preset (the documented minimal allowlist)."""
    return load_policy(path) if path else load_preset("minimal")


def inspection_warning(dest: Destination) -> str:
    """Why a destination's request rules do nothing for HTTPS without ``run --inspect``
    (``validate`` and ``check`` both say it, in the same words)."""
    rules = ", ".join(request_rules(dest))
    return (
        f"destination {dest.name!r} has request rules ({rules}): HTTPS tunnels to it are "
        "refused as inspection_required unless the proxy runs with `run --inspect` "
        "(audit mode: let through unchecked, recorded as would_block); plain-HTTP "
        "requests to it are checked as they are"
    )


def fail(command: str, message: str) -> int:
    """``egress-guard <command>: <message>`` on stderr, and the usage/input exit code."""
    print(f"egress-guard {command}: {message}", file=sys.stderr)
    return EXIT_ERROR
