"""The mitmproxy addon: turns connections into engine questions and enforces the answers.

Enforcement has one choke point: ``server_connect``, which mitmproxy calls before every
upstream connection. It refuses any connection for which no allowing decision was
recorded on this client connection, and rewrites the address to the one the engine
checked (DNS is resolved once, here, never again by mitmproxy). The earlier hooks
(``http_connect``, ``requestheaders``, ``tls_clienthello``) decide and answer the client
with a 403 that explains itself; if any of them fails, nothing gets recorded as allowed
and ``server_connect`` refuses. Every hook is wrapped so an exception blocks
(mitmproxy's own default is to log addon errors and carry on).

Loaded by ``mitmdump -s egress_guard/addon.py`` (that thin module builds the instance) and
by the embedded master: absolute imports only, options declared in ``load`` and applied in
``configure``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.connection import Client
from mitmproxy.proxy import layer, mode_specs, server_hooks
from mitmproxy.proxy.layers.http import HttpLayer, HTTPMode, HttpStream
from mitmproxy.proxy.layers.tcp import TCPLayer
from mitmproxy.proxy.layers.tls import ClientTLSLayer, parse_client_hello
from mitmproxy.tls import ClientHelloData

from egress_guard.engine import Decision, Engine, Match, Reason
from egress_guard.engine.decide import printable as _printable
from egress_guard.engine.models import (
    DEFAULT_MAX_MODEL_BODY,
    ModelUnknown,
    api_kind,
    requested_models,
)
from egress_guard.engine.paths import AmbiguousPath, canonical_path
from egress_guard.normalize import (
    Host,
    IPAddress,
    NormalizationError,
    canonical_ip,
    normalize_host,
    normalize_port,
    parse_authority,
)
from egress_guard.policy import EffectivePolicy, PolicyError, load_catalog, load_policy, load_preset
from egress_guard.policy.loader import read_regular_file
from egress_guard.policy.model import Destination
from egress_guard.proxy import resolver
from egress_guard.proxy.bodybudget import (
    DEFAULT_HELD_BODY_MIN_RATE,
    DEFAULT_MAX_HELD_BODIES,
    HELD_BODY_GRACE,
    TRIM_AFTER,
    BodyBudget,
    Held,
    client_share,
    return_memory,
)
from egress_guard.proxy.patches import (
    backpressure,
    connlimit,
    early_answer,
    heldprogress,
    http1limit,
    splice,
)
from egress_guard.proxy.responses import block_response, provider_block_response
from egress_guard.proxy.state import Approval, ConnState
from egress_guard.proxy.tunnel import (
    MAX_CLIENT_HELLO,
    CountingTCPLayer,
    HelloFacts,
    client_hello_shape_problem,
    read_plain_client_hello,
    sni_problem,
    tls_layers,
)
from egress_guard.sinks import redact
from egress_guard.sinks.events import CloseEvent, DecisionEvent, PolicyEvent, Sink
from egress_guard.sinks.fanout import Fanout
from egress_guard.sinks.logsafe import Block

log = logging.getLogger("egress_guard")

RELOAD_POLL_S = 1.0
#: a changed policy file must keep the same size, mtime and inode this long to be loaded
RELOAD_SETTLE_S = 0.5


class _Blocked(Exception):
    def __init__(self, decision: Decision, status: int | None = None):
        self.decision = decision
        #: the answer's status when not the usual one for the reason (503: not recorded)
        self.status = status


#: the answer to traffic the audit sink cannot record: the guard is unavailable, not
#: the destination forbidden, and a retry may succeed once the log can be written
UNRECORDED_STATUS = 503


#: what the client is told (also inside an inspected API call, in the provider's format)
UNRECORDED_HINT = "the audit log cannot record traffic now; retry later"


def _unrecorded(host: str, why: str) -> _Blocked:
    return _Blocked(
        Decision(
            False, "block", "internal_error", None, host, None, hint=UNRECORDED_HINT, detail=why
        ),
        UNRECORDED_STATUS,
    )


def _peer(client: Client) -> str:
    return str(client.peername[0]) if client.peername else ""


class EgressGuard:
    """mitmproxy addon enforcing an egress-guard policy."""

    def __init__(self, sinks: Sequence[Sink] = ()) -> None:
        self.sinks: list[Sink] = list(sinks)
        self.fanout = Fanout(self.sinks)
        self.engine: Engine | None = None
        self.conns: dict[str, ConnState] = {}
        self.self_endpoints: frozenset[tuple[str, int]] = frozenset()
        self._catalog = load_catalog()
        self._watch_task: asyncio.Task[None] | None = None
        self._policy_stamp: tuple[Any, ...] | None = None
        self._users: dict[str, str] = {}
        self._reload_lock = asyncio.Lock()
        self._sighup_task: asyncio.Task[bool] | None = None
        #: (host, port) of the parent proxy in upstream mode
        self._parent: tuple[str, int] | None = None
        #: model-call bodies held whole right now (--max-held-bodies)
        self.bodies = BodyBudget.for_limits(DEFAULT_MAX_HELD_BODIES, DEFAULT_MAX_MODEL_BODY)
        #: bodies.released when memory was last given back; a give-back is scheduled
        self._trimmed_at = 0
        self._trim_handle: asyncio.TimerHandle | None = None

    # -- mitmproxy lifecycle ------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        # Here, not in `egress-guard run` only: under `mitmdump -s` too, a client must not
        # be able to fill the proxy's memory while its upstream connection opens.
        backpressure.install()
        connlimit.install()
        http1limit.install()  # nor by sending a head, a chunk line or pipelined bytes without end
        http1limit.on_refused = self._on_http1_refused
        early_answer.install()  # a refused request's body is not taken into memory
        heldprogress.install()  # a held body's arrival is counted (stalled ones give way)
        loader.add_option(
            "egress_guard_policy",
            str,
            "",
            "Policy file (YAML). Empty: the built-in minimal preset.",
        )
        loader.add_option(
            "egress_guard_mode",
            str,
            "",
            "Override the policy's mode: enforce or audit. Empty: the policy's own mode.",
            choices=("", "enforce", "audit"),
        )
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
        if "mode" in updated:
            self._parent = _parent_proxy(ctx.options.mode)
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
            self.bodies.resize(limit, client_share(limit, body))
        if (
            "egress_guard_held_body_min_rate" in updated
            and ctx.options.egress_guard_held_body_min_rate < 0
        ):
            raise exceptions.OptionsError("egress_guard_held_body_min_rate must not be negative")
        if updated & {"egress_guard_policy", "egress_guard_mode"}:
            try:
                policy = self._read_policy()
            except PolicyError as e:
                self._emit_policy(
                    PolicyEvent(False, self._policy_source(), None, 1, None, e.render())
                )
                raise exceptions.OptionsError(e.render()) from None
            self._install(policy)
        elif "egress_guard_inspect" in updated and self.engine is not None:
            self._warn_uninspected(self.engine.policy)

    def running(self) -> None:
        self.self_endpoints = self._listen_endpoints()
        if self.engine is not None:
            self.engine = replace_engine(self.engine, self.self_endpoints)
        self._start_reload_watch()

    def done(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        # Shutting down: every connection still open gets its close record now, so the
        # audit log never has an allow without its close.
        for client_id in list(self.conns):
            self._close_records(client_id, error="proxy shutting down")
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    # -- policy ------------------------------------------------------------------------

    def _policy_source(self) -> str:
        return str(ctx.options.egress_guard_policy or "builtin:minimal")

    def _read_policy(self) -> EffectivePolicy:
        return _load(ctx.options.egress_guard_policy, ctx.options.egress_guard_mode)

    def _install(self, policy: EffectivePolicy) -> None:
        """Build and activate a policy (start-up path, on the event loop)."""
        engine = Engine(policy, self._catalog, self.self_endpoints)
        self._activate(policy, engine, _read_users(policy), _stamp(ctx.options.egress_guard_policy))

    def _activate(
        self, policy: EffectivePolicy, engine: Engine, users: dict[str, str], stamp: Any
    ) -> None:
        """Swap in a fully built policy: one assignment, so a request sees old or new."""
        self.engine = engine
        self._users = users
        self._policy_stamp = stamp
        log.info(
            "egress-guard: policy %s loaded (mode %s, %d destinations, sha256 %s)",
            policy.source,
            policy.mode,
            len(policy.destinations),
            policy.sha256[:16],
        )
        self._emit_policy(
            PolicyEvent(
                True,
                policy.source,
                policy.sha256,
                1,
                policy.mode,
                destinations=tuple(d.name for d in policy.destinations),
            )
        )
        self._warn_uninspected(policy)

    @staticmethod
    def _warn_uninspected(policy: EffectivePolicy) -> None:
        """Say at start-up and on each reload which tunnels will be refused because
        their destination's request rules need interception and it is off."""
        if ctx.options.egress_guard_inspect:
            return
        names = [d.name for d in policy.destinations if d.needs_inspection]
        if not names:
            return
        log.warning(
            "egress-guard: inspection is off (no --inspect; mitmdump option "
            "egress_guard_inspect): HTTPS tunnels (CONNECT) to %s are %s as "
            "inspection_required, because their methods/paths/models rules can only be "
            "checked with TLS interception; plain-HTTP requests to them are checked as usual",
            ", ".join(repr(n) for n in names),
            "let through unchecked and recorded as would_block"
            if policy.mode == "audit"
            else "refused",
        )

    async def reload(self, *, only_if_changed: bool = False) -> bool:
        """Load the policy again; on any error keep the one in force. True on success.

        Parsing and compiling run in a worker thread: a policy of many thousand rules
        takes seconds to load, and the proxy keeps serving under the old one meanwhile.
        ``only_if_changed`` (the file watcher): nothing to do if the file is as last
        loaded, which it is when a SIGHUP sent after the edit got there first.
        """
        async with self._reload_lock:
            path, mode = ctx.options.egress_guard_policy, ctx.options.egress_guard_mode
            stamp = _stamp(path)
            if only_if_changed and stamp == self._policy_stamp:
                return True
            catalog, endpoints = self._catalog, self.self_endpoints

            def build() -> tuple[EffectivePolicy, Engine, dict[str, str]]:
                policy = _load(path, mode)
                return policy, Engine(policy, catalog, endpoints), _read_users(policy)

            try:
                policy, engine, users = await asyncio.to_thread(build)
            except PolicyError as e:
                log.error(
                    Block("egress-guard: policy reload rejected, keeping the old policy:\n%s"),
                    Block(e.render()),
                )
                self._policy_stamp = stamp
                self._emit_policy(
                    PolicyEvent(False, self._policy_source(), None, 1, None, e.render())
                )
                return False
            except Exception as e:  # the old policy stays in force whatever went wrong
                log.exception("egress-guard: policy reload failed, keeping the old policy")
                self._policy_stamp = stamp
                self._emit_policy(PolicyEvent(False, self._policy_source(), None, 1, None, repr(e)))
                return False
            self._activate(policy, engine, users, stamp)
            return True

    def _start_reload_watch(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        if ctx.options.egress_guard_policy:
            self._watch_task = loop.create_task(self._watch_policy())

    def _on_sighup(self) -> None:
        log.info("egress-guard: SIGHUP, reloading policy")
        self._sighup_task = asyncio.get_running_loop().create_task(self.reload())

    async def _watch_policy(self) -> None:
        """Poll the policy file. Polling the resolved path catches in-place edits, renames
        over the file and a Kubernetes ConfigMap's ``..data`` symlink swap alike.

        A change is loaded only once the file has stopped changing for a moment: a file
        rewritten in place can be valid YAML halfway through (everything before
        ``deny:``), and loading that would drop rules both versions have.
        """
        while True:
            await asyncio.sleep(RELOAD_POLL_S)
            stamp = _stamp(ctx.options.egress_guard_policy)
            if stamp == self._policy_stamp:
                continue
            while True:
                await asyncio.sleep(RELOAD_SETTLE_S)
                settled = _stamp(ctx.options.egress_guard_policy)
                if settled == stamp:
                    break
                stamp = settled
            log.info("egress-guard: policy file changed, reloading")
            await self.reload(only_if_changed=True)

    def _listen_endpoints(self) -> frozenset[tuple[str, int]]:
        ps = ctx.master.addons.get("proxyserver")
        if ps is None:
            return frozenset()
        out: set[tuple[str, int]] = set()
        for addr in ps.listen_addrs():
            host, port = str(addr[0]), int(addr[1])
            ip = canonical_ip(ipaddress.ip_address(host.partition("%")[0]))
            if ip.is_unspecified:
                for local in _local_addresses():
                    out.add((local, port))
            else:
                out.add((str(ip), port))
                if ip.is_loopback:
                    out.update((a, port) for a in ("127.0.0.1", "::1"))
        return frozenset(out)

    # -- events --------------------------------------------------------------------------

    def _emit_policy(self, event: PolicyEvent) -> None:
        self.fanout.policy(event)

    def _event(
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
            method=method,
            path=redact.path(path) if path else None,
            opens=opens,
        )

    def _record(
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
        it). One that does must go through ``_admit``."""
        self.fanout.decision(self._event(conn_id, state, d, method, path, opens))

    async def _admit(
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
        sink has accepted it (the audit log: its line is written). Raises _Blocked (503,
        internal_error) when a sink cannot record it, or fails: nothing is forwarded
        that the audit log does not hold."""
        event = self._event(conn_id, state, d, method, path, opens)
        if not await self.fanout.admit(event):
            raise _unrecorded(d.host, "the audit log could not record this request: refusing it")

    def _sinks_healthy(self) -> bool:
        return self.fanout.healthy

    def _check_sinks(self, host: str) -> None:
        """Refuse early (before a body is read or a tunnel's bytes move) while a sink
        cannot record. Raises _Blocked."""
        if not self._sinks_healthy():
            raise _unrecorded(
                host, "audit sink unavailable: refusing traffic that cannot be recorded"
            )

    def _recordable(self, d: Decision) -> Decision:
        """For the sync hooks that let bytes through on a decision they record (audit
        mode's would_block on a tunnel's first bytes): they cannot wait for the record to
        be written, so at least they refuse while a sink cannot record."""
        if d.allowed and not self._sinks_healthy():
            return Decision(
                False,
                "block",
                "internal_error",
                d.destination,
                d.host,
                d.port,
                hint=UNRECORDED_HINT,
                detail="audit sink unavailable: refusing traffic that cannot be recorded",
            )
        return d

    def _on_http1_refused(self, client: Client, message: str, req: http.Request | None) -> None:
        """http1limit ended a client connection (a head or line over its bound, trailers):
        record it like any malformed request, with the request it was reading, if its
        head had been read."""
        d = Decision(
            False,
            "block",
            "malformed_request",
            None,
            _printable(req.host) if req is not None else "",
            req.port if req is not None else None,
            detail=message,
        )
        self._record(
            client.id,
            self._state(client),
            d,
            method=req.method if req is not None else None,
            path=req.path if req is not None else None,
        )

    def _state(self, client: Client) -> ConnState:
        st = self.conns.get(client.id)
        if st is None:
            st = self.conns[client.id] = ConnState(client=_peer(client), started=time.monotonic())
        return st

    # -- the decision, shared by CONNECT and plain HTTP -------------------------------------

    def _engine(self) -> Engine:
        eng = self.engine
        if eng is None:
            raise RuntimeError("no policy loaded")
        return eng

    def _gate(self, eng: Engine, state: ConnState, headers: http.Headers, host: str) -> None:
        """Client ACL, proxy auth, sink health: refuse before looking at the target."""
        d = eng.check_client(state.client)
        if d is not None:
            raise _Blocked(d._replace(host=host))
        if eng.policy.clients.auth is not None and not self._authorized(headers):
            raise _Blocked(
                Decision(
                    False,
                    "block",
                    "proxy_auth_required",
                    None,
                    host,
                    None,
                    "send Proxy-Authorization: Basic with a user from clients.auth.users_file",
                )
            )
        self._check_sinks(host)

    def _authorized(self, headers: http.Headers) -> bool:
        value = headers.get("proxy-authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "basic" or not token:
            return False
        try:
            user, sep, password = (
                base64.b64decode(token.strip(), validate=True).decode().partition(":")
            )
        except (ValueError, UnicodeDecodeError):
            return False
        expected = self._users.get(user)
        if not sep or expected is None:
            return False
        return _check_password(expected, password)

    async def _authorize(self, eng: Engine, raw_host: str, raw_port: str | int) -> Approval:
        """Decide a target end to end (names, DNS, addresses). Raises _Blocked."""
        approval = await self._decide_target(eng, raw_host, raw_port)
        approval.policy_sha256 = eng.policy.sha256
        return approval

    async def _decide_target(self, eng: Engine, raw_host: str, raw_port: str | int) -> Approval:
        verdict = eng.decide_target(raw_host, raw_port)
        if isinstance(verdict, Decision):
            final = eng.finalize(verdict)
            if not final.allowed:
                raise _Blocked(final)
            # audit mode: let it through, but it still needs checked, pinned addresses
            host, port = normalize_host(raw_host), normalize_port(raw_port)
            if self._parent is not None and eng.static_addresses(host) is None:
                return Approval(final, host, port, None, None, time.monotonic())
            addrs = await self._addresses(eng, host, port)
            refused = eng.check_unlisted_addresses(addrs, host, port)
            if refused is not None:
                raise _Blocked(refused)
            return Approval(final, host, port, addrs[0], None, time.monotonic())
        match: Match = verdict
        if self._parent is not None and eng.static_addresses(match.host) is None:
            # A parent proxy resolves names (air-gapped sites may have no DNS here): the
            # decision is on the name; the parent must do its own address checks.
            d = _allowed_by_name(match)
            return Approval(d, match.host, match.port, None, match.destination, time.monotonic())
        addrs = await self._addresses(eng, match.host, match.port)
        final = eng.finalize(eng.decide_addresses(match, addrs))
        if not final.allowed:
            raise _Blocked(final)
        return Approval(
            final, match.host, match.port, addrs[0], match.destination, time.monotonic()
        )

    async def _addresses(self, eng: Engine, host: Host, port: int) -> tuple[IPAddress, ...]:
        static = eng.static_addresses(host)
        if static is not None:
            return static
        try:
            infos = await resolver.lookup(host.value, port)
        except (OSError, TimeoutError) as e:
            raise _dns_failed(host, port, f"DNS lookup failed: {e or 'timeout'}") from None
        out: list[IPAddress] = []
        for info in infos:
            ip = canonical_ip(ipaddress.ip_address(str(info[4][0]).partition("%")[0]))
            if ip not in out:
                out.append(ip)
        if not out:
            raise _dns_failed(host, port, "DNS returned no addresses")
        return tuple(out)

    # -- hooks ---------------------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        await self._guard_flow(flow, self._on_connect)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.error is not None:
            # mitmproxy already refused this request (it answers 400 itself and forwards
            # nothing); record the refusal rather than deciding on a request that is dead.
            state = self._state(flow.client_conn)
            d = Decision(
                False,
                "block",
                "malformed_request",
                None,
                _safe_host(flow),
                None,
                detail=_printable(flow.error.msg),
            )
            self._record(
                flow.client_conn.id, state, d, method=flow.request.method, path=flow.request.path
            )
            return
        await self._guard_flow(flow, self._on_request)

    async def _guard_flow(
        self, flow: http.HTTPFlow, step: Callable[[http.HTTPFlow, ConnState], Awaitable[None]]
    ) -> None:
        state = self._state(flow.client_conn)
        try:
            await step(flow, state)
        except _Blocked as b:
            self._deny_flow(flow, state, b.decision, b.status)
        except Exception as e:
            log.exception(
                "egress-guard: internal error deciding %s; blocking",
                redact.path(flow.request.pretty_url),
            )
            d = Decision(
                False,
                "block",
                "internal_error",
                None,
                _safe_host(flow),
                None,
                detail=type(e).__name__,
            )
            self._deny_flow(flow, state, d)

    def _policy_files(self) -> tuple[str, ...]:
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

    def _deny_flow(
        self, flow: http.HTTPFlow, state: ConnState, d: Decision, status: int | None = None
    ) -> None:
        connect = flow.request.method == "CONNECT"
        if connect:
            state.blocked = state.blocked or d.reason
        try:
            self._record(
                flow.client_conn.id,
                state,
                d,
                method=flow.request.method,
                path=None if connect else flow.request.path,
            )
        finally:
            # the client is not told where the policy file is (responses.public_text)
            sources = self._policy_files()
            if state.tunnel is not None and not connect:
                # inside an inspected API tunnel: answer in the provider's error format
                flow.response = provider_block_response(d, api_kind(flow.request.path), sources)
            else:
                flow.response = block_response(d, sources)
            if status is not None:
                flow.response.status_code = status
                flow.response.reason = _REASON_PHRASES.get(status, "")
            if not connect:
                # no "100 Continue" for a body that is refused already
                flow.request.headers.pop("expect", None)
                early_answer.mark(flow)

    @staticmethod
    def _raw_target(req: http.Request) -> tuple[str, str | int]:
        """The target as the client wrote it, parsed strictly by our normaliser.

        mitmproxy has already split the authority, leniently (``[name]`` loses its
        brackets, full-width digits and ``0443`` become 443); the raw text is what the strict
        rules of DESIGN section 4 apply to.
        """
        raw = req.authority
        if not raw:
            return req.host, req.port
        default = None if req.method == "CONNECT" else (443 if req.scheme == "https" else 80)
        try:
            host, port = parse_authority(raw, default)
        except NormalizationError as e:
            raise _Blocked(
                Decision(False, "block", "invalid_host", None, _printable(raw), None, detail=str(e))
            ) from None
        return host.value, port

    async def _on_connect(self, flow: http.HTTPFlow, state: ConnState) -> None:
        eng = self._engine()
        req = flow.request
        self._gate(eng, state, req.headers, req.host)
        host, port = self._raw_target(req)
        approval = await self._authorize(eng, host, port)
        self._require_inspection(eng, approval)
        # recorded (written) before anything opens; refused (no close record) if not
        await self._admit(
            flow.client_conn.id, state, approval.decision, method="CONNECT", opens=True
        )
        state.tunnel = (approval.host, approval.port)
        state.tunnel_decision = approval.decision
        state.approved[(approval.host.value, approval.port)] = approval

    @staticmethod
    def _require_inspection(eng: Engine, approval: Approval) -> None:
        """A tunnel to a destination with request rules opens only when it is intercepted
        (raises _Blocked). Audit mode lets it through as would_block: recorded, never
        silent, but its request rules go unchecked."""
        gap = eng.check_inspection(
            approval.destination, bool(ctx.options.egress_guard_inspect), approval.decision
        )
        if gap is None:
            return
        final = eng.finalize(gap)
        if not final.allowed:
            raise _Blocked(final)
        approval.decision = final

    async def _on_request(self, flow: http.HTTPFlow, state: ConnState) -> None:
        eng = self._engine()
        req = flow.request
        if state.tunnel is not None:
            # A request inside an intercepted CONNECT tunnel: the CONNECT target is the
            # authority, and the destination's request rules apply. Each one is recorded
            # before it is forwarded, so an audit outage refuses it like a new CONNECT.
            host, port = state.tunnel
            self._check_sinks(host.value)
            _strip_hop_by_hop(req)  # (Proxy-Authorization too: it is not the origin's)
            dest_name = state.tunnel_decision.destination if state.tunnel_decision else None
            mismatch = self._check_host_header(eng, flow, host, port, dest_name)
            if req.authority and not (req.is_http2 or req.is_http3):
                # an absolute-form request line names the host a server routes by
                mismatch = (
                    self._check_host_header(eng, flow, host, port, dest_name, [req.authority])
                    or mismatch
                )
            approval = state.approved.get((host.value, port))
            if approval is None or state.tunnel_decision is None:
                raise RuntimeError("request in a tunnel without an allowing decision")
            if approval.policy_sha256 != eng.policy.sha256:
                self._redecide_tunnel(eng, state, approval)
            dest = eng.destination(state.tunnel_decision.destination)
            decision = _audited(state.tunnel_decision, mismatch)
            if dest is not None:
                ruled = self._request_rules(eng, flow, dest, approval, decision)
                if ruled is None:
                    return  # recorded once the body (and its model) is in
                decision = ruled
            await self._admit(
                flow.client_conn.id, state, decision, method=req.method, path=req.path
            )
            self._count_http(flow, approval)
            return
        self._gate(eng, state, req.headers, req.host)
        _strip_hop_by_hop(req)  # Proxy-Authorization too, now that _gate has read it
        _check_well_formed(req)
        target_host, target_port = self._raw_target(req)
        approval = await self._authorize(eng, target_host, target_port)
        mismatch = self._check_host_header(
            eng, flow, approval.host, approval.port, approval.decision.destination
        )
        key = (approval.host.value, approval.port)
        known = state.approved.get(key)
        if known is not None and known.policy_sha256 != approval.policy_sha256:
            self._retire(state, key, known)  # decided under an older policy
            known = None
        if known is not None:
            approval = known  # keep-alive: one close record per upstream, bytes added up
        decision = _audited(approval.decision, mismatch)
        dest = approval.destination
        if dest is not None and dest.needs_inspection:
            # Plain HTTP needs no interception: a destination's request rules apply as is.
            flow.metadata[_OPENS_KEY] = known is None
            ruled = self._request_rules(eng, flow, dest, approval, decision)
            if ruled is None:
                return  # approved and recorded once the body (and its model) is in
            decision = ruled
        # Only a request that goes upstream makes an upstream (and its close record), and
        # only once its record is written.
        await self._admit(
            flow.client_conn.id,
            state,
            decision,
            method=req.method,
            path=req.path,
            opens=known is None,
        )
        state.approved[key] = approval
        self._count_http(flow, approval)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(_EVICTED_KEY):
            # its reservation was evicted and its connection closed; should its body have
            # ended meanwhile, it still goes nowhere (recorded at eviction)
            self._release_body(flow)
            if flow.killable:
                flow.kill()
            return
        if _MODEL_CHECK_KEY in flow.metadata and flow.response is None:
            await self._guard_flow(flow, self._on_request_body)
        if flow.response is not None:
            self._release_body(flow)  # refused: the body goes nowhere

    def error(self, flow: http.HTTPFlow) -> None:
        # the stream was reset, the client left mid-body, the upstream failed
        self._release_body(flow)

    def _release_body(self, flow: http.HTTPFlow, *, drop: bool = False) -> None:
        """Give a held body's reservation back; ``drop``: the body has been forwarded, and
        the flow need not keep it (it would live on while the response streams)."""
        flow.metadata.pop(heldprogress.PROGRESS, None)
        key = flow.metadata.pop(_HELD_KEY, None)
        if key is None:
            return
        self.bodies.release(key)
        if drop:
            flow.request.raw_content = b""
        self._return_memory_soon()

    def _return_memory_soon(self) -> None:
        """Once many bytes of held bodies were released, ask the allocator to give the
        memory back, a moment later (mitmproxy drops the flow after the hook)."""
        if self._trim_handle is not None or (self.bodies.released - self._trimmed_at < TRIM_AFTER):
            return

        def trim() -> None:
            self._trim_handle = None
            self._trimmed_at = self.bodies.released
            return_memory()

        self._trim_handle = asyncio.get_running_loop().call_later(1.0, trim)

    async def _on_request_body(self, flow: http.HTTPFlow, state: ConnState) -> None:
        """Inspect mode: the whole request body is here; check the model it asks for."""
        eng = self._engine()
        req = flow.request
        dest = eng.destination(flow.metadata[_MODEL_CHECK_KEY])
        approval = flow.metadata.get(_APPROVAL_KEY)
        decision = flow.metadata.get(_DECISION_KEY)
        if dest is None or decision is None:
            raise RuntimeError("model check without a destination")
        if approval is not None:
            approval.bytes_up += len(req.raw_content or b"")
        try:
            models = requested_models(
                _rule_path(req.path),
                req.raw_content,
                headers=req.headers.keys(),
                query=req.path.partition("?")[2],
                content_type=req.headers.get_all("content-type"),
            )
        except ModelUnknown as e:
            bad: Decision | None = eng.refuse_model(dest, decision, str(e))
        else:
            bad = eng.check_request(dest, req.method, req.path, models, decision)
        if bad is not None:
            final = eng.finalize(bad)
            if not final.allowed:
                raise _Blocked(final)
            decision = final
        opens = flow.metadata.pop(_OPENS_KEY, False)
        await self._admit(
            flow.client_conn.id, state, decision, method=req.method, path=req.path, opens=opens
        )
        if approval is not None and state.tunnel is None:
            state.approved[(approval.host.value, approval.port)] = approval

    def _count_http(self, flow: http.HTTPFlow, approval: Approval | None) -> None:
        """Count an HTTP exchange's bytes (head + body) as they stream through."""
        if approval is None:
            return
        req = flow.request
        approval.bytes_up += _head_size(req.method, req.path, req.headers)
        flow.metadata[_APPROVAL_KEY] = approval

        def up(chunk: bytes) -> bytes:
            approval.bytes_up += len(chunk)
            return chunk

        req.stream = up

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            # the body was forwarded (mitmproxy sends it whole before any answer is read),
            # or the guard's refusal is being answered
            self._release_body(flow, drop=True)
        except Exception:
            log.exception("egress-guard: cannot release a held body")
        approval = flow.metadata.get(_APPROVAL_KEY)
        resp = flow.response
        if approval is None or resp is None:
            return
        try:
            approval.bytes_down += _head_size(str(resp.status_code), resp.reason, resp.headers)

            def down(chunk: bytes) -> bytes:
                approval.bytes_down += len(chunk)
                return chunk

            resp.stream = down
        except Exception:
            log.exception("egress-guard: cannot count response bytes")

    @staticmethod
    def _redecide_tunnel(eng: Engine, state: ConnState, approval: Approval) -> Decision:
        """The policy changed while an intercepted tunnel was open: decide its target
        again, so its requests get the new rules (a renamed destination included) and a
        target or pinned address the new policy refuses gets no more requests. A
        destination that gained request rules needs interception now (inspection_required
        without it). Raises _Blocked; returns the new tunnel decision."""
        verdict = eng.decide_target(approval.host.value, approval.port)
        if isinstance(verdict, Decision):
            final = eng.finalize(verdict)
            if final.allowed and approval.address is not None:
                # audit mode: the pinned address must still pass what no mode lifts
                refused = eng.check_unlisted_addresses(
                    (approval.address,), approval.host, approval.port
                )
                final = refused if refused is not None else final
        elif approval.address is None:  # a parent proxy resolves; decided on the name
            final = _allowed_by_name(verdict)
        else:
            static = eng.static_addresses(verdict.host)
            if static is not None and approval.address not in static:
                # network.resolve now pins the name elsewhere; the open upstream cannot move
                repinned = eng.finalize(
                    Decision(
                        False,
                        "block",
                        "not_allowlisted",
                        verdict.destination.name,
                        verdict.host.value,
                        verdict.port,
                        hint="reconnect: the policy now resolves this name to another address",
                        detail=f"tunnel pinned to {approval.address}, policy resolves {static}",
                    )
                )
                if not repinned.allowed:
                    raise _Blocked(repinned)
            final = eng.finalize(eng.decide_addresses(verdict, (approval.address,)))
        if not isinstance(verdict, Decision):
            gap = eng.check_inspection(
                verdict.destination, bool(ctx.options.egress_guard_inspect), final
            )
            if gap is not None:
                final = eng.finalize(gap)
        if not final.allowed:
            raise _Blocked(final)
        state.tunnel_decision = final
        approval.policy_sha256 = eng.policy.sha256
        return final

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
        the body is kept whole and the ``request`` hook decides and records."""
        req = flow.request
        bad = eng.check_request(
            dest, req.method, req.path, None, decision, upgrade=req.headers.get("upgrade")
        )
        if bad is not None:
            final = eng.finalize(bad)
            if not final.allowed:
                raise _Blocked(final)
            decision = final  # audit mode: recorded as would_block
        if dest.models is not None and api_kind(_rule_path(req.path)) is not None:
            unheld = eng.check_model_body(
                dest,
                decision,
                req.method,
                req.headers.get("content-length"),
                "transfer-encoding" in req.headers,
                ctx.options.egress_guard_max_model_body,
                http1=not (req.is_http2 or req.is_http3),
            )
            if unheld is not None:
                final = eng.finalize(unheld)
                if not final.allowed:
                    raise _Blocked(final)
                return final  # audit mode: would_block, and the body streams unbuffered
            self._hold_body(flow, decision)
            flow.metadata[_MODEL_CHECK_KEY] = dest.name
            flow.metadata[_DECISION_KEY] = decision
            approval.bytes_up += _head_size(req.method, req.path, req.headers)
            flow.metadata[_APPROVAL_KEY] = approval
            return None
        return decision

    def _hold_body(self, flow: http.HTTPFlow, decision: Decision) -> None:
        """Reserve the body's declared length in the held-body budget, or refuse the
        request (503 buffer_budget, in every mode: nothing was checked). Raises _Blocked."""
        length = flow.request.headers.get("content-length", "0")
        size = int(length) if length.isdigit() else 0  # check_model_body refused the rest
        key = (flow.client_conn.id, flow.id)
        client = _peer(flow.client_conn)
        if size > 0 and not self.bodies.fits(client, size):
            self._evict_stalled(client, size)
        why = self.bodies.reserve(key, flow.client_conn.id, client, size, tag=flow)
        if why is not None:
            raise _Blocked(
                decision._replace(
                    allowed=False,
                    action="block",
                    reason="buffer_budget",
                    hint="the guard is holding as many request bodies as it may; retry later",
                    detail=why,
                )
            )
        if size > 0:
            flow.metadata[_HELD_KEY] = key
            flow.metadata[heldprogress.PROGRESS] = self.bodies.get(key)

    def _evict_stalled(self, client: str, size: int) -> None:
        """Before refusing a body for capacity: release the reservations of held bodies
        that are stalled (a head alone, or a trickle: see bodybudget.Held.stalled), close
        their connections and record each. Never raises: what cannot be closed stays
        released and its flow marked, so its body, should it end, is not forwarded."""
        rate = ctx.options.egress_guard_held_body_min_rate
        now = time.monotonic()
        try:
            evicted = self.bodies.evict_stalled(client, size, now, HELD_BODY_GRACE, rate)
        except Exception:
            log.exception("egress-guard: cannot evict stalled held bodies")
            return
        for _, entry in evicted:
            try:
                self._evict(entry, now)
            except Exception:
                log.exception("egress-guard: cannot evict a stalled held body")
        if evicted:
            self._return_memory_soon()

    def _evict(self, entry: Held, now: float) -> None:
        """End one evicted reservation's flow: mark it, record it, close its client."""
        flow = entry.tag
        if not isinstance(flow, http.HTTPFlow):
            raise TypeError(f"held body tagged {type(flow).__name__}")
        flow.metadata.pop(_HELD_KEY, None)
        flow.metadata.pop(heldprogress.PROGRESS, None)
        flow.metadata[_EVICTED_KEY] = True
        client = flow.client_conn
        try:
            req = flow.request
            base = flow.metadata.get(_DECISION_KEY)
            if not isinstance(base, Decision):
                base = Decision(False, "block", "buffer_budget", None, req.host, req.port)
            d = base._replace(
                allowed=False,
                action="block",
                reason="buffer_budget",
                hint="the request body stalled while other requests needed the room it "
                "held; send the body at once",
                detail=(
                    f"held body stalled: {entry.received} of {entry.size} bytes after "
                    f"{now - entry.since:.1f} s; evicted for another request"
                ),
            )
            state = self.conns.get(client.id)
            if state is None:
                state = ConnState(client=_peer(client), started=entry.since)
            self._record(client.id, state, d, method=req.method, path=req.path)
        finally:
            self._close_client(client)

    @staticmethod
    def _close_client(client: Client) -> None:
        """Close a client connection now (mitmproxy's handler for it cancels its reader,
        and the usual disconnect hooks follow)."""
        servers = ctx.master.addons.get("proxyserver")
        handler = servers.connections.get(client.id) if servers is not None else None
        if handler is None:
            log.warning("egress-guard: no connection to close for client %s", client.id)
            return
        handler.close_connection(handler.client)

    @staticmethod
    def _check_host_header(
        eng: Engine,
        flow: http.HTTPFlow,
        host: Host,
        port: int,
        dest: str | None,
        values: list[str] | None = None,
    ) -> Decision | None:
        """The request's Host (or the given authority ``values``) must name host:port,
        and no name the request gives may be denied. Raises _Blocked; returns the
        would_block to record in audit mode, or None."""
        req = flow.request
        also: list[str] = []
        if values is None and (req.is_http2 or req.is_http3):
            hosts = req.headers.get_all("host")
            values = [req.authority] if req.authority else hosts
            also = hosts if req.authority else []  # beside :authority: deny rules only
        elif values is None:
            values = req.headers.get_all("host")
        default = 443 if req.scheme == "https" else 80
        bad = eng.check_host_header(host, port, values, default, dest, also=also)
        if bad is None:
            return None
        final = eng.finalize(bad)
        if not final.allowed:
            raise _Blocked(final)
        return final

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        state = self.conns.get(context.client.id)
        if state is None or state.tunnel is None:
            return
        stream = _tunnel_stream_index(nextlayer)
        if stream is None:
            return
        # Whatever NextLayer built on top of the CONNECT stream is discarded: the guard
        # decides this layer (or "not yet").
        del context.layers[stream + 1 :]
        nextlayer.layer = None
        try:
            # So are the TLS flags its TLS layers set on both connections (TLSLayer
            # marks them): as in mitmproxy's own pass-through, the client is TLS only if
            # it speaks TLS to the proxy itself, and the tunnel's server is not (inspect
            # mode builds its TLS layers again). splice.on_relaying reads the client's flag.
            context.client.tls = any(
                isinstance(x, ClientTLSLayer) and x.conn is context.client
                for x in context.layers[:stream]
            )
            context.server.tls = False
            self._on_tunnel_start(nextlayer, state)
        except Exception:
            log.exception("egress-guard: internal error starting a tunnel; blocking")
            state.blocked = "internal_error"
            host = state.tunnel[0].value
            self._record(
                context.client.id,
                state,
                Decision(False, "block", "internal_error", None, host, None),
            )
            nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused

    def _on_tunnel_start(self, nextlayer: layer.NextLayer, state: ConnState) -> None:
        """Decide how an allowed tunnel's bytes are handled, from its first bytes.

        Runs after mitmproxy's NextLayer addon (see master.py) and replaces its choice:
        until the first bytes can be judged, the layer stays None so nothing is relayed. Where the guard runs before NextLayer (``mitmdump -s``), server_connect
        refuses a tunnel whose first bytes were not judged, which fails closed.
        """
        assert state.tunnel is not None
        context = nextlayer.context
        data = nextlayer.data_client()
        if not data:
            return  # wait for the client to speak
        approval = state.approved.get((state.tunnel[0].value, state.tunnel[1]))
        conn_id = context.client.id
        eng = self._engine()
        if approval is not None and approval.policy_sha256 != eng.policy.sha256:
            # reloaded since the CONNECT: its rules (and whether it is intercepted) are
            # the new policy's
            try:
                redecided = self._redecide_tunnel(eng, state, approval)
            except _Blocked as b:
                self._record(conn_id, state, b.decision)
                state.blocked = b.decision.reason
                nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused
                return
            if redecided.reason == "inspection_required":
                # audit mode: relayed unchecked, but never silently (and its close record
                # says would_block, as one opened that way would)
                noted = self._recordable(redecided)
                self._record(conn_id, state, noted)
                if not noted.allowed:
                    state.blocked = noted.reason
                    nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused
                    return
                approval.decision = redecided
        if data[0] == _TLS_HANDSHAKE:
            problem: str | None = client_hello_shape_problem(data)
            hello: HelloFacts | None = None
            try:
                if not problem:
                    hello = read_plain_client_hello(data) or parse_client_hello(data)
            except ValueError as e:
                hello, problem = None, f"unreadable TLS ClientHello: {e}"
            else:
                if hello is None and problem is None:
                    if len(data) <= MAX_CLIENT_HELLO:
                        return  # ClientHello incomplete: ask again with more data
                    problem = "TLS ClientHello larger than 64 KiB"
                elif hello is not None:
                    problem = sni_problem(hello)
            if problem is not None:
                if not self._tunnel_check(conn_id, state, "sni_mismatch", problem):
                    nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused
                    return
            elif hello is not None:
                state.sni = hello.sni
                if not self._sni_ok(conn_id, state, hello.sni):
                    nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused
                    return
                if self._inspect(state):
                    state.first_bytes_checked = True
                    self._tunnel_accepted(conn_id)
                    nextlayer.layer = tls_layers(context)
                    return  # mitmproxy's TLS layers intercept; requests are checked one by one
        elif data[0] in _TLS_OTHER_RECORDS:
            # TLS, but not starting with a handshake: the ClientHello (and its SNI) would
            # come later, past the point where the guard looks. Refuse.
            problem = f"TLS record of type {data[0]} before any ClientHello"
            if not self._tunnel_check(conn_id, state, "sni_mismatch", problem):
                nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused
                return
        if approval is None or state.blocked:
            nextlayer.layer = TCPLayer(context, ignore=True)  # its connect is refused
            return
        plain = data[0] != _TLS_HANDSHAKE and data[0] not in _TLS_OTHER_RECORDS
        http_start = _http_start(data) if plain else False
        if http_start is None:
            return  # wait for more bytes: a request line may be starting
        state.first_bytes_checked = True
        self._tunnel_accepted(conn_id)
        if plain and (self._inspect(state) or http_start):
            # Plain bytes to a destination with request rules: read them as HTTP (and
            # refuse what is not), so its method, path and model rules apply here too.
            # Plain HTTP in any tunnel (allowed, or let through by audit mode) is read as
            # HTTP too, so the names its requests give (Host, an absolute URI) are checked
            # against the CONNECT target and the deny rules, request by request, as the
            # SNI of a TLS tunnel is: a server behind an allowed address may route by Host.
            nextlayer.layer = HttpLayer(context, HTTPMode.transparent)
            return
        nextlayer.layer = CountingTCPLayer(
            context, approval, splice.on_relaying if splice.installed() else None
        )

    def _tunnel_check(self, conn_id: str, state: ConnState, reason: Reason, detail: str) -> bool:
        """Record a tunnel's unreadable server name (a ClientHello the guard cannot trust,
        TLS records before it); False when it must be refused."""
        assert state.tunnel is not None
        host, port = state.tunnel
        dest = state.tunnel_decision.destination if state.tunnel_decision else None
        eng = self._engine()
        return self._tunnel_verdict(
            conn_id, state, eng.unreadable_name(reason, host, port, dest, detail)
        )

    def _sni_ok(self, conn_id: str, state: ConnState, sni: str | None) -> bool:
        """Check the SNI against the CONNECT target and the deny rules; record and mark
        a block."""
        assert state.tunnel is not None
        host, port = state.tunnel
        dest = state.tunnel_decision.destination if state.tunnel_decision else None
        bad = self._engine().check_sni(host, port, sni, dest)
        return bad is None or self._tunnel_verdict(conn_id, state, bad)

    def _tunnel_verdict(self, conn_id: str, state: ConnState, bad: Decision) -> bool:
        """Record what a tunnel's first bytes showed wrong; False when it is refused.

        The tunnel's own record changes with it, so its close record says what became of
        the connection: ``block`` when refused (see _close_records), ``would_block`` when
        audit mode let it through."""
        assert state.tunnel is not None
        final = self._recordable(self._engine().finalize(bad))
        self._record(conn_id, state, final)
        if not final.allowed:
            state.blocked = final.reason
            return False
        approval = state.approved.get((state.tunnel[0].value, state.tunnel[1]))
        if approval is not None and approval.decision.action == "allow":
            approval.decision = final
        return True

    def _tunnel_accepted(self, conn_id: str) -> None:
        """The tunnel's first bytes passed: sinks that count tunnels once (the metrics)
        may count its CONNECT decision now."""
        self.fanout.tunnel_accepted(conn_id)

    def _inspect(self, state: ConnState) -> bool:
        if not ctx.options.egress_guard_inspect or state.tunnel_decision is None:
            return False
        destination = self._engine().destination(state.tunnel_decision.destination)
        return destination is not None and destination.needs_inspection

    def tls_clienthello(self, data: ClientHelloData) -> None:
        client = data.context.client
        state = self._state(client)
        try:
            self._on_clienthello(data, state)
        except Exception:
            log.exception("egress-guard: internal error in tls_clienthello; blocking")
            state.blocked = "internal_error"
            data.ignore_connection = True
            host = state.tunnel[0].value if state.tunnel else ""
            self._record(
                client.id, state, Decision(False, "block", "internal_error", None, host, None)
            )

    def _on_clienthello(self, data: ClientHelloData, state: ConnState) -> None:
        """Reached when the tunnel fast path left TLS to mitmproxy (inspect mode)."""
        if state.tunnel is None:
            return  # TLS to the proxy itself; the requests inside are decided one by one
        state.sni = data.client_hello.sni
        problem = sni_problem(data.client_hello)
        if problem is not None:
            ok = self._tunnel_check(data.context.client.id, state, "sni_mismatch", problem)
        else:
            ok = self._sni_ok(data.context.client.id, state, state.sni)
        if not ok:
            data.ignore_connection = True  # and server_connect refuses it
            return
        if not state.first_bytes_checked:
            self._tunnel_accepted(data.context.client.id)
        state.first_bytes_checked = True
        data.ignore_connection = not self._inspect(state)
        if data.ignore_connection:
            # passed through raw: no TLS of ours towards the server (as in next_layer);
            # the flag would otherwise say a handshake is coming that never does
            data.context.server.tls = False

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        try:
            self._on_server_connect(data)
        except Exception as e:
            log.exception("egress-guard: internal error in server_connect; refusing")
            data.server.error = f"egress-guard: internal error ({type(e).__name__})"

    def _on_server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        state = self.conns.get(data.client.id)
        if state is None or state.blocked:
            data.server.error = (
                f"egress-guard: blocked ({state.blocked if state else 'no decision'})"
            )
            return
        if data.server.address is None:
            data.server.error = "egress-guard: no destination"
            return
        raw_host, raw_port = data.server.address[0], data.server.address[1]
        try:
            key = (normalize_host(str(raw_host)).value, normalize_port(int(raw_port)))
        except NormalizationError:
            key = ("", 0)
        approval = state.approved.get(key)
        if state.tunnel is not None and not state.first_bytes_checked:
            log.error(
                "egress-guard: refusing %s:%s, the tunnel's first bytes were not checked",
                raw_host,
                raw_port,
            )
            data.server.error = "egress-guard: tunnel not checked"
            return
        if approval is None and key == self._parent and state.approved:
            return  # the parent proxy: it is sent only targets decided on this connection
        if approval is None:
            log.error(
                "egress-guard: refusing %s:%s, no allowing decision on this connection",
                raw_host,
                raw_port,
            )
            data.server.error = "egress-guard: no allowing decision for this destination"
            return
        if data.server.via is not None or approval.address is None:
            return  # a parent proxy resolves and connects; we decided on the name
        if data.server.sni is None and approval.host.kind == "name":
            data.server.sni = approval.host.value
        # Connect to the checked address; server_connected puts the name back.
        requested = data.server.address
        state.pinned[data.server.id] = (requested, key)
        data.server.address = (str(approval.address), approval.port)
        # mitmproxy's connection cap, counted as mitmproxy would: per spelling requested
        # (it reuses a connection only for the same spelling), and afresh after a reload
        # retired this connection's upstreams (they stay open, holding their slots)
        connlimit.pinned((requested, len(state.retired)), data.server.address)

    @staticmethod
    def _retire(state: ConnState, key: tuple[str, int], old: Approval) -> None:
        """Stop reusing an upstream connection decided under an older policy.

        The new policy may pin the name elsewhere, or forbid the old address: the open
        connection is named by its address again (mitmproxy will not match it to the name
        any more) and the next request gets a connection of its own, checked anew.
        """
        del state.approved[key]
        state.retired.append(old)
        server = old.server
        if server is not None and server.peername is not None and server.via is None:
            object.__setattr__(server, "address", tuple(server.peername[:2]))

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Give a pinned connection its name back, so keep-alive requests reuse it.

        mitmproxy reuses an upstream connection only when its address equals the next
        request's (name, port). Left at the checked IP, every request would open a new
        upstream socket while the old ones stay open until the client leaves (one client
        socket holding hundreds of upstream sockets). Reuse is safe: each request is still
        decided, and the socket goes to the address checked for that name on this client
        connection.
        """
        try:
            state = self.conns.get(data.client.id)
            pinned = state.pinned.pop(data.server.id, None) if state is not None else None
            if state is not None and pinned is not None:
                name, key = pinned
                # Server.__setattr__ refuses address changes on an open connection (they
                # would not reconnect). This one names the peer it is connected to; the
                # socket's own address stays in server.peername.
                object.__setattr__(data.server, "address", name)
                approval = state.approved.get(key)
                if approval is not None:
                    approval.server = data.server
        except Exception:
            log.exception("egress-guard: cannot restore a pinned connection's name")

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        state = self.conns.get(data.client.id)
        if state is not None:
            state.pinned.pop(data.server.id, None)

    def client_disconnected(self, client: Client) -> None:
        splice.unregister(client.id)
        if self.bodies.release_connection(client.id):  # streams that ended without a hook
            self._return_memory_soon()
        self._close_records(client.id)

    def _close_records(self, client_id: str, error: str | None = None) -> None:
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


_REASON_PHRASES = {UNRECORDED_STATUS: "Service Unavailable"}
_APPROVAL_KEY = "egress_guard_approval"
_MODEL_CHECK_KEY = "egress_guard_model_check"
#: the decision a deferred model check starts from (and records when the model is fine)
_DECISION_KEY = "egress_guard_decision"
#: plain HTTP with a deferred model check: whether this request opens the upstream
_OPENS_KEY = "egress_guard_opens"
#: the key of this request's reservation in the held-body budget
_HELD_KEY = "egress_guard_held"
#: this request's reservation was evicted (stalled); its connection is being closed
_EVICTED_KEY = "egress_guard_evicted"


def _audited(decision: Decision, mismatch: Decision | None) -> Decision:
    """The decision to record for a request audit mode let through despite a name
    mismatch: the would_block, unless the target's own decision is one already."""
    if mismatch is None or decision.action != "allow":
        return decision
    return mismatch


def _allowed_by_name(match: Match) -> Decision:
    """Allow decided on the name alone: a parent proxy resolves it and checks addresses."""
    d = match.destination
    return Decision(True, "allow", "allowlisted", d.name, match.host.value, match.port)


def _rule_path(raw: str) -> str:
    """The path the rules were checked on (the raw one when it was refused as ambiguous,
    which only audit mode lets through)."""
    try:
        return canonical_path(raw)
    except AmbiguousPath:
        return raw


def _head_size(first: str, second: str, headers: http.Headers) -> int:
    """Bytes of an HTTP/1 message head as relayed: start line, headers, blank line."""
    size = len(first) + len(second) + 13  # " ", " HTTP/1.1", CRLF
    for k, v in headers.fields:
        size += len(k) + len(v) + 4
    return size + 2


def _tunnel_stream_index(nextlayer: layer.NextLayer) -> int | None:
    """Where in the layer stack the CONNECT stream sits whose tunnel this NextLayer opens,
    or None when this NextLayer is not directly beneath an accepted CONNECT."""
    layers = nextlayer.context.layers
    for i in range(len(layers) - 1, -1, -1):
        candidate = layers[i]
        if isinstance(candidate, HttpStream):
            if candidate.flow.request.method == "CONNECT" and candidate.child_layer is nextlayer:
                return i
            return None
    return None


def replace_engine(engine: Engine, self_endpoints: frozenset[tuple[str, int]]) -> Engine:
    return Engine(engine.policy, engine.catalog, self_endpoints)


_HTTP1_VERSIONS = frozenset({"HTTP/1.0", "HTTP/1.1"})

#: an HTTP/1 request line's method (a token) and the space after it
_REQUEST_START = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ ")
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
#: what a lenient server takes for blanks in a request line: Python's http.server splits
#: it with str.split() (tabs, \x0b, \x0c, \x1c-\x1f, and \x85, \xa0 in Latin-1), and
#: skips blanks (line ends included) before it
_LENIENT_BLANKS = re.compile(rb"[ \t\x0b\x0c\x1c-\x1f\x85\xa0]")
_LENIENT_START = re.compile(rb"[ \t\r\n\x0b\x0c\x1c-\x1f\x85\xa0]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: bytes a text request line may hold (no other control characters): while the first
#: bytes are all such, without a line end, they may still become a request line
_TEXT = (frozenset(range(0x20, 0x100)) - {0x7F}) | frozenset(b"\t\x0b\x0c\x1c\x1d\x1e\x1f")
#: how many bytes of text may go by without a line end before they are read as HTTP
#: anyway (and refused, if they are not): a lenient server reads lines this long
_MAX_LINE = 64 * 1024


def _http_start(data: bytes) -> bool | None:
    """Whether a tunnel's first bytes start an HTTP/1 request as some server reads it;
    None while they could still become one. Empty lines first count as HTTP: a server
    skips them before a request line. Lenient readings count too: a method followed by
    another blank than a space, blanks before it, or any line naming an HTTP version (the
    guard's own reading then refuses what it cannot read strictly)."""
    if data[:1] in (b"\r", b"\n") or _REQUEST_START.match(data):
        return True
    line, newline, _ = data.partition(b"\n")
    start = _LENIENT_START.match(line)
    if start is not None and _LENIENT_BLANKS.match(line, start.end()):
        return True  # a method, then a blank of another kind
    if b"HTTP/" in line.upper():
        return True
    if not newline and all(b in _TEXT for b in data):
        return None if len(data) < _MAX_LINE else True
    return False


#: The first byte of a tunnel decides how the guard reads it: a TLS handshake record
#: must be a readable ClientHello; other TLS record types first are refused (they would
#: push the ClientHello past the guard's look); anything else is relayed as bytes to the
#: checked address.
_TLS_HANDSHAKE = 0x16
_TLS_OTHER_RECORDS = frozenset({0x14, 0x15, 0x17})  # change_cipher_spec, alert, application_data


#: connection options a forwarded Connection header keeps: mitmproxy reads them from this
#: very request to manage both connections, and an upgrade (WebSocket) needs its pair
_KEPT_CONNECTION_OPTIONS = ("close", "keep-alive", "upgrade")
#: never removed because a client listed it in Connection: the message's target and
#: framing (removing Content-Length from a streamed body would desynchronise the upstream)
_NOT_HOP_BY_HOP = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade"}
)
#: for this proxy or this connection only, listed in Connection or not (RFC 9110 7.6.1;
#: Proxy-Authorization carries the client's credentials for the guard)
_HOP_BY_HOP = ("proxy-connection", "proxy-authorization", "keep-alive")


def _strip_hop_by_hop(req: http.Request) -> None:
    """Remove what a proxy must not forward: the headers named in Connection, the
    well-known hop-by-hop ones, TE (but ``TE: trailers`` on HTTP/2 and 3, where it is the
    only value allowed), and an Upgrade that Connection does not announce. Connection
    itself keeps only close, keep-alive and upgrade."""
    headers = req.headers
    options: list[str] = []
    for value in headers.get_all("connection"):
        for token in value.split(","):
            token = token.strip().lower()
            if token and token not in options:
                options.append(token)
    for name in [*_HOP_BY_HOP, *(o for o in options if o not in _NOT_HOP_BY_HOP)]:
        if name in headers:
            del headers[name]
    te = headers.get_all("te")
    if te and not (
        (req.is_http2 or req.is_http3) and all(v.strip().lower() == "trailers" for v in te)
    ):
        del headers["te"]
    if "upgrade" not in options and "upgrade" in headers:
        del headers["upgrade"]
    kept = [o for o in options if o in _KEPT_CONNECTION_OPTIONS]
    if kept:
        headers["connection"] = ", ".join(kept)
    elif "connection" in headers:
        del headers["connection"]


def _check_well_formed(req: http.Request) -> None:
    """Refuse request shapes a proxy should never forward (smuggling hygiene)."""
    problem = None
    if req.http_version not in _HTTP1_VERSIONS and not (req.is_http2 or req.is_http3):
        problem = f"unsupported HTTP version {_printable(req.http_version)!r}"
    else:
        for name, value in req.headers.fields:
            if any(c in b"\x00\r\n" for c in name + value):
                problem = f"control character in header {_printable(name.decode('latin-1'))!r}"
                break
    if problem is not None:
        raise _Blocked(
            Decision(
                False,
                "block",
                "malformed_request",
                None,
                _printable(req.host),
                None,
                detail=problem,
            )
        )


def _load(path: str, mode: str) -> EffectivePolicy:
    """The policy file (or the built-in minimal preset), with the --mode override applied."""
    policy = load_policy(path) if path else load_preset("minimal")
    return replace(policy, mode=mode) if mode else policy


def _dns_failed(host: Host, port: int, detail: str) -> _Blocked:
    """A name that does not resolve: not a policy block, but nothing can be sent (502)."""
    return _Blocked(Decision(False, "block", "dns_failed", None, host.value, port, detail=detail))


def _parent_proxy(modes: Sequence[str]) -> tuple[str, int] | None:
    for spec in modes:
        mode = mode_specs.ProxyMode.parse(spec)
        if isinstance(mode, mode_specs.UpstreamMode):
            host, port = mode.address
            return normalize_host(str(host)).value, int(port)
    return None


def _safe_host(flow: http.HTTPFlow) -> str:
    try:
        return str(flow.request.host)[:200]
    except Exception:
        return ""


def _stamp(path: str) -> tuple[Any, ...] | None:
    if not path:
        return None
    try:
        st = os.stat(path)
        return (os.path.realpath(path), st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)
    except OSError as e:
        return ("missing", e.errno)


def _local_addresses() -> set[str]:
    out = {"127.0.0.1", "::1", "0.0.0.0", "::"}
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            out.add(str(canonical_ip(ipaddress.ip_address(str(info[4][0]).partition("%")[0]))))
    return out


def _read_users(policy: EffectivePolicy) -> dict[str, str]:
    """``user:password`` or ``user:sha256:<hex>`` per line; # comments."""
    if policy.clients.auth is None:
        return {}
    path = Path(policy.clients.auth.users_file)
    if not path.is_absolute():
        path = Path(policy.source).parent / path
    users: dict[str, str] = {}
    # never blocks (a FIFO or device there is refused): it runs under the reload lock
    raw = read_regular_file(path, "users_file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(str(path), None, "users_file is not valid UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, secret = line.partition(":")
        if not sep or not user or not secret:
            raise PolicyError(str(path), n, "expected user:password or user:sha256:<hex>")
        users[user] = secret
    return users


def _check_password(expected: str, given: str) -> bool:
    if expected.startswith("sha256:"):
        digest = hashlib.sha256(given.encode()).hexdigest()
        return hmac.compare_digest(expected[7:].lower(), digest)
    return hmac.compare_digest(expected.encode(), given.encode())
