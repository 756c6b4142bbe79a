"""The fail-closed wrapper of the HTTP hooks, and how a refusal is answered.

Every HTTP hook step runs inside ``guard_flow``: a ``Blocked`` is recorded and answered
with its 403 (or 503), and any other exception blocks as internal_error. mitmproxy's
own default is to log addon errors and carry on, which would let the request through.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from mitmproxy import http

from egress_guard.engine import Decision
from egress_guard.engine.models import api_kind
from egress_guard.engine.verdicts import internal_error
from egress_guard.proxy.patches import early_answer
from egress_guard.proxy.responses import block_response, provider_block_response
from egress_guard.proxy.state import Blocked, ConnState, GuardState
from egress_guard.sinks import redact

log = logging.getLogger("egress_guard")

Step = Callable[[http.HTTPFlow, ConnState], Awaitable[None]]


async def guard_flow(g: GuardState, flow: http.HTTPFlow, step: Step) -> None:
    state = g.state(flow.client_conn)
    try:
        await step(flow, state)
    except Blocked as b:
        deny_flow(g, flow, state, b.decision, b.status)
    except Exception as e:
        log.exception(
            "egress-guard: internal error deciding %s; blocking",
            redact.path(flow.request.pretty_url),
        )
        deny_flow(g, flow, state, internal_error(safe_host(flow), detail=type(e).__name__))


def deny_flow(
    g: GuardState, flow: http.HTTPFlow, state: ConnState, d: Decision, status: int | None = None
) -> None:
    connect = flow.request.method == "CONNECT"
    if connect:
        state.blocked = state.blocked or d.reason
    try:
        g.record(
            flow.client_conn.id,
            state,
            d,
            method=flow.request.method,
            path=None if connect else flow.request.path,
        )
    finally:
        # the client is not told where the policy file is (responses.public_text)
        sources = g.policy_files()
        if state.tunnel is not None and not connect:
            # inside an inspected API tunnel: answer in the provider's error format
            kind = api_kind(flow.request.path)
            flow.response = provider_block_response(d, kind, sources, status)
        else:
            policy = g.engine.policy.sha256 if g.engine is not None else None
            flow.response = block_response(d, sources, status, policy)
        if not connect:
            # no "100 Continue" for a body that is refused already
            flow.request.headers.pop("expect", None)
            early_answer.mark(flow)


def safe_host(flow: http.HTTPFlow) -> str:
    try:
        return str(flow.request.host)[:200]
    except Exception:
        return ""
