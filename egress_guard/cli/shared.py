"""Small pieces more than one command needs: the ``--policy`` default, the warning about
request rules without inspection, and the one-line error every command prints."""

from __future__ import annotations

import sys

from egress_guard.cli.exits import EXIT_ERROR
from egress_guard.engine.decide import request_rules
from egress_guard.policy import (
    Destination,
    EffectivePolicy,
    PolicyError,
    load_catalog,
    load_policy,
    load_preset,
)
from egress_guard.policy.model import CatalogEntry


def policy_or_minimal(path: str | None) -> EffectivePolicy:
    """``--policy`` or the built-in minimal preset (the documented minimal allowlist)."""
    return load_policy(path) if path else load_preset("minimal")


def policy_and_catalog(
    path: str | None,
) -> tuple[EffectivePolicy, dict[str, CatalogEntry]] | None:
    """``policy_or_minimal`` and the catalog, for the commands that read both; None
    (every error printed, with its ``file:line``) when either does not load."""
    try:
        return policy_or_minimal(path), load_catalog()
    except PolicyError as e:
        print(e.render(), file=sys.stderr)
        return None


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
