"""Per-connection state the addon keeps between hooks.

Kept out of addon.py on purpose: ``mitmdump -s`` executes addon.py without registering
it in ``sys.modules``, and dataclasses defined in such a module fail to build.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mitmproxy.connection import Server

from egress_guard.engine import Decision
from egress_guard.normalize import Host, IPAddress
from egress_guard.policy.model import Destination


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
    #: the tunnel's first bytes were read and judged (ClientHello and SNI, or not TLS);
    #: until then server_connect refuses the tunnel's upstream
    first_bytes_checked: bool = False
    #: server connection id -> (the (name, port) it was asked for, its approval's key),
    #: while it connects to the checked address (see EgressGuard.server_connected)
    pinned: dict[str, tuple[tuple[str, int], tuple[str, int]]] = field(default_factory=dict)
    #: approvals replaced after a policy reload; their close records are still owed
    retired: list[Approval] = field(default_factory=list)
