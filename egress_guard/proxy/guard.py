"""The guard as mitmproxy addons: turns connections into engine questions and enforces
the answers.

Enforcement has one choke point: ``server_connect`` (upstream.py), which mitmproxy
calls before every upstream connection. It refuses any connection for which no allowing
decision was recorded on this client connection, and rewrites the address to the one
the engine checked (DNS is resolved once, by the guard, never again by mitmproxy). The
earlier hooks (``http_connect``, ``requestheaders`` in requests.py, ``next_layer`` and
``tls_clienthello`` in tunnelstart.py) decide and answer the client with a 403 that
explains itself; if any of them fails, nothing gets recorded as allowed and
``server_connect`` refuses. Every hook is wrapped so an exception blocks (mitmproxy's
own default is to log addon errors and carry on).

The guard is split by concern into addons sharing one GuardState (state.py). Each
mitmproxy event that runs per connection or per request (CONNECT, next layer,
ClientHello, server connect, request, response, disconnect) is implemented by exactly
one of them, so splitting adds no hook calls on the hot path; only the start-up and
shutdown events (load, configure, running, done) reach several. ``guard_addons`` builds
the list, in order, for ``mitmdump -s egress_guard/addon.py`` and for the embedded
master (master.py). Absolute imports only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from egress_guard.engine.models import DEFAULT_MAX_MODEL_BODY
from egress_guard.proxy.accounting import Accounting
from egress_guard.proxy.bodies import Bodies
from egress_guard.proxy.bodybudget import (
    DEFAULT_HELD_BODY_MIN_RATE,
    DEFAULT_MAX_HELD_BODIES,
    HELD_BODY_GRACE,
    client_share,
)
from egress_guard.proxy.patches import (
    backpressure,
    connlimit,
    early_answer,
    heldprogress,
    http1limit,
)
from egress_guard.proxy.reload import PolicyReload
from egress_guard.proxy.requests import Requests
from egress_guard.proxy.state import GuardState
from egress_guard.proxy.transparent import Transparent
from egress_guard.proxy.tunnelstart import TunnelStart
from egress_guard.proxy.upstream import Upstream
from egress_guard.sinks.events import Sink

log = logging.getLogger("egress_guard")


class GuardSettings:
    """mitmproxy addon: the guard's request options, the mitmproxy settings the guard
    requires, and the mitmproxy patches it installs. First in the guard's addons: its
    ``configure`` runs before the policy is loaded, as it did in the one-class guard."""

    #: unique among mitmproxy addons (its default is the lower-cased class name, which
    #: another script's addon could take, and a clash refuses the whole guard)
    name = "egress_guard_settings"

    def __init__(self, guard: GuardState, requests: Requests) -> None:
        self.g = guard
        self._requests = requests

    def load(self, loader: Loader) -> None:
        # Here, not in `egress-guard run` only: under `mitmdump -s` too, a client must not
        # be able to fill the proxy's memory while its upstream connection opens.
        backpressure.install()
        connlimit.install()
        http1limit.install()  # nor by sending a head, a chunk line or pipelined bytes without end
        http1limit.on_refused = self._requests.on_http1_refused
        early_answer.install()  # a refused request's body is not taken into memory
        heldprogress.install()  # a held body's arrival is counted (stalled ones give way)
        loader.add_option(
            "egress_guard_inspect",
            bool,
            False,
            "Intercept TLS for destinations that declare methods, paths or models.",
        )
        loader.add_option(
            "egress_guard_max_model_body",
            int,
            DEFAULT_MAX_MODEL_BODY,
            "Largest request body (bytes) kept whole to read the model it asks for; larger "
            "bodies, and bodies of unknown length, are refused on destinations with models.",
        )
        loader.add_option(
            "egress_guard_max_held_bodies",
            int,
            DEFAULT_MAX_HELD_BODIES,
            "Request bodies (bytes, by declared length) held whole at once, all clients "
            "together; one client address may hold a quarter of it (at least one "
            "--max-model-body body). A body that does not fit is refused with 503.",
        )
        loader.add_option(
            "egress_guard_held_body_min_rate",
            int,
            DEFAULT_HELD_BODY_MIN_RATE,
            "Held bodies arriving slower than this (bytes/s, over their age; heads alone "
            f"included) and older than {HELD_BODY_GRACE:g} s are evicted (their "
            "connection closed) when another body does not fit. 0: never evict.",
        )

    def configure(self, updated: set[str]) -> None:
        # With eager connections mitmproxy contacts the upstream before the SNI check.
        if updated & {"connection_strategy", "egress_guard_policy"} and (
            getattr(ctx.options, "connection_strategy", "lazy") != "lazy"
        ):
            log.warning("egress-guard: setting connection_strategy=lazy (required)")
            ctx.options.update(connection_strategy="lazy")
        if updated & {"rawtcp", "egress_guard_inspect"} and (
            ctx.options.egress_guard_inspect and getattr(ctx.options, "rawtcp", False)
        ):
            # Inside an intercepted tunnel, non-HTTP bytes must not be relayed unchecked.
            log.warning("egress-guard: setting rawtcp=false (required with inspection)")
            ctx.options.update(rawtcp=False)
        if updated & {"egress_guard_max_held_bodies", "egress_guard_max_model_body"}:
            limit = ctx.options.egress_guard_max_held_bodies
            body = ctx.options.egress_guard_max_model_body
            if limit < 0:
                raise exceptions.OptionsError("egress_guard_max_held_bodies must not be negative")
            if body > limit:
                log.warning(
                    "egress-guard: --max-model-body (%d) is larger than --max-held-bodies "
                    "(%d): model bodies over %d bytes are refused (buffer_budget)",
                    body,
                    limit,
                    limit,
                )
            self.g.bodies.resize(limit, client_share(limit, body))
        if (
            "egress_guard_held_body_min_rate" in updated
            and ctx.options.egress_guard_held_body_min_rate < 0
        ):
            raise exceptions.OptionsError("egress_guard_held_body_min_rate must not be negative")


def guard_addons(
    sinks: Sequence[Sink] = (), *, transparent: bool = False
) -> tuple[GuardState, list[object]]:
    """The guard's shared state and its addons, in the order mitmproxy must call them.
    ``transparent``: connections arrive redirected, without CONNECT (transparent.py)."""
    guard = GuardState(sinks)
    requests = Requests(guard)
    start = TunnelStart(guard)
    addons: list[object] = [
        GuardSettings(guard, requests),
        Upstream(guard),
        PolicyReload(guard),
        requests,
        start,
        *([Transparent(guard, start)] if transparent else []),
        Bodies(guard),
        Accounting(guard),
    ]
    return guard, addons
