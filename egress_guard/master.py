"""The embedded mitmproxy: a Master with only the addons the guard needs.

mitmdump loads some thirty addons (flow storage, replay, mapping, the dumper...) and
calls every one of them on every event. The guard needs the proxy server, layer
selection, TLS settings (for inspect mode and https:// upstreams) and itself; measured on
the reference machine that is about 1.45x the tunnel rate of a full mitmdump.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

from mitmproxy import exceptions, options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig, upstream_auth
from mitmproxy.master import Master

from egress_guard import splice
from egress_guard.addon import EgressGuard
from egress_guard.events import Sink
from egress_guard.metrics import Metrics, start_http_server

log = logging.getLogger("egress_guard")


def build_master(args: argparse.Namespace, sinks: list[Sink]) -> tuple[Master, EgressGuard]:
    """Must run inside an event loop (mitmproxy's Master takes the running loop)."""
    splice.install()
    opts = options.Options()
    master = Master(opts, with_termlog=False)
    guard = EgressGuard(sinks)
    # The guard comes after NextLayer: its tunnel fast path has the last word on a tunnel's
    # layer (including "not yet": it resets NextLayer's choice while it waits for data).
    master.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        guard,
        tlsconfig.TlsConfig(),
        upstream_auth.UpstreamAuth(),
        errorcheck.ErrorCheck(repeat_errors_on_stderr=True),
    )
    host, port = args.listen
    mode = ["regular"]
    if args.upstream_proxy:
        mode = [f"upstream:{args.upstream_proxy}"]
    updates: dict[str, Any] = {
        "listen_host": host,
        "listen_port": port,
        "mode": mode,
        "connection_strategy": "lazy",
        "confdir": args.confdir,
        "egress_guard_policy": os.path.abspath(args.policy) if args.policy else "",
        "egress_guard_mode": args.mode or "",
        "egress_guard_inspect": bool(args.inspect),
        # HTTP/2 and HTTP/3 towards the client only matter when intercepting.
        "http2": bool(args.inspect),
        "http3": False,
        # No raw-TCP fallback: inside an intercepted tunnel, bytes that do not look like
        # HTTP must be parsed as HTTP (and refused), never relayed unchecked. Tunnels that
        # are not intercepted are relayed by the guard's own counting layer.
        "rawtcp": False,
        "tcp_timeout": args.idle_timeout,
    }
    if args.upstream_ca:
        updates["ssl_verify_upstream_trusted_ca"] = os.path.abspath(args.upstream_ca)
    master.options.update(**updates)
    return master, guard


async def serve(args: argparse.Namespace, sinks: list[Sink]) -> int:
    try:
        master, _guard = build_master(args, sinks)
    except exceptions.OptionsError as e:
        print(f"egress-guard: {e}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if draining:  # a second signal: stop now
            master.shutdown()
        else:
            draining.append(loop.create_task(drain_then_stop(master)))

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, on_signal)  # fails off the main thread
    server = None
    if args.metrics is not None:
        metrics = next(s for s in sinks if isinstance(s, Metrics))
        mhost, mport = args.metrics
        server = start_http_server(
            metrics, mhost, mport, health=lambda: all(s.healthy for s in sinks)
        )
        log.info("egress-guard metrics on http://%s/metrics", _hostport(mhost, server.port))
    host, port = args.listen
    log.info("egress-guard listening on %s", _hostport(host, port))
    try:
        await master.run()
    finally:
        if server is not None:
            server.stop()
    return 0


DRAIN_TIMEOUT_S = 10.0


async def drain_then_stop(master: Master, timeout: float = DRAIN_TIMEOUT_S) -> None:
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
    finally:
        master.shutdown()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
