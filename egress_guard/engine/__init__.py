"""The decision engine: pure, synchronous, no I/O. All security reasoning lives here.

Ask it with ``Engine.decide(facts)``; the facts are in ``engine.facts``."""

from egress_guard.engine.addresses import special_class
from egress_guard.engine.decide import Engine
from egress_guard.engine.facts import (
    Approved,
    BodyShape,
    Client,
    HostNames,
    ModelUnread,
    NeedsAddresses,
    Redirected,
    Request,
    ServerName,
    Target,
    UnreadableName,
)
from egress_guard.engine.matcher import HostIndex
from egress_guard.engine.types import NEVER_AUDITED, Decision, Match, Reason

__all__ = [
    "NEVER_AUDITED",
    "Approved",
    "BodyShape",
    "Client",
    "Decision",
    "Engine",
    "HostIndex",
    "HostNames",
    "Match",
    "ModelUnread",
    "NeedsAddresses",
    "Reason",
    "Redirected",
    "Request",
    "ServerName",
    "Target",
    "UnreadableName",
    "special_class",
]
