"""The decision engine: pure, synchronous, no I/O. All security reasoning lives here."""

from egress_guard.engine.addresses import special_class
from egress_guard.engine.decide import NEVER_AUDITED, Decision, Engine, Match, Reason
from egress_guard.engine.matcher import HostIndex

__all__ = ["NEVER_AUDITED", "Decision", "Engine", "HostIndex", "Match", "Reason", "special_class"]
