"""What the proxy tells its sinks (audit log, metrics): plain records, no mitmproxy types.

The addon builds these; sinks consume them. Keeping them plain means sinks can be tested
without a proxy and the addon never leaks a header, a body or a query value to a sink:
the fields below are the whole contract, and none of them can hold a secret (``path``
is stored without its query string).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from egress_guard.engine import Decision


@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionEvent:
    """One decision, for every sink. Keyword-only: a field added in the middle must not
    shift a caller's values into the wrong fields (a path in ``method`` escapes the
    path's redaction)."""

    conn_id: str
    client: str
    decision: Decision
    mode: str
    policy_sha256: str
    sni: str | None = None
    #: the clients.auth user that proved itself (never a name that did not)
    user: str | None = None
    method: str | None = None
    #: request path without the query string (query values may carry API keys)
    path: str | None = None
    #: this decision lets an upstream connection open (a CloseEvent will follow)
    opens: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseEvent:
    """One closed upstream connection, for every sink (keyword-only, as DecisionEvent)."""

    conn_id: str
    client: str
    host: str
    port: int | None
    destination: str | None
    decision: str
    bytes_up: int
    bytes_down: int
    duration_s: float
    mode: str
    policy_sha256: str
    error: str | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyEvent:
    ok: bool
    source: str
    sha256: str | None
    version: int
    mode: str | None
    error: str | None = None
    #: destination names of the policy now in force (bounds metric label values)
    destinations: tuple[str, ...] = ()


class Sink(Protocol):
    """A consumer of proxy events. Must not block the event loop; must not raise for
    ordinary input. ``healthy`` False makes the proxy refuse new connections and new
    requests (an audit sink that cannot write must not let traffic through unrecorded).

    ``admit`` records a decision that lets traffic go upstream; the proxy awaits it and
    forwards only on True. A sink that must record (the audit log) returns True once the
    record is accepted (written), False when it cannot be; a sink whose loss must not
    stop traffic (metrics) records and returns True. ``decision`` records one that lets
    nothing through (a refusal): it must not wait, and must not lose the record either.
    ``tunnel_accepted`` says a CONNECT tunnel's first bytes passed its checks (the metrics
    count the CONNECT then; the audit log already holds it).

    The proxy calls these methods by name on every sink (``Fanout``), so "who records a
    decision" has a grep answer, and mypy checks each sink against this protocol.
    """

    async def admit(self, event: DecisionEvent) -> bool: ...

    def decision(self, event: DecisionEvent) -> None: ...

    def close(self, event: CloseEvent) -> None: ...

    def policy(self, event: PolicyEvent) -> None: ...

    def tunnel_accepted(self, conn_id: str) -> None: ...

    @property
    def healthy(self) -> bool: ...


class Observer(ABC):
    """The part of ``Sink`` every sink that only watches shares (metrics, the status
    page, the stderr lines): it is always healthy, and it never holds traffic back, so
    ``admit`` records the decision like any other and says yes. Such a sink implements
    ``decision``, ``close``, ``policy`` and ``tunnel_accepted``."""

    @property
    def healthy(self) -> bool:
        return True

    async def admit(self, event: DecisionEvent) -> bool:
        self.decision(event)
        return True

    @abstractmethod
    def decision(self, event: DecisionEvent) -> None: ...


class AuditHealth(Protocol):
    """What the watching sinks read from the audit log (``sinks.audit.AuditLog``): the
    metrics export it, the status page shows it."""

    @property
    def healthy(self) -> bool: ...

    write_errors: int

    @property
    def events_dropped(self) -> int: ...
