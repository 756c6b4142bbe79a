"""The engine's vocabulary: what a decision says (Decision, Action, Reason), the Match a
name stage hands the address stage, and the reasons audit mode never lifts.

In a module of their own so the rules, the dispatcher, verdicts.py and every reader of a
decision (sinks, proxy, CLI) share one definition without importing the rules.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from egress_guard.normalize import Host
from egress_guard.policy.model import Destination

Action = Literal["allow", "block", "would_block"]
Reason = Literal[
    "allowlisted",
    "not_allowlisted",
    "denylisted",
    "port_not_allowed",
    "private_address",
    "ip_literal_not_allowed",
    "sni_mismatch",
    "host_header_mismatch",
    "invalid_host",
    "client_not_allowed",
    "proxy_auth_required",
    "path_not_allowed",
    "method_not_allowed",
    "model_not_allowed",
    "internal_error",
    "self_connection",
    "dns_failed",
    "malformed_request",
    "buffer_budget",
    "inspection_required",
    "direct_connection",
]

#: Blocks that audit mode does not turn into would_block: they are about who may use the
#: proxy, input that has no destination at all, a request that would loop back into the
#: proxy, the proxy's own failure (fail closed, in every mode), or an explicit deny rule
#: (deny wins over everything, audit mode included). ``buffer_budget`` (the held-body
#: budget is spent) is no policy verdict at all: the body cannot be held to be checked.
NEVER_AUDITED: frozenset[str] = frozenset(
    {
        "denylisted",
        "client_not_allowed",
        "proxy_auth_required",
        "invalid_host",
        "internal_error",
        "self_connection",
        "dns_failed",
        "malformed_request",
        "buffer_budget",
        "direct_connection",
    }
)


class Decision(NamedTuple):
    """What the engine says of one connection or request, and why.

    (A NamedTuple rather than a frozen dataclass: one is built for every refused target,
    and a frozen dataclass's ``__init__`` costs several times more for the same
    immutability. Change one with ``_replace``.)"""

    allowed: bool
    action: Action
    reason: Reason
    destination: str | None
    host: str
    port: int | None
    hint: str | None = None
    detail: str | None = None
    #: for a target the policy does not list: the catalog entry that covers it, so the
    #: audit log says "models-catalog" rather than only a host name
    catalog: str | None = None

    @property
    def label(self) -> str:
        """Metric label: the rule name, or ``unlisted`` (never a raw host)."""
        return self.destination or "unlisted"


class Match(NamedTuple):
    """A target that passed the name checks and now needs its addresses checked.

    (A NamedTuple, not a frozen dataclass: one is built per allowed CONNECT, and this is
    as immutable for a fraction of the cost.)"""

    host: Host
    port: int
    destination: Destination
    #: position of the destination in the policy (index into per-destination tables)
    position: int


#: ``new(Match, (host, port, ...))`` builds a NamedTuple without its generated
#: ``__new__``, a Python function: one is built for every allowed target, and this
#: costs half as much
new = tuple.__new__

#: The hint of ``unreadable_name`` blocks (the mode rule knows them by it).
UNCHECKED_NAME_HINT = (
    "the name cannot be read, so it cannot be checked against the deny rules: "
    "refused in every mode while the policy has deny rules"
)


def block(
    reason: Reason,
    host: str,
    port: int | None,
    destination: str | None = None,
    hint: str | None = None,
    detail: str | None = None,
) -> Decision:
    return Decision(False, "block", reason, destination, host, port, hint, detail)


def refusal(decision: Decision, reason: Reason, hint: str, detail: str | None) -> Decision:
    """A stage-4 refusal of a request whose target ``decision`` allowed."""
    return decision._replace(allowed=False, action="block", reason=reason, hint=hint, detail=detail)


def printable(raw: object) -> str:
    """A bounded, printable rendering of untrusted input for logs and headers."""
    text = raw if isinstance(raw, str) else repr(raw)
    text = "".join(c if c.isprintable() and c.isascii() else f"\\x{ord(c):02x}" for c in text[:200])
    return text
