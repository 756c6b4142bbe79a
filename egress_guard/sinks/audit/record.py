"""One audit line's content: the fields of each event and their redaction, and the
encoding. What may appear in the log is decided here and nowhere else (docs/audit-log.md),
so a reviewer checking that no secret is written reads this module only."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from egress_guard.sinks import redact
from egress_guard.sinks.events import CloseEvent, DecisionEvent, PolicyEvent

#: bounds on a path and on free text: a client cannot make one line arbitrarily long
MAX_PATH = 2048
MAX_TEXT = 1024


def rfc3339(t: float) -> str:
    """RFC 3339 UTC with milliseconds and ``Z``: ``2025-01-31T12:00:00.123Z``."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def scrub_path(path: str | None) -> str | None:
    """A request path fit for the log: no query, fragment, parameters (nor their
    percent-encodings), no userinfo, bounded (``redact.path``)."""
    p = redact.path(path)
    return None if p is None else _clip(p, MAX_PATH)


def scrub_host(host: str | None) -> str | None:
    """A host or authority as a client wrote it, without userinfo (``redact.host``)."""
    h = redact.host(host)
    return None if h is None else _clip(h, MAX_TEXT)


def scrub_text(text: str | None) -> str | None:
    """Free text (details, error messages): queries, parameters and userinfo replaced
    by markers (``redact.text``), bounded."""
    t = redact.text(text)
    return None if t is None else _clip(t, MAX_TEXT)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def encode(obj: dict[str, Any]) -> bytes:
    # ensure_ascii: every line is plain ASCII, so no byte-level ambiguity and no raw
    # newline can ever appear inside a line.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def record_fields(ev: DecisionEvent | CloseEvent | PolicyEvent) -> dict[str, Any]:
    if isinstance(ev, DecisionEvent):
        d = ev.decision
        return {
            "id": ev.conn_id,
            "client": ev.client,
            "user": ev.user,
            "host": scrub_host(d.host),
            "port": d.port,
            "sni": scrub_host(ev.sni),
            "method": ev.method,
            "path": scrub_path(ev.path),
            "decision": d.action,
            "reason": d.reason,
            "destination": d.destination,
            "catalog": d.catalog,
            "mode": ev.mode,
            "policy_sha256": ev.policy_sha256 or None,
            "detail": scrub_text(d.detail),
            # the operator's way out (file:line of the rule); clients get it without paths
            "hint": scrub_text(d.hint),
        }
    if isinstance(ev, CloseEvent):
        dur = ev.duration_s
        return {
            "id": ev.conn_id,
            "client": ev.client,
            "user": ev.user,
            "host": scrub_host(ev.host),
            "port": ev.port,
            "decision": ev.decision,
            "destination": ev.destination,
            "mode": ev.mode,
            "policy_sha256": ev.policy_sha256 or None,
            "bytes_up": int(ev.bytes_up),
            "bytes_down": int(ev.bytes_down),
            "duration_ms": round(max(0.0, dur) * 1000) if math.isfinite(dur) else None,
            "error": scrub_text(ev.error),
        }
    return {
        "result": "ok" if ev.ok else "error",
        "source": ev.source,
        "policy_sha256": ev.sha256,
        "policy_version": ev.version,
        "mode": ev.mode,
        "error": scrub_text(ev.error),
    }
