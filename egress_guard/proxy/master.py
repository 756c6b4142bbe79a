"""The embedded mitmproxy: a Master with only the addons the guard needs.

mitmdump loads some thirty addons (flow storage, replay, mapping, the dumper...) and
calls every one of them on every event. The guard needs the proxy server, layer
selection, TLS settings (for inspect mode and https:// upstreams) and itself; measured on
the reference machine that is about 1.45x the tunnel rate of a full mitmdump.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import signal
import sys
import types
from collections.abc import Callable, Coroutine
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks, http, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig, upstream_auth
from mitmproxy.master import Master
from mitmproxy.utils import asyncio_utils

from egress_guard.normalize import join_hostport
from egress_guard.proxy.castore import InterceptionCA, ensure_ca
from egress_guard.proxy.guard import guard_addons
from egress_guard.proxy.patches import splice
from egress_guard.proxy.settings import RunSettings
from egress_guard.proxy.state import GuardState
from egress_guard.sinks.audit import AuditLog
from egress_guard.sinks.events import Sink
from egress_guard.sinks.logsafe import SafeFormatter, escape
from egress_guard.sinks.metrics import Metrics
from egress_guard.sinks.metrics_http import start_http_server
from egress_guard.sinks.status import StatusBoard

log = logging.getLogger("egress_guard")


class HookTable(addonmanager.AddonManager):
    """mitmproxy's AddonManager, with each hook's implementers looked up once.

    The stock manager walks every addon (and its children) with ``getattr`` on every
    event, and after every flow event fires an ``update`` hook that none of the guard's
    addons implements: about nine hooks per tunnel, each a walk over the chain. Here the
    walk happens once per hook name and again only when addons are added or removed
    (the embedded master's addon set is fixed after start-up). Order, the per-addon
    error isolation (``safecall``) and ``AddonHalt`` behave as in the stock manager.
    """

    def __init__(self, master: Master) -> None:
        super().__init__(master)
        #: hook name -> for each top-level addon implementing it, its callables
        self._table: dict[str, list[list[Callable[..., Any]]]] = {}

    def _implementers(self, name: str) -> list[list[Callable[..., Any]]]:
        groups = self._table.get(name)
        if groups is None:
            groups = []
            for top in self.chain:
                funcs = []
                for a in addonmanager.traverse([top]):
                    func = getattr(a, name, None)
                    if not func or isinstance(func, types.ModuleType):
                        continue  # (a module imported under a hook's name is no hook)
                    if not callable(func):
                        raise exceptions.AddonManagerError(
                            f"Addon handler {name} ({a}) not callable"
                        )
                    funcs.append(func)
                if funcs:
                    groups.append(funcs)
            self._table[name] = groups
        return groups

    # Whatever changes the chain (or, through register, an addon's children) forgets the
    # table afterwards; it is rebuilt at the next event.

    def register(self, addon: Any) -> Any:
        try:
            return super().register(addon)
        finally:
            self._table.clear()

    def add(self, *addons: Any) -> None:
        try:
            super().add(*addons)
        finally:
            self._table.clear()

    def remove(self, addon: Any) -> None:
        try:
            super().remove(addon)
        finally:
            self._table.clear()

    def clear(self) -> None:
        try:
            super().clear()
        finally:
            self._table.clear()

    async def trigger_event(self, event: hooks.Hook) -> None:
        args = event.args()
        for funcs in self._implementers(event.name):
            try:
                with addonmanager.safecall():
                    for func in funcs:
                        res = func(*args)
                        if res is not None and inspect.isawaitable(res):
                            await res
            except exceptions.AddonHalt:
                return

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        if self._implementers("update"):  # none of the guard's addons: args() not rebuilt
            message = event.args()[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))


def _no_message_typecheck() -> None:
    """Drop mitmproxy's per-message field type check.

    ``http.MessageData.__post_init__`` exists only ``if __debug__``: a developer check
    that an addon built a message from the right types, run on every request and
    response (for a tunnel: the CONNECT and its answer). The guard builds no message
    from untyped data, and mitmproxy's parsers produce typed fields, so the embedded
    master skips it; everything else that ``-O`` would remove (asserts) stays.
    """
    if "__post_init__" in http.MessageData.__dict__:
        http.MessageData.__post_init__ = lambda self: None  # type: ignore[method-assign]


def _eager_task_factory(
    loop: asyncio.AbstractEventLoop,
    coro: Any,
    *,
    eager_start: bool | None = None,
    **kwargs: Any,
) -> asyncio.Task[Any]:
    """``asyncio.eager_task_factory`` that also takes the ``eager_start`` keyword.

    uvloop on Python 3.13 passes ``eager_start`` to the task factory; CPython's own
    eager factory accepts it only from 3.14, so with mitmproxy's factory every task
    creation raised TypeError there and the proxy could not start.
    """
    eager = True if eager_start is None else eager_start
    return asyncio.Task(coro, loop=loop, eager_start=eager, **kwargs)


@contextlib.contextmanager
def _set_eager_task_factory() -> Any:
    """Stands in for mitmproxy's ``asyncio_utils.set_eager_task_factory``."""
    loop = asyncio.get_running_loop()
    existing = loop.get_task_factory()
    loop.set_task_factory(_eager_task_factory)
    try:
        yield
    finally:
        loop.set_task_factory(existing)


def _tune_gc() -> None:
    """Freeze what start-up allocated (policy, catalog, public-suffix list, mitmproxy's
    modules) out of the collector's way, and collect the young generation less often:
    each tunnel allocates a few thousand objects, so the default threshold (700) runs a
    collection several times per tunnel."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)


def _embedded_master(opts: options.Options) -> Master:
    _no_message_typecheck()
    asyncio_utils.set_eager_task_factory = _set_eager_task_factory
    master = Master(opts, with_termlog=False)
    stock = master.addons
    opts.changed.disconnect(stock._configure_all)
    master.addons = HookTable(master)
    return master


def build_master(settings: RunSettings, sinks: list[Sink]) -> tuple[Master, GuardState]:
    """Must run inside an event loop (mitmproxy's Master takes the running loop)."""
    splice.install()
    opts = options.Options()
    master = _embedded_master(opts)
    guard, addons = guard_addons(sinks, transparent=settings.transparent)
    for sink in sinks:
        if isinstance(sink, Metrics):
            sink.track_held_bodies(guard.bodies)
    check = errorcheck.ErrorCheck(repeat_errors_on_stderr=True)
    # it repeats start-up errors on stderr with a handler of its own: escaped as well
    check.logger.setFormatter(SafeFormatter())
    # The guard comes after NextLayer: its tunnel fast path has the last word on a tunnel's
    # layer (including "not yet": it resets NextLayer's choice while it waits for data).
    # The same addons, in the same order, as mitmdump gets from egress_guard/addon.py.
    master.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        *addons,
        tlsconfig.TlsConfig(),
        upstream_auth.UpstreamAuth(),
        check,
    )
    host, port = settings.listen
    mode = ["regular"]
    if settings.upstream_proxy:
        mode = [f"upstream:{settings.upstream_proxy}"]
    elif settings.transparent:
        mode = ["transparent"]  # (run refuses it with --upstream-proxy)
    updates: dict[str, Any] = {
        "listen_host": host,
        "listen_port": port,
        "mode": mode,
        "connection_strategy": "lazy",
        "confdir": settings.confdir,
        "egress_guard_policy": os.path.abspath(settings.policy) if settings.policy else "",
        "egress_guard_mode": settings.mode or "",
        "egress_guard_inspect": settings.inspect,
        "egress_guard_max_model_body": settings.max_model_body,
        "egress_guard_max_held_bodies": settings.max_held_bodies,
        "egress_guard_held_body_min_rate": settings.held_body_min_rate,
        # HTTP/2 and HTTP/3 towards the client only matter when intercepting.
        "http2": settings.inspect,
        "http3": False,
        # No raw-TCP fallback: inside an intercepted tunnel, bytes that do not look like
        # HTTP must be parsed as HTTP (and refused), never relayed unchecked. Tunnels that
        # are not intercepted are relayed by the guard's own counting layer.
        "rawtcp": False,
        "tcp_timeout": settings.idle_timeout,
    }
    # --upstream-ca adds to the public roots, --upstream-ca-only replaces them: either
    # way a bundle written by run.py (egress_guard/proxy/upstream_trust.py)
    if settings.upstream_ca_bundle:
        updates["ssl_verify_upstream_trusted_ca"] = os.path.abspath(settings.upstream_ca_bundle)
    master.options.update(**updates)
    return master, guard


def _status_board(sinks: list[Sink]) -> StatusBoard:
    """The status page's sink, reading the audit log's health when there is one. It goes
    last: ``admit`` stops at the first sink that cannot record, so the page shows an
    admitted decision only once the audit log holds it."""
    audit = next((s for s in sinks if isinstance(s, AuditLog)), None)
    return StatusBoard(audit=audit)


#: run beside the proxy (``egress-guard sandbox``): given the guard's state and a way to
#: stop the proxy; it runs until the proxy stops (then it is cancelled)
Companion = Callable[[GuardState, Callable[[], None]], Coroutine[Any, Any, None]]


async def serve(
    settings: RunSettings, sinks: list[Sink], companion: Companion | None = None
) -> int:
    board = None
    if settings.metrics is not None:  # the status page is served on the metrics listener
        board = _status_board(sinks)
        sinks = [*sinks, board]
    try:
        # before mitmproxy looks at the confdir: a CA it lacks is made named for egress-guard
        ca = ensure_ca(settings.confdir)
    except OSError as e:
        print(
            f"egress-guard: the interception CA in {escape(settings.confdir)}: {escape(str(e))}",
            file=sys.stderr,
        )
        return 2
    try:
        master, guard = build_master(settings, sinks)
    except exceptions.OptionsError as e:
        # a policy error's render: several lines on purpose, nothing raw in them
        print(f"egress-guard: {escape(str(e), keep_newlines=True)}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if draining:  # a second signal: stop now
            master.shutdown()
        else:
            draining.append(loop.create_task(drain_then_stop(master, settings.drain_timeout)))

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, on_signal)  # fails off the main thread
    server = None
    if settings.metrics is not None:
        metrics = next(s for s in sinks if isinstance(s, Metrics))
        mhost, mport = settings.metrics
        try:
            server = start_http_server(
                metrics, mhost, mport, health=lambda: all(s.healthy for s in sinks), status=board
            )
        except OSError as e:  # taken since run's check: one line, no traceback
            where = join_hostport(mhost, mport)
            print(
                f"egress-guard: --metrics {where}: cannot listen: {e.strerror or e}",
                file=sys.stderr,
            )
            return 2
        # the agent must not read the page (or /metrics) through the proxy: it is the
        # guard's own address, whatever the policy allows (set before master.run, whose
        # ``running`` hook builds the engine's self endpoints)
        guard.other_listeners.append((server.host, server.port))
        base = f"http://{join_hostport(mhost, server.port)}"
        log.info("egress-guard metrics on %s/metrics, status page on %s/", base, base)
    host, port = settings.listen
    log.info(
        "egress-guard listening on %s%s",
        join_hostport(host, port),
        " (transparent: redirected connections, no CONNECT)" if settings.transparent else "",
    )
    if settings.inspect:
        _log_inspection(guard, ca)
    _tune_gc()
    beside: asyncio.Task[None] | None = None
    if companion is not None:
        beside = loop.create_task(companion(guard, master.shutdown))
        beside.add_done_callback(lambda _t: master.shutdown())
    try:
        await master.run()
    finally:
        if beside is not None and not beside.done():
            beside.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beside
        if server is not None:
            server.stop()
    return 0


def _log_inspection(guard: GuardState, ca: InterceptionCA) -> None:
    """Say at start-up what --inspect intercepts, and with which CA: the file clients
    must trust, and its fingerprint to compare with what they were given."""
    eng = guard.engine
    names = [d.name for d in eng.policy.destinations if d.needs_inspection] if eng else []
    log.info(
        "egress-guard: --inspect: TLS tunnels (CONNECT) to %s are intercepted, to check "
        "their methods/paths/models rules; tunnels to other destinations stay plain",
        ", ".join(names) if names else "no destination (none has methods, paths or models)",
    )
    log.info(
        "egress-guard: interception CA %s (CN=%s, SHA-256 %s%s); clients must trust it "
        "(egress-guard ca export, then NODE_EXTRA_CA_CERTS)",
        ca.cert_path,
        ca.common_name,
        ca.sha256,
        ", made now" if ca.created else "",
    )
    if ca.is_mitmproxy_default:
        log.warning(
            "egress-guard: this CA was made by mitmproxy (CN=mitmproxy); for one named "
            "egress-guard, move the confdir's mitmproxy-ca* files away and restart "
            "(clients must then trust the new CA)"
        )


async def drain_then_stop(master: Master, timeout: float) -> None:
    """Graceful stop: stop accepting, let open connections finish (up to ``timeout``),
    then shut down; the guard writes close records for whatever is still open."""
    ps = master.addons.get("proxyserver")
    try:
        if ps is not None:
            await ps.servers.update([])  # close the listening sockets only
            log.info("egress-guard: stopping; draining %d open connection(s)", len(ps.connections))
            deadline = asyncio.get_running_loop().time() + timeout
            while ps.connections and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            if ps.connections:
                log.info(
                    "egress-guard: %d connection(s) still open after the %g s drain; closing them",
                    len(ps.connections),
                    timeout,
                )
    finally:
        master.shutdown()
