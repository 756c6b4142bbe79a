"""State the guard's addons share: per-connection records and the one GuardState.

The guard is several mitmproxy addons (one per concern: requests, tunnel start,
upstream, held bodies, accounting, policy reload); they share one GuardState, built once
by egress_guard.proxy.guard.guard_addons. It holds what more than one of them reads (the
engine in force, the connections' decisions, the sinks) and the fan-out to the sinks,
so a decision is recorded the same way whichever hook made it.

Kept out of addon.py on purpose: ``mitmdump -s`` executes addon.py without registering
it in ``sys.modules``, and dataclasses defined in such a module fail to build.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from mitmproxy import ctx, http
from mitmproxy.connection import Client, Server

from egress_guard.engine import Decision, Engine
from egress_guard.engine.models import DEFAULT_MAX_MODEL_BODY
from egress_guard.engine.verdicts import unrecorded
from egress_guard.normalize import Host, IPAddress
from egress_guard.policy import load_catalog
from egress_guard.policy.model import Destination
from egress_guard.proxy.bodybudget import (
    DEFAULT_MAX_HELD_BODIES,
    TRIM_AFTER,
    BodyBudget,
    return_memory,
)
from egress_guard.proxy.patches import heldprogress
from egress_guard.sinks import redact
from egress_guard.sinks.events import CloseEvent, DecisionEvent, PolicyEvent, Sink
from egress_guard.sinks.fanout import Fanout

log = logging.getLogger("egress_guard")

#: the answer to traffic the audit sink cannot record: the guard is unavailable, not
#: the destination forbidden, and a retry may succeed once the log can be written
UNRECORDED_STATUS = 503

#: flow.metadata keys the hooks pass a request's state along with
APPROVAL_KEY = "egress_guard_approval"
MODEL_CHECK_KEY = "egress_guard_model_check"
#: the decision a deferred model check starts from (and records when the model is fine)
DECISION_KEY = "egress_guard_decision"
#: plain HTTP with a deferred model check: whether this request opens the upstream
OPENS_KEY = "egress_guard_opens"
#: the key of this request's reservation in the held-body budget
HELD_KEY = "egress_guard_held"
#: this request's reservation was evicted (stalled); its connection is being closed
EVICTED_KEY = "egress_guard_evicted"


class Blocked(Exception):
    """Raised by a hook's step to refuse: the hook wrapper records and answers it."""

    def __init__(self, decision: Decision, status: int | None = None):
        self.decision = decision
        #: the answer's status when not the usual one for the reason (503: not recorded)
        self.status = status


def unrecorded_block(host: str, why: str) -> Blocked:
    return Blocked(unrecorded(host, why), UNRECORDED_STATUS)


def peer(client: Client) -> str:
    return str(client.peername[0]) if client.peername else ""


@dataclass(slots=True)
class Approval:
    """An allowing decision for one upstream (host, port) on one client connection."""

    decision: Decision
    host: Host
    port: int
    #: the checked address to connect to; None only when a parent proxy resolves names
    address: IPAddress | None
    destination: Destination | None
    #: time.monotonic() when the decision was made; the close record's duration counts from here
    opened: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    #: the policy it was decided under: after a reload, keep-alive requests need a new one
    policy_sha256: str = ""
    #: the upstream connection opened for it (plain HTTP), once connected
    server: Server | None = None
    #: the clients.auth user it was approved for (its close record names it)
    user: str | None = None
    #: every address DNS gave for the name (all checked), when the guard looked it up
    addresses: tuple[IPAddress, ...] | None = None


@dataclass(slots=True)
class ConnState:
    client: str
    started: float
    #: CONNECT authority: (host, port) the tunnel was decided for
    tunnel: tuple[Host, int] | None = None
    tunnel_decision: Decision | None = None
    approved: dict[tuple[str, int], Approval] = field(default_factory=dict)
    #: reason this connection must not reach any upstream any more
    blocked: str | None = None
    sni: str | None = None
    #: the clients.auth user the last proxy request proved (a tunnel's: its CONNECT's);
    #: None without clients.auth or when the password check failed
    user: str | None = None
    #: the tunnel's first bytes were read and judged (ClientHello and SNI, or not TLS);
    #: until then server_connect refuses the tunnel's upstream
    first_bytes_checked: bool = False
    #: server connection id -> (the (name, port) it was asked for, its approval's key),
    #: while it connects to the checked address (see Upstream.server_connected)
    pinned: dict[str, tuple[tuple[str, int], tuple[str, int]]] = field(default_factory=dict)
    #: approvals replaced after a policy reload; their close records are still owed
    retired: list[Approval] = field(default_factory=list)


class GuardState:
    """What the guard's addons share: the engine in force, the client connections'
    state, the sinks (and how a decision reaches them), the held-body budget."""

    def __init__(self, sinks: Sequence[Sink] = ()) -> None:
        self.sinks: list[Sink] = list(sinks)
        #: every sink as one (the same list): what the addons call
        self.fanout = Fanout(self.sinks)
        #: replaced whole by the policy reload addon (one assignment: old or new)
        self.engine: Engine | None = None
        self.conns: dict[str, ConnState] = {}
        self.self_endpoints: frozenset[tuple[str, int]] = frozenset()
        #: the guard's other listeners (the metrics listener, its status page): refused
        #: as its own address like the proxy's, so an agent cannot read them through it
        self.other_listeners: list[tuple[str, int]] = []
        self.catalog = load_catalog()
        #: proxy users (clients.auth.users_file), swapped with the engine
        self.users: dict[str, str] = {}
        #: (host, port) of the parent proxy in upstream mode
        self.parent: tuple[str, int] | None = None
        #: ``egress-guard sandbox``: the connections its relay opened to this proxy for a
        #: connection caught around the proxy, by the relay's (address, port) as this
        #: proxy sees its peer -> the address the caught connection was sent to
        #: (proxy/sandbox_relay.py). Only the relay, in this process, writes it; a
        #: client in the sandbox cannot reach this proxy's own listener.
        self.direct_origins: dict[tuple[str, int], IPAddress] = {}
        #: model-call bodies held whole right now (--max-held-bodies)
        self.bodies = BodyBudget.for_limits(DEFAULT_MAX_HELD_BODIES, DEFAULT_MAX_MODEL_BODY)
        #: bodies.released when memory was last given back; a give-back is scheduled
        self._trimmed_at = 0
        self._trim_handle: asyncio.TimerHandle | None = None

    # -- connections and the engine -------------------------------------------------------

    def state(self, client: Client) -> ConnState:
        st = self.conns.get(client.id)
        if st is None:
            st = self.conns[client.id] = ConnState(client=peer(client), started=time.monotonic())
        return st

    def current_engine(self) -> Engine:
        eng = self.engine
        if eng is None:
            raise RuntimeError("no policy loaded")
        return eng

    def policy_files(self) -> tuple[str, ...]:
        """The names the policy file goes by in hints (the engine's source, the option's
        path); never raises: it runs while a refusal is being answered."""
        try:
            eng = self.engine
            names = [str(ctx.options.egress_guard_policy or "")]
            if eng is not None:
                names.append(eng.policy.source)
            return tuple(n for n in names if n)
        except Exception:
            return ()

    # -- sinks -----------------------------------------------------------------------------

    def emit_policy(self, event: PolicyEvent) -> None:
        self.fanout.policy(event)

    def event(
        self,
        conn_id: str,
        state: ConnState,
        d: Decision,
        method: str | None,
        path: str | None,
        opens: bool,
    ) -> DecisionEvent:
        eng = self.engine
        return DecisionEvent(
            conn_id=conn_id,
            client=state.client,
            decision=d,
            mode=eng.policy.mode if eng else "enforce",
            policy_sha256=eng.policy.sha256 if eng else "",
            sni=state.sni,
            user=state.user,
            method=method,
            path=redact.path(path) if path else None,
            opens=opens,
        )

    def record(
        self,
        conn_id: str,
        state: ConnState,
        d: Decision,
        *,
        method: str | None = None,
        path: str | None = None,
        opens: bool = False,
    ) -> None:
        """Record a decision that lets nothing go upstream (sinks queue it, never drop
        it). One that does must go through ``admit``."""
        self.fanout.decision(self.event(conn_id, state, d, method, path, opens))

    async def admit(
        self,
        conn_id: str,
        state: ConnState,
        d: Decision,
        *,
        method: str | None = None,
        path: str | None = None,
        opens: bool = False,
    ) -> None:
        """Record a decision that lets traffic go upstream, and return only once every
        sink has accepted it (the audit log: its line is written). Raises Blocked (503,
        internal_error) when a sink cannot record it, or fails: nothing is forwarded
        that the audit log does not hold."""
        if not await self.fanout.admit(self.event(conn_id, state, d, method, path, opens)):
            raise unrecorded_block(
                d.host, "the audit log could not record this request: refusing it"
            )

    def sinks_healthy(self) -> bool:
        return self.fanout.healthy

    def check_sinks(self, host: str) -> None:
        """Refuse early (before a body is read or a tunnel's bytes move) while a sink
        cannot record. Raises Blocked."""
        if not self.sinks_healthy():
            raise unrecorded_block(
                host, "audit sink unavailable: refusing traffic that cannot be recorded"
            )

    def recordable(self, d: Decision) -> Decision:
        """For the sync hooks that let bytes through on a decision they record (audit
        mode's would_block on a tunnel's first bytes): they cannot wait for the record to
        be written, so at least they refuse while a sink cannot record."""
        if d.allowed and not self.sinks_healthy():
            return unrecorded(
                d.host,
                "audit sink unavailable: refusing traffic that cannot be recorded",
                destination=d.destination,
                port=d.port,
            )
        return d

    def tunnel_accepted(self, conn_id: str) -> None:
        """The tunnel's first bytes passed: sinks that count tunnels once (the metrics)
        may count its CONNECT decision now."""
        self.fanout.tunnel_accepted(conn_id)

    def close_records(self, client_id: str, error: str | None = None) -> None:
        state = self.conns.pop(client_id, None)
        if state is None or not (state.approved or state.retired):
            return
        eng = self.engine
        now = time.monotonic()
        #: a tunnel refused at its first bytes (SNI, deny rules) never reached upstream:
        #: its close record says block, not the CONNECT's allow
        refused = state.tunnel if state.blocked and not state.first_bytes_checked else None
        for approval in [*state.retired, *state.approved.values()]:
            d = approval.decision
            if refused is not None and refused == (approval.host, approval.port):
                d = d._replace(action="block")
            self.fanout.close(
                CloseEvent(
                    conn_id=client_id,
                    client=state.client,
                    user=approval.user,
                    host=d.host,
                    port=d.port,
                    destination=d.destination,
                    decision=d.action,
                    bytes_up=approval.bytes_up,
                    bytes_down=approval.bytes_down,
                    duration_s=now - (approval.opened or state.started),
                    mode=eng.policy.mode if eng else "enforce",
                    policy_sha256=eng.policy.sha256 if eng else "",
                    error=error or (f"refused: {state.blocked}" if state.blocked else None),
                ),
            )

    # -- held bodies -------------------------------------------------------------------

    def release_body(self, flow: http.HTTPFlow, *, drop: bool = False) -> None:
        """Give a held body's reservation back; ``drop``: the body has been forwarded, and
        the flow need not keep it (it would live on while the response streams)."""
        flow.metadata.pop(heldprogress.PROGRESS, None)
        key = flow.metadata.pop(HELD_KEY, None)
        if key is None:
            return
        self.bodies.release(key)
        if drop:
            flow.request.raw_content = b""
        self.return_memory_soon()

    def return_memory_soon(self) -> None:
        """Once many bytes of held bodies were released, ask the allocator to give the
        memory back, a moment later (mitmproxy drops the flow after the hook)."""
        if self._trim_handle is not None or (self.bodies.released - self._trimmed_at < TRIM_AFTER):
            return

        def trim() -> None:
            self._trim_handle = None
            self._trimmed_at = self.bodies.released
            return_memory()

        self._trim_handle = asyncio.get_running_loop().call_later(1.0, trim)
