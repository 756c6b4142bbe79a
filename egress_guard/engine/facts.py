"""The facts the proxy gathers, one small type per thing it can see, and the answers of
``Engine.decide`` that are not a plain Decision.

NamedTuples: one is built per question on the hot path, and a tuple is the cheapest
immutable value Python has. The type of the facts says which rules apply (the
dispatcher switches on it), so a new question is a new type here plus its rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from egress_guard.engine.models import NamedModel
from egress_guard.engine.types import Decision, Reason
from egress_guard.normalize import Host, IPAddress
from egress_guard.policy.model import Destination


class Client(NamedTuple):
    """Who is asking: the client's address and whether it proved a clients.auth user
    (the proxy checks the password against the users file; the engine decides whether
    one was needed). ``host`` is the target asked for, named in a refusal."""

    ip: str
    authenticated: bool
    host: str


class Target(NamedTuple):
    """A target to connect to: ``host``/``port`` as the client wrote them (strings), or
    already normalised (a Host and an int: not normalised again).

    ``addresses``: what DNS answered (after a NeedsAddresses), or for a ``reopened``
    tunnel its pinned address (None: a parent proxy resolved it). ``parent_resolves``:
    a parent proxy resolves names, so a name without a static address is decided on the
    name. ``opaque_tunnel``: a CONNECT relayed without interception (its destination's
    request rules could not be checked). ``reopened``: an open tunnel decided again
    after a policy reload."""

    host: str | Host
    port: str | int
    addresses: Sequence[IPAddress] | None = None
    parent_resolves: bool = False
    opaque_tunnel: bool = False
    reopened: bool = False
    origin: IPAddress | None = None


class NeedsAddresses(NamedTuple):
    """The target's addresses are not known: resolve ``host`` (no I/O in the engine) and
    ask again with ``Target(host, port, addresses=...)``."""

    host: Host
    port: int


class Approved(NamedTuple):
    """A target let through (``decision.allowed``: allow, or would_block in audit mode),
    with what the proxy pins: the normalised target, the checked address to connect to
    (None when decided on the name), and the destination whose rules apply."""

    decision: Decision
    host: Host
    port: int
    address: IPAddress | None
    destination: Destination | None


class ServerName(NamedTuple):
    """A tunnel's TLS SNI (None: the ClientHello named none)."""

    authority: Host
    port: int
    sni: str | None
    destination: str | None


class UnreadableName(NamedTuple):
    """A server name the guard cannot read or trust (ECH, two SNI extensions, records
    before the ClientHello, ...)."""

    reason: Reason
    authority: Host
    port: int
    destination: str | None
    detail: str


class Redirected(NamedTuple):
    """A connection that reached the guard without CONNECT (transparent mode: a gateway
    or a sidecar redirected it): ``name`` is what its first bytes named (``via``: "sni"
    or "host"; None: they named nothing), ``original``/``port`` where the client sent
    it, ``checked`` the addresses the guard checked for the name (None: unknown), and
    ``destination`` the rule that allowed the name."""

    name: Host | None
    via: str
    original: IPAddress
    port: int
    checked: Sequence[IPAddress] | None
    destination: str | None


class HostNames(NamedTuple):
    """The names a request gives for its authority: ``values`` are compared with it (the
    Host headers, or HTTP/2's :authority, or an absolute URI's authority), ``also`` are
    checked against the deny rules only (Host headers beside :authority)."""

    authority: Host
    port: int
    values: Sequence[str]
    default_port: int
    destination: str | None
    also: Sequence[str] = ()


class Request(NamedTuple):
    """A request to a destination with request rules: its method, path and, once the
    body is read, the models it asks for (``decision``: the request's decision so far)."""

    destination: Destination
    method: str
    path: str
    models: str | Sequence[NamedModel] | None
    decision: Decision
    upgrade: str | None = None


class ModelUnread(NamedTuple):
    """A model call whose model could not be read from its body."""

    destination: Destination
    decision: Decision
    detail: str


class BodyShape(NamedTuple):
    """A model call's body, before it is held whole to read the model."""

    destination: Destination
    decision: Decision
    method: str
    content_length: str | None
    chunked: bool
    limit: int
    http1: bool = True
