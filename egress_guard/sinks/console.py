"""One human line per decision: on ``egress-guard run``'s stderr, and in ``tail``.

The audit log is JSON for machines; whoever watches the proxy's terminal needs to see a
block the moment it happens, also when the audit log goes to a file (the terminal showed
nothing then). ``describe`` is the one rendering of a decision for people: the
``Console`` sink writes it to the log (stderr) for each block, and for each allow with
``--verbose``; ``egress-guard tail`` prints it for each decision record it reads. Both
start from the audit log's own fields (``record_fields``: its redaction, its bounds), so
a terminal never shows more than the log holds.

Every field a client can influence (host, SNI, path, detail) is escaped
(``logsafe.escape``): no control or bidi character reaches the terminal raw, and a line
stays one line. A flood of refusals must not turn stderr into the bottleneck: past
``MAX_LINES_PER_S`` lines in a second the rest are counted and one line says how many
were left out (the audit log has every one of them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from egress_guard.sinks.audit.record import record_fields
from egress_guard.sinks.events import CloseEvent, DecisionEvent, Observer, PolicyEvent
from egress_guard.sinks.logsafe import escape

__all__ = ["MAX_LINES_PER_S", "Console", "describe"]

#: decision lines written per second at most; the rest are summarised in one line
MAX_LINES_PER_S: Final = 50
#: how long a field may be on a terminal line (the audit log keeps the whole)
MAX_FIELD: Final = 300

log = logging.getLogger("egress_guard.decisions")


def _text(value: object) -> str:
    """``value`` fit for one terminal line: escaped, bounded."""
    s = escape(str(value))
    return s if len(s) <= MAX_FIELD else s[:MAX_FIELD] + "..."


def _target(rec: Mapping[str, Any]) -> str:
    host = rec.get("host") or "?"
    port = rec.get("port")
    host_s = _text(host)
    if ":" in host_s and not host_s.startswith("["):
        host_s = f"[{host_s}]"  # an IPv6 address, so the port stays readable
    # a port is an int in the guard's records; tail reads files anyone may have written
    where = host_s if port is None else f"{host_s}:{_text(port)}"
    path = rec.get("path")
    if path:
        where += _text(path)
    method = rec.get("method")
    return f"{_text(method)} {where}" if method else where


def describe(rec: Mapping[str, Any], *, with_time: bool = True) -> str:
    """One decision record (the audit log's fields: a parsed log line, or
    ``record_fields`` of an event) as one line for people, escaped.

    ``2026-01-31T12:00:00.000Z BLOCK CONNECT evil.example:443 not_allowlisted from
    127.0.0.1:50000 (catalog npm-registry) - hint: ...``"""
    action = str(rec.get("decision") or "?")
    parts = []
    if with_time and rec.get("ts"):
        parts.append(_text(rec["ts"]))
    parts.append(_text(action.upper()))
    parts.append(_target(rec))
    parts.append(_text(rec.get("reason") or "?"))
    if rec.get("client"):
        parts.append(f"from {_text(rec['client'])}")
    user = rec.get("user")
    if isinstance(user, str) and user:
        parts.append(f"user {_text(user)}")
    if rec.get("destination"):
        parts.append(f"(destination {_text(rec['destination'])})")
    elif rec.get("catalog"):
        parts.append(f"(catalog {_text(rec['catalog'])})")
    sni = rec.get("sni")
    if sni and sni != rec.get("host"):
        parts.append(f"sni {_text(sni)}")
    if rec.get("mode") == "audit" and action != "would_block":
        parts.append("[audit mode]")
    line = " ".join(parts)
    if rec.get("detail"):
        line += f": {_text(rec['detail'])}"
    if action != "allow" and rec.get("hint"):
        line += f" - hint: {_text(rec['hint'])}"
    return line


class Console(Observer):
    """The decision lines on the proxy's stderr (implements ``Sink``).

    ``allows``: also a line per allowed decision (``run --verbose``). Blocks and
    would-blocks always get one. Never holds traffic back: ``healthy`` is True and
    ``admit`` is True whatever the terminal does.
    """

    def __init__(
        self,
        allows: bool = False,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
        max_per_s: int = MAX_LINES_PER_S,
    ) -> None:
        self.allows = allows
        self._log = logger
        self._clock = clock
        self._max = max_per_s
        self._window = -1
        self._written = 0
        self._skipped = 0

    def decision(self, event: DecisionEvent) -> None:
        if event.decision.action == "allow" and not self.allows:
            return
        if not self._room():
            return
        # %s of an already escaped line: SafeFormatter escapes again, which changes
        # nothing (escapes contain no control character)
        self._log.info("%s", describe(record_fields(event), with_time=False))

    def _room(self) -> bool:
        """One more line fits in this second's budget; says once how many did not."""
        window = int(self._clock())
        if window != self._window:
            if self._skipped:
                self._log.warning(
                    "egress-guard: %d decision lines left out (more than %d a second); "
                    "the audit log has them all",
                    self._skipped,
                    self._max,
                )
            self._window, self._written, self._skipped = window, 0, 0
        if self._written >= self._max:
            self._skipped += 1
            return False
        self._written += 1
        return True

    def close(self, event: CloseEvent) -> None:
        """Nothing: a connection's end is in the audit log and the metrics."""

    def policy(self, event: PolicyEvent) -> None:
        """Nothing: the policy reload already logs its own line."""

    def tunnel_accepted(self, conn_id: str) -> None:
        """Nothing: the CONNECT's decision line is written already."""


if TYPE_CHECKING:  # mypy checks Console against the Sink protocol here (nothing runs)
    from egress_guard.sinks.events import Sink

    _SINK: type[Sink] = Console
