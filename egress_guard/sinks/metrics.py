"""Prometheus metrics: a sink for proxy events (the HTTP server is ``metrics_http``).

The series are the contract in DESIGN.md section 7, and nothing else::

    egress_guard_decisions_total{destination, decision}     decision: allow | block | would_block
    egress_guard_bytes_total{destination, direction}        direction: up | down
    egress_guard_connection_duration_seconds{destination}   histogram, 5 ms .. 1 h
    egress_guard_active_connections{destination}            gauge
    egress_guard_policy_reloads_total{result}               result: ok | error
    egress_guard_policy_info{sha256, version}               1 for the policy in force only

and beyond it (docs/metrics.md)::

    egress_guard_blocks_total{destination, decision, reason}  decision: block | would_block
    egress_guard_build_info{version, python, mitmproxy}       1 (metrics_runtime)
    process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total, ...

Label cardinality is bounded by the policy, whatever clients send: ``destination`` is a
rule name from the policy in force (``set_destinations``) or ``unlisted``, never a
hostname. A name the policy does not define is recorded as ``unlisted`` even if a caller
passes it, so a bug upstream cannot turn client input into new series. ``reason`` is
one of the engine's reason codes (the ``Reason`` literal, a fixed list) or ``other``.

The metrics live in their own ``CollectorRegistry`` (never the process-wide default one),
and the ``*_created`` samples prometheus-client adds to counters and histograms are
dropped for this registry only, without touching the library's global switch.

This module knows nothing about mitmproxy. Every sink method is cheap and never raises
for ordinary input; ``healthy`` is always True (losing a metric must not stop traffic).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from math import isfinite
from typing import Any, Final, Protocol, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from egress_guard.engine.types import Reason
from egress_guard.sinks.events import AuditHealth, CloseEvent, DecisionEvent, Observer, PolicyEvent
from egress_guard.sinks.metrics_runtime import register_runtime

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "UNLISTED",
    "Metrics",
]

log = logging.getLogger(__name__)

#: The label for any destination that is not a rule of the policy in force.
UNLISTED: Final = "unlisted"

#: What ``generate_latest`` writes: the classic Prometheus text format.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Connection duration buckets (seconds): API round trips from 5 ms, streamed LLM
#: responses in the seconds-to-minutes range, long-lived tunnels up to an hour.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)

_ACTIONS: Final = frozenset({"allow", "block", "would_block"})
#: the values the ``reason`` label can take: the engine's codes, and ``other``
REASONS: Final = frozenset(get_args(Reason))
OTHER_REASON: Final = "other"


class _WithoutCreated:
    """Collects a set of metrics, dropping their ``*_created`` samples.

    prometheus-client's own switch (``disable_created_metrics``) is process-wide; this
    keeps the choice local to our registry. ``lock`` is held while collecting so a scrape
    never sees a half-applied update (e.g. ``policy_info`` between clear and set).
    """

    def __init__(self, metrics: Iterable[Counter | Gauge | Histogram], lock: threading.Lock):
        self._metrics = tuple(metrics)
        self._lock = lock

    def describe(self) -> Iterable[Metric]:
        for m in self._metrics:
            yield from m.describe()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            families = [f for m in self._metrics for f in m.collect()]
        for family in families:
            created = family.name + "_created"
            family.samples = [s for s in family.samples if s.name != created]
        return families


class _AuditCollector(Collector):
    def __init__(self, audit: AuditHealth) -> None:
        self._audit = audit

    def collect(self) -> Iterable[Metric]:
        errors = CounterMetricFamily(
            "egress_guard_audit_write_errors",
            "Failed audit log writes (each retry counts); traffic is refused meanwhile.",
            value=float(self._audit.write_errors),
        )
        dropped = CounterMetricFamily(
            "egress_guard_audit_events_dropped",
            "Audit events that could not be queued (recorded later as a 'dropped' line).",
            value=float(self._audit.events_dropped),
        )
        healthy = GaugeMetricFamily(
            "egress_guard_audit_healthy",
            "1 when the audit log is being written, 0 when new connections are refused.",
            value=1.0 if self._audit.healthy else 0.0,
        )
        return [errors, dropped, healthy]


class HeldBodies(Protocol):
    """What the metrics read from the held-body budget (egress_guard.proxy.bodybudget.BodyBudget)."""

    held: int
    limit: int
    refused: int
    evicted: int


class _HeldBodiesCollector(Collector):
    def __init__(self, bodies: HeldBodies) -> None:
        self._bodies = bodies

    def collect(self) -> Iterable[Metric]:
        held = GaugeMetricFamily(
            "egress_guard_held_body_bytes",
            "Request bytes (declared lengths) of model-call bodies held whole right now.",
            value=float(self._bodies.held),
        )
        limit = GaugeMetricFamily(
            "egress_guard_held_body_limit_bytes",
            "--max-held-bodies: what all held model-call bodies together may take.",
            value=float(self._bodies.limit),
        )
        refused = CounterMetricFamily(
            "egress_guard_held_body_refusals",
            "Model calls refused (503 buffer_budget) because their body would pass the "
            "held-body budget or its client's share.",
            value=float(self._bodies.refused),
        )
        evicted = CounterMetricFamily(
            "egress_guard_held_body_evictions",
            "Held model-call bodies evicted (their connection closed, 503 buffer_budget "
            "recorded) because they stalled while another body needed the room.",
            value=float(self._bodies.evicted),
        )
        return [held, limit, refused, evicted]


class Metrics(Observer):
    """The metrics sink (implements ``egress_guard.sinks.events.Sink``).

    The proxy calls, besides the sink methods ``decision``/``close``/``policy``:

    * ``set_destinations(names)`` on every successful policy load, with the policy's
      destination names (until the first call every destination is ``unlisted``);
    * ``connection_opened(destination)`` / ``connection_closed(destination)`` around each
      allowed upstream connection, for the active-connections gauge;
    * ``render()`` (or ``metrics_http.start_http_server``) to expose the text format.

    Thread-safe: sink methods run on the proxy's event loop, scrapes on server threads.
    """

    def __init__(self, destinations: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._allowed: frozenset[str] = frozenset()
        #: open connections per label, so a close never drives the gauge negative and a
        #: connection opened under an older policy is closed under the label it opened with
        self._active: dict[str, int] = {}
        #: label values -> child series, for the per-tunnel families. prometheus-client's
        #: labels() takes a lock and builds a key on every call (five calls per tunnel);
        #: these families never drop a series, so a child, once made, stays valid.
        self._children: dict[tuple[Any, ...], Any] = {}
        #: connection id -> (destination, action) of a CONNECT allowed by its target whose
        #: first bytes (the SNI) are not judged yet: counted once they are, or replaced by
        #: what they showed (one tunnel is never counted both allowed and blocked)
        self._pending: dict[str, tuple[str | None, str, str]] = {}

        self._decisions = Counter(
            "egress_guard_decisions",
            "Policy decisions, by destination rule and action.",
            ["destination", "decision"],
            registry=None,
        )
        self._blocks = Counter(
            "egress_guard_blocks",
            "Refused (block) and audit-mode (would_block) decisions, by destination rule "
            "and reason code.",
            ["destination", "decision", "reason"],
            registry=None,
        )
        self._bytes = Counter(
            "egress_guard_bytes",
            "Bytes relayed, by destination rule and direction (up: client to upstream).",
            ["destination", "direction"],
            registry=None,
        )
        self._duration = Histogram(
            "egress_guard_connection_duration_seconds",
            "Duration of closed client connections, by destination rule.",
            ["destination"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self._active_gauge = Gauge(
            "egress_guard_active_connections",
            "Upstream connections currently open, by destination rule.",
            ["destination"],
            registry=None,
        )
        self._reloads = Counter(
            "egress_guard_policy_reloads",
            "Policy loads (the first one included), by result.",
            ["result"],
            registry=None,
        )
        self._policy_info = Gauge(
            "egress_guard_policy_info",
            "The policy in force: 1 for its sha256 and version.",
            ["sha256", "version"],
            registry=None,
        )
        # Present from the start, so increase() sees the first error.
        self._reloads.labels(result="ok")
        self._reloads.labels(result="error")

        self.registry.register(
            _WithoutCreated(
                (
                    self._decisions,
                    self._blocks,
                    self._bytes,
                    self._duration,
                    self._active_gauge,
                    self._reloads,
                    self._policy_info,
                ),
                self._lock,
            )
        )
        register_runtime(self.registry)
        self.set_destinations(destinations)

    def track_audit(self, audit: AuditHealth) -> None:
        """Export the audit log's health, read at scrape time.

        Beyond the DESIGN section 7 contract, because a proxy that refuses traffic since
        its audit log cannot be written must say so where operators look: these three
        series, and /healthz answering 503.
        """
        self.registry.register(_AuditCollector(audit))

    def track_held_bodies(self, bodies: HeldBodies) -> None:
        """Export the held-body budget (read at scrape time): how much of it is taken and
        how often it refused. Beyond DESIGN section 7, as the audit health is: a guard
        answering 503 for capacity must say so where operators look."""
        self.registry.register(_HeldBodiesCollector(bodies))

    # -- labels ------------------------------------------------------------------------

    def set_destinations(self, names: Iterable[str]) -> None:
        """Set the destination names allowed as labels (the policy in force's rules).

        Series of destinations that are no longer in the policy are kept (counters do
        not go backwards); the set of series grows only with names operators wrote.
        """
        allowed = frozenset(n for n in names if isinstance(n, str))
        with self._lock:
            self._allowed = allowed

    def label(self, destination: str | None) -> str:
        """The label recorded for ``destination``: itself if the policy defines it,
        ``unlisted`` otherwise."""
        if destination is not None and destination in self._allowed:
            return destination
        return UNLISTED

    def _child(self, family: Counter | Gauge | Histogram, *values: str) -> Any:
        """``family.labels(*values)``, made once per label values."""
        k = (family, *values)
        child = self._children.get(k)
        if child is None:
            child = self._children[k] = family.labels(*values)
        return child

    # -- Sink --------------------------------------------------------------------------

    def decision(self, event: DecisionEvent) -> None:
        action = event.decision.action
        if action not in _ACTIONS:
            log.warning("metrics: ignoring decision with unknown action %r", action)
            return
        pending = self._pending.pop(event.conn_id, None)
        if pending is not None and event.method is not None:
            self._count(*pending)  # a request inside a tunnel that was accepted
        # else: the tunnel's first bytes, judged: this decision replaces the CONNECT's
        d = event.decision
        if event.opens and event.method == "CONNECT" and action != "block":
            self._pending[event.conn_id] = (d.destination, action, d.reason)
        else:
            self._count(d.destination, action, d.reason)
        if event.opens:
            self.connection_opened(event.decision.destination)

    def tunnel_accepted(self, conn_id: str) -> None:
        """The tunnel's first bytes passed (the proxy calls this): count its CONNECT."""
        pending = self._pending.pop(conn_id, None)
        if pending is not None:
            self._count(*pending)

    def _count(self, destination: str | None, action: str, reason: str) -> None:
        dest = self.label(destination)
        self._child(self._decisions, dest, action).inc()
        if action != "allow":
            why = reason if reason in REASONS else OTHER_REASON
            self._child(self._blocks, dest, action, why).inc()

    def close(self, event: CloseEvent) -> None:
        pending = self._pending.pop(event.conn_id, None)
        if pending is not None and event.decision != "block":
            self._count(*pending)  # closed before its first bytes: the CONNECT stands
        dest = self.label(event.destination)
        self._child(self._bytes, dest, "up").inc(_non_negative(event.bytes_up))
        self._child(self._bytes, dest, "down").inc(_non_negative(event.bytes_down))
        self._child(self._duration, dest).observe(_non_negative(event.duration_s))
        self.connection_closed(event.destination)

    def policy(self, event: PolicyEvent) -> None:
        if not event.ok:
            # The old policy stays in force, and so does its policy_info sample.
            self._reloads.labels(result="error").inc()
            return
        self._reloads.labels(result="ok").inc()
        if event.destinations:
            self.set_destinations(event.destinations)
        with self._lock:
            self._policy_info.clear()
            self._policy_info.labels(sha256=event.sha256 or "", version=str(event.version)).set(1)

    # -- active connections ------------------------------------------------------------

    def connection_opened(self, destination: str | None) -> None:
        with self._lock:
            dest = self.label(destination)
            self._active[dest] = self._active.get(dest, 0) + 1
            self._child(self._active_gauge, dest).inc()

    def connection_closed(self, destination: str | None) -> None:
        """Pair of ``connection_opened``. A close with no matching open is ignored."""
        with self._lock:
            if destination is not None and self._active.get(destination, 0) > 0:
                dest = destination
            elif self._active.get(UNLISTED, 0) > 0:
                dest = UNLISTED
            else:
                log.debug("metrics: connection_closed(%r) without an open", destination)
                return
            self._active[dest] -= 1
            self._child(self._active_gauge, dest).dec()

    # -- exposition --------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)


def _non_negative(value: float) -> float:
    """Counters reject negative increments; a bad measurement must not raise."""
    if not isfinite(value) or value < 0:
        return 0.0
    return float(value)
