"""All the proxy's sinks as one ``Sink``: the proxy calls ``Fanout.decision(event)`` and
each sink's ``decision`` in turn, typed, with no method names passed as strings.

One failing sink must not keep an event from the others, nor break the proxy's hook: a
failure is logged and the next sink still gets the event. The exceptions to "carry on"
are the ones that protect the audit trail: ``admit`` is False (the proxy refuses the
traffic) as soon as one sink cannot record or raises, and ``healthy`` is False when a
sink's health cannot be read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from egress_guard.sinks.events import CloseEvent, DecisionEvent, PolicyEvent, Sink

log = logging.getLogger(__name__)


class Fanout:
    """The sinks given, in order. Implements ``Sink``."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        #: the sinks themselves (shared with the caller's list: a sink added there is
        #: reached here too)
        self.sinks = sinks

    def _each(self, call: Callable[[Sink], None]) -> None:
        for sink in self.sinks:
            try:
                call(sink)
            except Exception:
                log.exception("egress-guard: sink %r failed", sink)

    async def admit(self, event: DecisionEvent) -> bool:
        """True once every sink has accepted the record (the audit log: written). Stops
        at the first sink that cannot record it, or raises: False, nothing is forwarded
        that the audit log does not hold."""
        for sink in self.sinks:
            try:
                ok = await sink.admit(event)
            except Exception:
                log.exception("egress-guard: sink %r failed; refusing", sink)
                ok = False
            if not ok:
                return False
        return True

    def decision(self, event: DecisionEvent) -> None:
        self._each(lambda sink: sink.decision(event))

    def close(self, event: CloseEvent) -> None:
        self._each(lambda sink: sink.close(event))

    def policy(self, event: PolicyEvent) -> None:
        self._each(lambda sink: sink.policy(event))

    def tunnel_accepted(self, conn_id: str) -> None:
        self._each(lambda sink: sink.tunnel_accepted(conn_id))

    @property
    def healthy(self) -> bool:
        """All sinks can record; False (refuse) when a sink's health cannot be read."""
        try:
            return all(s.healthy for s in self.sinks)
        except Exception:
            log.exception("egress-guard: sink health unknown; refusing")
            return False


if TYPE_CHECKING:  # mypy checks every sink against the protocol here (nothing runs)
    from egress_guard.sinks.audit import AuditLog
    from egress_guard.sinks.metrics import Metrics

    _SINKS: tuple[type[Sink], ...] = (AuditLog, Metrics, Fanout)
