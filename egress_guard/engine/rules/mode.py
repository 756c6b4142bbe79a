"""The mode: audit mode lets a block through as would_block, except the blocks it must
never lift (NEVER_AUDITED, and a name that cannot be read while deny rules exist)."""

from __future__ import annotations

from egress_guard.engine.compiled import Compiled
from egress_guard.engine.types import NEVER_AUDITED, UNCHECKED_NAME_HINT, Decision


def apply_mode(c: Compiled, decision: Decision) -> Decision:
    """Apply audit mode: let a block through as would_block, unless it must not be."""
    if decision.allowed or c.policy.mode != "audit" or decision.reason in NEVER_AUDITED:
        return decision
    if decision.hint == UNCHECKED_NAME_HINT and c.policy.deny:
        return decision  # a name that cannot be read cannot be shown not to be denied
    return decision._replace(allowed=True, action="would_block")
