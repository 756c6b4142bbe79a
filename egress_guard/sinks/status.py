"""``StatusBoard``: the sink behind the live status page (``/`` on the metrics listener).

It keeps, in memory and bounded, what an operator looks at first: the policy in force,
the audit log's health, per-destination counts and bytes, and the most recent decisions.
``snapshot()`` turns that into the JSON the page polls (``status_page``).

Only what the audit log would show: each recent decision is rendered with the audit
log's own ``record_fields`` (the same redaction: no query, no userinfo, bounded text), so
the page can never show more than the log holds. Rendering happens when the page asks,
not when the proxy decides: on the proxy's hot path this sink only appends the event to
a ring and bumps counters.

Counts follow ``audit summary``: one per decision record (a tunnel whose CONNECT was
allowed and whose SNI was then refused counts one allow and one block, as in the log),
bytes and connections from close records. Destinations are the policy's rule names or
``unlisted`` (never a host), so the table is bounded by what operators wrote.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from egress_guard.sinks.audit.record import record_fields, rfc3339, scrub_text
from egress_guard.sinks.events import AuditHealth, CloseEvent, DecisionEvent, Observer, PolicyEvent

__all__ = ["MAX_DESTINATIONS", "RECENT", "AuditHealth", "StatusBoard"]

#: decisions kept for the page (and, separately, this many refusals: a burst of allowed
#: traffic must not push the last blocks out of sight)
RECENT: Final = 200
#: distinct destination rows; past this (many reloads with new names) they share OTHER
MAX_DESTINATIONS: Final = 1000
UNLISTED: Final = "unlisted"
OTHER: Final = "(other)"
_ACTIONS: Final = ("allow", "block", "would_block")


@dataclass
class _Dest:
    allow: int = 0
    block: int = 0
    would_block: int = 0
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    last_seen: float = 0.0

    def row(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "allow": self.allow,
            "block": self.block,
            "would_block": self.would_block,
            "connections": self.connections,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "last_seen": rfc3339(self.last_seen) if self.last_seen else None,
        }


@dataclass
class _Policy:
    source: str = ""
    sha256: str | None = None
    version: int = 0
    mode: str | None = None
    destinations: int = 0
    loaded: float = 0.0
    reloads_ok: int = 0
    reloads_error: int = 0
    #: the last failed load (the previous policy stayed in force): (time, error text)
    last_error: tuple[float, str | None] | None = None
    ok: bool = False


class StatusBoard(Observer):
    """The status page's sink (implements ``egress_guard.sinks.events.Sink``).

    Thread-safe: sink methods run on the proxy's event loop, ``snapshot`` on the HTTP
    server's threads. ``healthy`` is always True: a page must never stop traffic.
    """

    def __init__(
        self, audit: AuditHealth | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._audit = audit
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._seq = 0
        #: (seq, time, event), newest last
        self._recent: deque[tuple[int, float, DecisionEvent]] = deque(maxlen=RECENT)
        self._recent_blocks: deque[tuple[int, float, DecisionEvent]] = deque(maxlen=RECENT)
        self._dests: dict[str, _Dest] = {}
        self._policy = _Policy()

    # -- Sink --------------------------------------------------------------------------

    def decision(self, event: DecisionEvent) -> None:
        now = self._clock()
        action = event.decision.action
        with self._lock:
            self._seq += 1
            item = (self._seq, now, event)
            self._recent.append(item)
            if action != "allow":
                self._recent_blocks.append(item)
            d = self._dest(event.decision.destination)
            if action in _ACTIONS:
                setattr(d, action, getattr(d, action) + 1)
            d.last_seen = now

    def close(self, event: CloseEvent) -> None:
        now = self._clock()
        with self._lock:
            d = self._dest(event.destination)
            d.connections += 1
            d.bytes_up += max(0, int(event.bytes_up))
            d.bytes_down += max(0, int(event.bytes_down))
            d.last_seen = now

    def policy(self, event: PolicyEvent) -> None:
        now = self._clock()
        with self._lock:
            p = self._policy
            if not event.ok:
                p.reloads_error += 1
                p.last_error = (now, event.error)
                return
            p.ok = True
            p.reloads_ok += 1
            p.source, p.sha256, p.version = event.source, event.sha256, event.version
            p.mode, p.destinations, p.loaded = event.mode, len(event.destinations), now

    def tunnel_accepted(self, conn_id: str) -> None:
        """Nothing to show: the CONNECT's decision is already on the page."""

    def _dest(self, name: str | None) -> _Dest:
        key = name or UNLISTED
        d = self._dests.get(key)
        if d is None:
            if len(self._dests) >= MAX_DESTINATIONS:
                key = OTHER
                d = self._dests.get(key)
            if d is None:
                d = self._dests[key] = _Dest()
        return d

    # -- the page's data ---------------------------------------------------------------

    def snapshot(self, healthy: bool | None = None) -> dict[str, Any]:
        """Everything the page shows, JSON-ready. ``healthy``: the proxy's overall health
        (what ``/healthz`` answers), when the caller knows it."""
        now = self._clock()
        with self._lock:
            recent = list(self._recent)
            blocks = list(self._recent_blocks)
            dests = [d.row(name) for name, d in sorted(self._dests.items())]
            p = self._policy
            policy = {
                "loaded": p.ok,
                "source": p.source,
                "sha256": p.sha256,
                "version": p.version,
                "mode": p.mode,
                "destinations": p.destinations,
                "loaded_at": rfc3339(p.loaded) if p.ok else None,
                "reloads_ok": p.reloads_ok,
                "reloads_error": p.reloads_error,
                "last_error": (
                    {"ts": rfc3339(p.last_error[0]), "error": scrub_text(p.last_error[1])}
                    if p.last_error
                    else None
                ),
            }
        return {
            "now": rfc3339(now),
            "started": rfc3339(self._started),
            "uptime_s": round(max(0.0, now - self._started), 1),
            "healthy": healthy,
            "policy": policy,
            "audit": self._audit_state(),
            "destinations": dests,
            "recent": [_row(*item) for item in reversed(recent)],
            "recent_blocks": [_row(*item) for item in reversed(blocks)],
        }

    def _audit_state(self) -> dict[str, Any]:
        a = self._audit
        if a is None:
            return {"configured": False, "healthy": None, "write_errors": 0, "events_dropped": 0}
        return {
            "configured": True,
            "healthy": bool(a.healthy),
            "write_errors": int(a.write_errors),
            "events_dropped": int(a.events_dropped),
        }


def _row(seq: int, t: float, event: DecisionEvent) -> dict[str, Any]:
    """One recent decision as the audit log would write it (its fields, its redaction),
    plus its time and a sequence number the page uses to mark new rows."""
    rec = record_fields(event)
    user = rec.get("user")
    return {
        "seq": seq,
        "ts": rfc3339(t),
        "decision": rec.get("decision"),
        "host": rec.get("host"),
        "port": rec.get("port"),
        "reason": rec.get("reason"),
        "destination": rec.get("destination"),
        "catalog": rec.get("catalog"),
        "client": rec.get("client"),
        "user": user if isinstance(user, str) else None,
        "method": rec.get("method"),
        "path": rec.get("path"),
        "sni": rec.get("sni"),
        "detail": rec.get("detail"),
    }
