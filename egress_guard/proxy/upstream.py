"""The choke point: the Upstream addon (``server_connect``, ``server_connected``,
``server_connect_error``).

mitmproxy calls ``server_connect`` before every upstream connection. It refuses any
connection for which no allowing decision was recorded on this client connection (and
a tunnel whose first bytes were not judged), and rewrites the address to the one the
engine checked: DNS is resolved once, by the guard, never again by mitmproxy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mitmproxy import ctx
from mitmproxy.proxy import mode_specs, server_hooks

from egress_guard.normalize import NormalizationError, normalize_host, normalize_port
from egress_guard.proxy.patches import connlimit
from egress_guard.proxy.state import Approval, ConnState, GuardState

log = logging.getLogger("egress_guard")


class Upstream:
    """mitmproxy addon: refuses undecided upstream connections, pins checked ones."""

    #: unique among mitmproxy addons (its default is the lower-cased class name, which
    #: another script's addon could take, and a clash refuses the whole guard)
    name = "egress_guard_upstream"

    def __init__(self, guard: GuardState) -> None:
        self.g = guard

    def configure(self, updated: set[str]) -> None:
        if "mode" in updated:
            self.g.parent = _parent_proxy(ctx.options.mode)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        try:
            self._on_server_connect(data)
        except Exception as e:
            log.exception("egress-guard: internal error in server_connect; refusing")
            data.server.error = f"egress-guard: internal error ({type(e).__name__})"

    def _on_server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        state = self.g.conns.get(data.client.id)
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
        if approval is None and key == self.g.parent and state.approved:
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
            state = self.g.conns.get(data.client.id)
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
        state = self.g.conns.get(data.client.id)
        if state is not None:
            state.pinned.pop(data.server.id, None)


def retire(state: ConnState, key: tuple[str, int], old: Approval) -> None:
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


def _parent_proxy(modes: Sequence[str]) -> tuple[str, int] | None:
    for spec in modes:
        mode = mode_specs.ProxyMode.parse(spec)
        if isinstance(mode, mode_specs.UpstreamMode):
            host, port = mode.address
            return normalize_host(str(host)).value, int(port)
    return None
