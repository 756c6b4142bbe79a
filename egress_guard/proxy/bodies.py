"""Held request bodies: a model-call body kept whole to read the model it asks for.

The Bodies addon owns the ``request`` hook (the whole body is in: check its model, then
record and forward it, or refuse) and ``error`` (the stream died: give its reservation
back). ``hold_body`` reserves the room when the request's head asks for a model check;
it evicts stalled bodies before refusing one for capacity (--held-body-min-rate).
"""

from __future__ import annotations

import logging
import time

from mitmproxy import ctx, http
from mitmproxy.connection import Client

from egress_guard.engine import Decision, ModelUnread, Request
from egress_guard.engine.models import ModelUnknown, requested_models
from egress_guard.engine.verdicts import buffer_budget
from egress_guard.proxy.bodybudget import HELD_BODY_GRACE, Held
from egress_guard.proxy.patches import heldprogress
from egress_guard.proxy.refuse import guard_flow
from egress_guard.proxy.state import (
    APPROVAL_KEY,
    DECISION_KEY,
    EVICTED_KEY,
    HELD_KEY,
    MODEL_CHECK_KEY,
    OPENS_KEY,
    Blocked,
    ConnState,
    GuardState,
    peer,
)
from egress_guard.proxy.target import rule_path

log = logging.getLogger("egress_guard")


class Bodies:
    """mitmproxy addon: the deferred model check of held bodies, and their budget."""

    #: unique among mitmproxy addons (its default is the lower-cased class name, which
    #: another script's addon could take, and a clash refuses the whole guard)
    name = "egress_guard_bodies"

    def __init__(self, guard: GuardState) -> None:
        self.g = guard

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(EVICTED_KEY):
            # its reservation was evicted and its connection closed; should its body have
            # ended meanwhile, it still goes nowhere (recorded at eviction)
            self.g.release_body(flow)
            if flow.killable:
                flow.kill()
            return
        if MODEL_CHECK_KEY in flow.metadata and flow.response is None:
            await guard_flow(self.g, flow, self._on_request_body)
        if flow.response is not None:
            self.g.release_body(flow)  # refused: the body goes nowhere

    def error(self, flow: http.HTTPFlow) -> None:
        # the stream was reset, the client left mid-body, the upstream failed
        self.g.release_body(flow)

    async def _on_request_body(self, flow: http.HTTPFlow, state: ConnState) -> None:
        """Inspect mode: the whole request body is here; check the model it asks for."""
        eng = self.g.current_engine()
        req = flow.request
        dest = eng.destination(flow.metadata[MODEL_CHECK_KEY])
        approval = flow.metadata.get(APPROVAL_KEY)
        decision = flow.metadata.get(DECISION_KEY)
        if dest is None or decision is None:
            raise RuntimeError("model check without a destination")
        if approval is not None:
            approval.bytes_up += len(req.raw_content or b"")
        try:
            models = requested_models(
                rule_path(req.path),
                req.raw_content,
                headers=req.headers.keys(),
                query=req.path.partition("?")[2],
                content_type=req.headers.get_all("content-type"),
            )
        except ModelUnknown as e:
            bad = eng.decide(ModelUnread(dest, decision, str(e)))
        else:
            bad = eng.decide(Request(dest, req.method, req.path, models, decision))
        if bad is not None:
            if not bad.allowed:
                raise Blocked(bad)
            decision = bad
        opens = flow.metadata.pop(OPENS_KEY, False)
        await self.g.admit(
            flow.client_conn.id, state, decision, method=req.method, path=req.path, opens=opens
        )
        if approval is not None and state.tunnel is None:
            state.approved[(approval.host.value, approval.port)] = approval


def hold_body(g: GuardState, flow: http.HTTPFlow, decision: Decision) -> None:
    """Reserve the body's declared length in the held-body budget, or refuse the
    request (503 buffer_budget, in every mode: nothing was checked). Raises Blocked."""
    length = flow.request.headers.get("content-length", "0")
    size = int(length) if length.isdigit() else 0  # check_model_body refused the rest
    key = (flow.client_conn.id, flow.id)
    client = peer(flow.client_conn)
    if size > 0 and not g.bodies.fits(client, size):
        _evict_stalled(g, client, size)
    why = g.bodies.reserve(key, flow.client_conn.id, client, size, tag=flow)
    if why is not None:
        raise Blocked(
            buffer_budget(
                decision,
                decision.host,
                decision.port,
                "the guard is holding as many request bodies as it may; retry later",
                why,
            )
        )
    if size > 0:
        flow.metadata[HELD_KEY] = key
        flow.metadata[heldprogress.PROGRESS] = g.bodies.get(key)


def _evict_stalled(g: GuardState, client: str, size: int) -> None:
    """Before refusing a body for capacity: release the reservations of held bodies
    that are stalled (a head alone, or a trickle: see bodybudget.Held.stalled), close
    their connections and record each. Never raises: what cannot be closed stays
    released and its flow marked, so its body, should it end, is not forwarded."""
    rate = ctx.options.egress_guard_held_body_min_rate
    now = time.monotonic()
    try:
        evicted = g.bodies.evict_stalled(client, size, now, HELD_BODY_GRACE, rate)
    except Exception:
        log.exception("egress-guard: cannot evict stalled held bodies")
        return
    for _, entry in evicted:
        try:
            _evict(g, entry, now)
        except Exception:
            log.exception("egress-guard: cannot evict a stalled held body")
    if evicted:
        g.return_memory_soon()


def _evict(g: GuardState, entry: Held, now: float) -> None:
    """End one evicted reservation's flow: mark it, record it, close its client."""
    flow = entry.tag
    if not isinstance(flow, http.HTTPFlow):
        raise TypeError(f"held body tagged {type(flow).__name__}")
    flow.metadata.pop(HELD_KEY, None)
    flow.metadata.pop(heldprogress.PROGRESS, None)
    flow.metadata[EVICTED_KEY] = True
    client = flow.client_conn
    try:
        req = flow.request
        base = flow.metadata.get(DECISION_KEY)
        d = buffer_budget(
            base if isinstance(base, Decision) else None,
            req.host,
            req.port,
            "the request body stalled while other requests needed the room it "
            "held; send the body at once",
            f"held body stalled: {entry.received} of {entry.size} bytes after "
            f"{now - entry.since:.1f} s; evicted for another request",
        )
        state = g.conns.get(client.id)
        if state is None:
            state = ConnState(client=peer(client), started=entry.since)
        g.record(client.id, state, d, method=req.method, path=req.path)
    finally:
        _close_client(client)


def _close_client(client: Client) -> None:
    """Close a client connection now (mitmproxy's handler for it cancels its reader,
    and the usual disconnect hooks follow)."""
    servers = ctx.master.addons.get("proxyserver")
    handler = servers.connections.get(client.id) if servers is not None else None
    if handler is None:
        log.warning("egress-guard: no connection to close for client %s", client.id)
        return
    handler.close_connection(handler.client)
