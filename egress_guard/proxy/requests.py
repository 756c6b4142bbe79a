"""CONNECT and HTTP request heads: the Requests addon (``http_connect``,
``requestheaders``).

A CONNECT is decided end to end here (client gate, names, DNS, addresses, interception)
and recorded before the tunnel opens; what its first bytes show is tunnelstart.py's.
A plain-HTTP request, or one inside an intercepted tunnel, is decided and recorded
before it is forwarded; one whose model is in its body waits for bodies.py.
"""

from __future__ import annotations

from mitmproxy import ctx, http
from mitmproxy.connection import Client

from egress_guard.engine import BodyShape, Decision, Engine, Request
from egress_guard.engine.models import api_kind
from egress_guard.engine.types import printable
from egress_guard.engine.verdicts import malformed_request
from egress_guard.policy.model import Destination
from egress_guard.proxy.accounting import count_http, head_size
from egress_guard.proxy.bodies import hold_body
from egress_guard.proxy.hygiene import check_well_formed, strip_hop_by_hop
from egress_guard.proxy.refuse import guard_flow, safe_host
from egress_guard.proxy.state import (
    APPROVAL_KEY,
    DECISION_KEY,
    MODEL_CHECK_KEY,
    OPENS_KEY,
    Approval,
    Blocked,
    ConnState,
    GuardState,
)
from egress_guard.proxy.target import (
    audited,
    authorize,
    check_host_header,
    gate,
    raw_target,
    redecide_tunnel,
    rule_path,
)
from egress_guard.proxy.upstream import retire


class Requests:
    """mitmproxy addon: decides CONNECTs and HTTP requests from their heads."""

    #: unique among mitmproxy addons (its default is the lower-cased class name, which
    #: another script's addon could take, and a clash refuses the whole guard)
    name = "egress_guard_requests"

    def __init__(self, guard: GuardState) -> None:
        self.g = guard

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        await guard_flow(self.g, flow, self._on_connect)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.error is not None:
            # mitmproxy already refused this request (it answers 400 itself and forwards
            # nothing); record the refusal rather than deciding on a request that is dead.
            state = self.g.state(flow.client_conn)
            d = malformed_request(safe_host(flow), None, printable(flow.error.msg))
            self.g.record(
                flow.client_conn.id, state, d, method=flow.request.method, path=flow.request.path
            )
            return
        await guard_flow(self.g, flow, self._on_request)

    def on_http1_refused(self, client: Client, message: str, req: http.Request | None) -> None:
        """http1limit ended a client connection (a head or line over its bound, trailers):
        record it like any malformed request, with the request it was reading, if its
        head had been read."""
        d = malformed_request(
            printable(req.host) if req is not None else "",
            req.port if req is not None else None,
            message,
        )
        self.g.record(
            client.id,
            self.g.state(client),
            d,
            method=req.method if req is not None else None,
            path=req.path if req is not None else None,
        )

    async def _on_connect(self, flow: http.HTTPFlow, state: ConnState) -> None:
        g = self.g
        eng = g.current_engine()
        req = flow.request
        gate(g, eng, state, req.headers, req.host)
        host, port = raw_target(req)
        origin = None
        if g.direct_origins and (peername := flow.client_conn.peername):
            origin = g.direct_origins.get((str(peername[0]), int(peername[1])))
        approval = await authorize(g, eng, host, port, tunnel=True, origin=origin)
        approval.user = state.user
        # recorded (written) before anything opens; refused (no close record) if not
        await g.admit(flow.client_conn.id, state, approval.decision, method="CONNECT", opens=True)
        state.tunnel = (approval.host, approval.port)
        state.tunnel_decision = approval.decision
        state.approved[(approval.host.value, approval.port)] = approval

    async def _on_request(self, flow: http.HTTPFlow, state: ConnState) -> None:
        g = self.g
        eng = g.current_engine()
        req = flow.request
        if state.tunnel is not None:
            # A request inside an intercepted CONNECT tunnel: the CONNECT target is the
            # authority, and the destination's request rules apply. Each one is recorded
            # before it is forwarded, so an audit outage refuses it like a new CONNECT.
            host, port = state.tunnel
            g.check_sinks(host.value)
            strip_hop_by_hop(req)  # (Proxy-Authorization too: it is not the origin's)
            dest_name = state.tunnel_decision.destination if state.tunnel_decision else None
            mismatch = check_host_header(eng, flow, host, port, dest_name)
            if req.authority and not (req.is_http2 or req.is_http3):
                # an absolute-form request line names the host a server routes by
                mismatch = (
                    check_host_header(eng, flow, host, port, dest_name, [req.authority]) or mismatch
                )
            approval = state.approved.get((host.value, port))
            if approval is None or state.tunnel_decision is None:
                raise RuntimeError("request in a tunnel without an allowing decision")
            if approval.policy_sha256 != eng.policy.sha256:
                redecide_tunnel(eng, state, approval)
            dest = eng.destination(state.tunnel_decision.destination)
            decision = audited(state.tunnel_decision, mismatch)
            if dest is not None:
                ruled = self._request_rules(eng, flow, dest, approval, decision)
                if ruled is None:
                    return  # recorded once the body (and its model) is in
                decision = ruled
            await g.admit(flow.client_conn.id, state, decision, method=req.method, path=req.path)
            count_http(flow, approval)
            return
        gate(g, eng, state, req.headers, req.host)
        strip_hop_by_hop(req)  # Proxy-Authorization too, now that gate has read it
        check_well_formed(req)
        target_host, target_port = raw_target(req)
        approval = await authorize(g, eng, target_host, target_port)
        approval.user = state.user
        mismatch = check_host_header(
            eng, flow, approval.host, approval.port, approval.decision.destination
        )
        key = (approval.host.value, approval.port)
        known = state.approved.get(key)
        if known is not None and known.policy_sha256 != approval.policy_sha256:
            retire(state, key, known)  # decided under an older policy
            known = None
        if known is not None:
            approval = known  # keep-alive: one close record per upstream, bytes added up
        decision = audited(approval.decision, mismatch)
        dest = approval.destination
        if dest is not None and dest.needs_inspection:
            # Plain HTTP needs no interception: a destination's request rules apply as is.
            flow.metadata[OPENS_KEY] = known is None
            ruled = self._request_rules(eng, flow, dest, approval, decision)
            if ruled is None:
                return  # approved and recorded once the body (and its model) is in
            decision = ruled
        # Only a request that goes upstream makes an upstream (and its close record), and
        # only once its record is written.
        await g.admit(
            flow.client_conn.id,
            state,
            decision,
            method=req.method,
            path=req.path,
            opens=known is None,
        )
        state.approved[key] = approval
        count_http(flow, approval)

    def _request_rules(
        self,
        eng: Engine,
        flow: http.HTTPFlow,
        dest: Destination,
        approval: Approval,
        decision: Decision,
    ) -> Decision | None:
        """A destination's method and path rules, for plain HTTP and inspected tunnels
        alike. Returns the decision to record, or None when the model is in the body: then
        the body is kept whole and the ``request`` hook (bodies.py) decides and records."""
        req = flow.request
        upgrade = req.headers.get("upgrade")
        bad = eng.decide(Request(dest, req.method, req.path, None, decision, upgrade))
        if bad is not None:
            if not bad.allowed:
                raise Blocked(bad)
            decision = bad  # audit mode: recorded as would_block
        if dest.models is not None and api_kind(rule_path(req.path)) is not None:
            unheld = eng.decide(
                BodyShape(
                    dest,
                    decision,
                    req.method,
                    req.headers.get("content-length"),
                    "transfer-encoding" in req.headers,
                    ctx.options.egress_guard_max_model_body,
                    not (req.is_http2 or req.is_http3),
                )
            )
            if unheld is not None:
                if not unheld.allowed:
                    raise Blocked(unheld)
                return unheld  # audit mode: would_block, and the body streams unbuffered
            hold_body(self.g, flow, decision)
            flow.metadata[MODEL_CHECK_KEY] = dest.name
            flow.metadata[DECISION_KEY] = decision
            approval.bytes_up += head_size(req.method, req.path, req.headers)
            flow.metadata[APPROVAL_KEY] = approval
            return None
        return decision
