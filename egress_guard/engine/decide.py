"""The decision engine: pure functions from (policy, request facts) to a Decision.

No sockets, no mitmproxy, no clocks. The proxy adapter gathers facts (the CONNECT target,
the resolved addresses, the SNI, the Host header) and asks the engine at each stage; the
engine alone says yes or no, and why. The checks run in a fixed order so the reason is
the most specific one: bad input, then deny, then allow, then port, then addresses.

Audit mode is applied last, by ``finalize``: a block becomes ``would_block`` except for
the blocks audit mode must never lift (see NEVER_AUDITED).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal, NamedTuple

from egress_guard.engine.addresses import embedded_ipv4, special_class
from egress_guard.engine.matcher import HostIndex, networks_contain
from egress_guard.engine.models import READ_METHODS, NamedModel, api_kind
from egress_guard.engine.paths import AmbiguousPath, canonical_path
from egress_guard.normalize import (
    Host,
    IPAddress,
    NormalizationError,
    canonical_ip,
    join_hostport,
    normalize_host,
    normalize_port,
    parse_authority,
    socket_ip,
)
from egress_guard.policy.loader import EffectivePolicy
from egress_guard.policy.model import CatalogEntry, Destination
from egress_guard.policy.patterns import parse_network, parse_pattern, with_mapped

Action = Literal["allow", "block", "would_block"]
Reason = Literal[
    "allowlisted",
    "not_allowlisted",
    "denylisted",
    "port_not_allowed",
    "private_address",
    "ip_literal_not_allowed",
    "sni_mismatch",
    "host_header_mismatch",
    "invalid_host",
    "client_not_allowed",
    "proxy_auth_required",
    "path_not_allowed",
    "method_not_allowed",
    "model_not_allowed",
    "internal_error",
    "self_connection",
    "dns_failed",
    "malformed_request",
    "buffer_budget",
    "inspection_required",
]

#: Blocks that audit mode does not turn into would_block: they are about who may use the
#: proxy, input that has no destination at all, a request that would loop back into the
#: proxy, the proxy's own failure (fail closed, in every mode), or an explicit deny rule
#: (deny wins over everything, audit mode included). ``buffer_budget`` (the held-body
#: budget is spent) is no policy verdict at all: the body cannot be held to be checked.
NEVER_AUDITED: frozenset[str] = frozenset(
    {
        "denylisted",
        "client_not_allowed",
        "proxy_auth_required",
        "invalid_host",
        "internal_error",
        "self_connection",
        "dns_failed",
        "malformed_request",
        "buffer_budget",
    }
)


class Decision(NamedTuple):
    """What the engine says of one connection or request, and why.

    (A NamedTuple rather than a frozen dataclass: one is built for every refused target,
    and a frozen dataclass's ``__init__`` costs several times more for the same
    immutability. Change one with ``_replace``.)"""

    allowed: bool
    action: Action
    reason: Reason
    destination: str | None
    host: str
    port: int | None
    hint: str | None = None
    detail: str | None = None
    #: for a target the policy does not list: the catalog entry that covers it, so the
    #: audit log says "models-catalog" rather than only a host name
    catalog: str | None = None

    @property
    def label(self) -> str:
        """Metric label: the rule name, or ``unlisted`` (never a raw host)."""
        return self.destination or "unlisted"


class Match(NamedTuple):
    """A target that passed the name checks and now needs its addresses checked.

    (A NamedTuple, not a frozen dataclass: one is built per allowed CONNECT, and this is
    as immutable for a fraction of the cost.)"""

    host: Host
    port: int
    destination: Destination
    #: position of the destination in the policy (index into per-destination tables)
    position: int


#: ``_new(Match, (host, port, ...))`` builds a Match without the NamedTuple's generated
#: ``__new__``, a Python function: one is built for every allowed target, and this
#: costs half as much
_new = tuple.__new__


def _block(
    reason: Reason,
    host: str,
    port: int | None,
    destination: str | None = None,
    hint: str | None = None,
    detail: str | None = None,
) -> Decision:
    return Decision(False, "block", reason, destination, host, port, hint, detail)


@dataclass
class Engine:
    """A compiled policy. Build once per policy load; every method is read-only."""

    policy: EffectivePolicy
    catalog: Mapping[str, CatalogEntry] = field(default_factory=dict)
    #: (address, port) pairs the proxy itself listens on: never a destination
    self_endpoints: frozenset[tuple[str, int]] = frozenset()

    def __post_init__(self) -> None:
        self._self = frozenset(_canonical_endpoint(h, p) for h, p in self.self_endpoints)
        self._self_local_ports = frozenset(
            p for h, p in self._self if h in _LOOPBACK_OR_ANY or h.startswith("127.")
        )
        self._self_any_ports = frozenset(p for h, p in self._self if h in ("0.0.0.0", "::"))
        dests = self.policy.destinations
        self._dests: tuple[Destination, ...] = dests
        self._by_name = {d.name: d for d in dests}
        #: each destination's ports as a set, by position: probed once per allowed target
        self._ports = tuple(frozenset(d.ports) for d in dests)
        self._allow = HostIndex((i, d.hosts) for i, d in enumerate(dests))
        self._deny = HostIndex(
            (i, [parse_pattern(h, deny=True) for h in r.hosts])
            for i, r in enumerate(self.policy.deny)
        )
        #: _name_ids of every name the allow rules spell out in full (``a.b``, ``**.a.b``),
        #: worked out once per policy: the names a policy lists are most of what its
        #: clients ask for, and each then costs one probe instead of two suffix walks
        self._names = {n: self._name_ids(n) for n in self._allow.full_names()}
        # An IPv4-mapped address is the IPv4 address: every network below also covers the
        # IPv4 addresses it holds in mapped form (addresses are matched in IPv4 form).
        self._dest_nets = [
            with_mapped(p.network for p in map(parse_pattern, d.hosts) if p.network is not None)
            for d in dests
        ]
        self._allow_cidrs = with_mapped(map(parse_network, self.policy.network.allow_cidrs))
        self._client_nets = with_mapped(map(parse_network, self.policy.clients.allow_cidrs))
        usable = [(n, e) for n, e in self.catalog.items() if e.usable is None]
        self._catalog_names = [n for n, _ in usable]
        self._catalog_index = HostIndex((i, e.hosts) for i, (_, e) in enumerate(usable))
        self._catalog_ports = [e.ports for _, e in usable]
        self._resolve: dict[str, tuple[IPAddress, ...]] = {}
        for name, addrs in self.policy.network.resolve.items():
            key = normalize_host(name).value
            values = addrs if isinstance(addrs, list) else [addrs]
            resolved = tuple(ip for ip in (normalize_host(a).ip for a in values) if ip is not None)
            self._resolve[key] = resolved

    # -- stage 0: who is asking ----------------------------------------------------------

    def check_client(self, client_ip: str) -> Decision | None:
        """None when the client may use the proxy; a block otherwise."""
        try:
            ip = socket_ip(client_ip)
        except ValueError:
            return _block(
                "client_not_allowed", "", None, detail=f"bad client address {client_ip!r}"
            )
        if networks_contain(self._client_nets, ip):
            return None
        return _block(
            "client_not_allowed",
            "",
            None,
            hint="add the client's network to clients.allow_cidrs",
            detail=str(ip),
        )

    # -- stage 1: the target by name -----------------------------------------------------

    def decide_target(self, raw_host: str, raw_port: str | int) -> Decision | Match:
        """Check a target before any DNS lookup. A Match still needs ``decide_addresses``."""
        try:
            host = normalize_host(raw_host)
            port = normalize_port(raw_port)
        except NormalizationError as e:
            return _block("invalid_host", printable(raw_host), None, detail=str(e))
        return self.decide_normalized(host, port)

    def decide_normalized(self, host: Host, port: int) -> Decision | Match:
        ip = host.ip
        if ip is None:
            deny_ids, ids = self._names.get(host.value) or self._name_ids(host.value, spelled=False)
        else:
            deny_ids, ids = self._deny_ip_ids(ip), self._allow.match_ip(ip)
        if deny_ids:
            deny = self._deny_hit(deny_ids, host, port)
            if deny is not None:
                return deny
        if not ids:
            if ip is None:
                return self._unlisted("not_allowlisted", host, port)
            cls = special_class(ip)
            if (
                cls is not None
                and self.policy.network.block_private
                and not (networks_contain(self._allow_cidrs, ip))
            ):
                return self._unlisted("private_address", host, port, detail=cls)
            return self._unlisted("ip_literal_not_allowed", host, port)
        for i in ids:
            if port in self._ports[i]:
                return _new(Match, (host, port, self._dests[i], i))
        first = self._dests[ids[0]]
        return _block(
            "port_not_allowed",
            host.value,
            port,
            destination=first.name,
            hint=(
                f"destination {first.name!r} ({self.policy.origins.get(first.name, '?')}) "
                f"allows ports {first.ports}; add {port} there if it is needed"
            ),
        )

    # -- stage 2: the addresses the target resolved to -----------------------------------

    def static_addresses(self, host: Host) -> tuple[IPAddress, ...] | None:
        """Addresses known without DNS: an IP literal, or a ``network.resolve`` override."""
        if host.ip is not None:
            return (host.ip,)
        return self._resolve.get(host.value)

    def decide_addresses(self, match: Match, addresses: Sequence[IPAddress]) -> Decision:
        """Every address must pass; the caller must connect to one of exactly these."""
        host, port, dest = match.host, match.port, match.destination
        if not addresses:
            return _block("dns_failed", host.value, port, dest.name, detail="no addresses")
        dest_nets = self._dest_nets[match.position]
        looped = self.check_self(addresses, host, port, dest.name)
        if looped is not None:
            return looped
        for raw_ip in addresses:
            ip = canonical_ip(raw_ip)
            denied = self._denied_address(ip, host, port, dest.name)
            if denied is not None:
                return denied
            if not self.policy.network.block_private:
                continue
            cls = special_class(ip)
            if cls is None:
                continue
            if networks_contain(dest_nets, ip) or networks_contain(self._allow_cidrs, ip):
                continue
            return _block(
                "private_address",
                host.value,
                port,
                dest.name,
                hint=(
                    f"{host.value} resolved to {ip} ({cls}); if that is intended, add it to "
                    "network.allow_cidrs or to the destination's hosts"
                ),
                detail=f"{ip} is {cls}",
            )
        return Decision(True, "allow", "allowlisted", dest.name, host.value, port)

    def check_unlisted_addresses(
        self, addresses: Sequence[IPAddress], host: Host, port: int
    ) -> Decision | None:
        """The address checks no mode lifts, for a target audit mode lets through unlisted:
        a self-connection, and an address a deny rule covers (an unlisted alias of a denied
        host must not reach it because audit mode waved the name through)."""
        looped = self.check_self(addresses, host, port)
        if looped is not None:
            return looped
        for raw_ip in addresses:
            denied = self._denied_address(canonical_ip(raw_ip), host, port, None)
            if denied is not None:
                return denied
        return None

    def _denied_address(
        self, ip: IPAddress, host: Host, port: int, dest: str | None
    ) -> Decision | None:
        for i in self._deny_ip_ids(ip):
            if self._deny_port_ok(i, port):
                return _block(
                    "denylisted",
                    host.value,
                    port,
                    dest,
                    hint=f"denied by {self.policy.deny_origins[i]} (resolved to {ip})",
                )
        return None

    def check_self(
        self, addresses: Sequence[IPAddress], host: Host, port: int, dest: str | None = None
    ) -> Decision | None:
        """Never connect to the proxy's own listening address: one request would loop
        through the proxy again and again. Checked in every mode."""
        for raw_ip in addresses:
            ip = canonical_ip(raw_ip)
            if self._is_self(ip, port):
                return _block(
                    "self_connection",
                    host.value,
                    port,
                    dest,
                    detail=f"{join_hostport(str(ip), port)} is egress-guard's own listening address",
                )
        return None

    # -- stage 3: other names for the same destination -----------------------------------

    def check_sni(
        self, authority: Host, port: int, sni: str | None, dest: str | None
    ) -> Decision | None:
        """The TLS SNI must name the CONNECT target (the CONNECT target is the authority).

        A name the SNI gives is checked against the deny rules first (``denylisted``, in
        every mode): the server routes by it, so a denied name must not reach it behind
        an address or an alias the policy does not deny."""
        if sni is None:
            return None
        try:
            sni_host = normalize_host(sni)
        except NormalizationError as e:
            denied = self._denied_name(authority, port, "SNI", sni, None, dest)
            return denied or self.unreadable_name(
                "sni_mismatch", authority, port, dest, f"invalid SNI: {e}"
            )
        if sni_host.value != authority.value:
            denied = self._denied_name(authority, port, "SNI", sni, sni_host, dest)
            if denied is not None:
                return denied
            return _block(
                "sni_mismatch",
                authority.value,
                port,
                dest,
                detail=f"SNI {sni_host.value!r} does not match CONNECT {authority.value!r}",
            )
        return None

    def check_host_header(
        self,
        authority: Host,
        port: int,
        host_headers: Sequence[str],
        default_port: int,
        dest: str | None,
        *,
        also: Sequence[str] = (),
    ) -> Decision | None:
        """Exactly one Host header, naming the request's authority (URI or CONNECT).

        Every name given (each Host header, and ``also``: names the client supplied that
        are not compared here, e.g. Host headers beside HTTP/2's :authority) is checked
        against the deny rules first (``denylisted``, in every mode)."""
        for value in (*host_headers, *also):
            denied = self._denied_authority(authority, port, value, default_port, dest)
            if denied is not None:
                return denied
        if len(host_headers) != 1:
            return _block(
                "host_header_mismatch",
                authority.value,
                port,
                dest,
                detail=f"{len(host_headers)} Host headers (exactly one is required)",
            )
        value = host_headers[0]
        try:
            h_host, h_port = parse_authority(value, default_port)
        except NormalizationError as e:
            return self.unreadable_name(
                "host_header_mismatch", authority, port, dest, f"invalid Host: {e}"
            )
        if h_host.value != authority.value or h_port != port:
            return _block(
                "host_header_mismatch",
                authority.value,
                port,
                dest,
                detail=f"Host {printable(value)!r} does not match {authority.value}:{port}",
            )
        return None

    def unreadable_name(
        self, reason: Reason, authority: Host, port: int, dest: str | None, detail: str
    ) -> Decision:
        """A block for an SNI or Host the guard cannot read (or cannot trust: ECH, two SNI
        extensions, TLS records before the ClientHello). Such a name cannot be checked
        against the deny rules, so when the policy has any, audit mode does not lift it
        (see ``finalize``): a server may read it leniently as a denied name."""
        return _block(reason, authority.value, port, dest, _UNCHECKED_NAME_HINT, detail)

    def _denied_authority(
        self, authority: Host, port: int, value: str, default_port: int, dest: str | None
    ) -> Decision | None:
        """``denylisted`` when a Host-style ``host[:port]`` names a denied host."""
        try:
            host, h_port = parse_authority(value, default_port)
        except NormalizationError:
            return self._denied_name(authority, port, "Host", value, None, dest)
        return self._denied_name(authority, port, "Host", value, host, dest, h_port)

    def _denied_name(
        self,
        authority: Host,
        port: int,
        what: str,
        raw: str,
        host: Host | None,
        dest: str | None,
        named_port: int | None = None,
    ) -> Decision | None:
        """``denylisted`` when a name the client supplied (``raw``, read as ``host``)
        is denied on the connection's port or on the port it names.

        A name that does not normalise is read leniently as well (trimmed, without
        trailing dots, up to a NUL or space), as a lenient server might read it."""
        if not self.policy.deny:
            return None
        if host is None:
            host = _lenient_host(raw)
            if host is None:
                return None
        if host.value == authority.value and named_port in (None, port):
            return None  # the authority itself: decided already
        if host.ip is None:
            ids = self._deny.match_name(host.value) if self._deny.has_names else ()
        else:
            ids = self._deny_ip_ids(host.ip)
        if not ids:
            return None
        for p in dict.fromkeys((port, named_port if named_port is not None else port)):
            hit = self._deny_hit(ids, host, p)
            if hit is not None:
                return hit._replace(
                    host=authority.value,
                    port=port,
                    destination=dest,
                    detail=f"{what} {printable(raw)!r} names a denied host",
                )
        return None

    # -- stage 4 (inspect mode): the request itself ---------------------------------------

    def check_request(
        self,
        dest: Destination,
        method: str,
        path: str,
        model: str | Sequence[NamedModel] | None,
        decision: Decision,
        *,
        upgrade: str | None = None,
    ) -> Decision | None:
        """A destination's method, path and model rules for one request (stage 4).

        ``model`` is None until the body is read (or when the path is not a model call),
        else the model, or every model the request may run (``requested_models``: its
        ``model`` and the fallbacks and server tools it names), each of which must be
        allowed; ``upgrade`` is the request's Upgrade header, if any.
        """

        def refuse(reason: Reason, hint: str, detail: str | None = None) -> Decision:
            return _refusal(decision, reason, hint, detail)

        if dest.methods is not None and method not in dest.methods:
            return refuse(
                "method_not_allowed", f"destination {dest.name!r} allows methods {dest.methods}"
            )
        if dest.paths is None and dest.models is None:
            return None
        try:
            bare = canonical_path(path)
        except AmbiguousPath as e:
            return refuse("path_not_allowed", "send the path in its plain spelling", str(e))
        if dest.paths is not None and not any(fnmatchcase(bare, g) for g in dest.paths):
            return refuse(
                "path_not_allowed", f"destination {dest.name!r} allows paths {dest.paths}"
            )
        if dest.models is None:
            return None
        models_hint = _models_hint(dest)
        if upgrade:
            return refuse(
                "model_not_allowed",
                models_hint,
                f"protocol upgrade ({printable(upgrade)}): its frames cannot be model-checked",
            )
        if model is None and method.upper() not in READ_METHODS and api_kind(bare) is None:
            return refuse(
                "model_not_allowed",
                models_hint,
                f"{method} to a path that is not a model endpoint egress-guard can read",
            )
        named = [NamedModel(model, "model")] if isinstance(model, str) else model or ()
        for m in named:
            if m.model not in dest.models:
                where = "" if m.field == "model" else f" (named in {m.field})"
                return refuse("model_not_allowed", models_hint, f"model {m.model!r}{where}")
        return None

    def check_model_body(
        self,
        dest: Destination,
        decision: Decision,
        method: str,
        content_length: str | None,
        chunked: bool,
        limit: int,
        *,
        http1: bool = True,
    ) -> Decision | None:
        """Before a model endpoint's body is held whole to read its model (stage 4).

        The proxy would buffer such a body without a limit of its own, so it must
        declare its length up front, and that length must be within ``limit``. Only an
        HTTP/1 request without Content-Length (and not chunked) certainly has no body;
        over HTTP/2 and HTTP/3 any method may send DATA frames of undeclared length.
        """
        if chunked:
            problem = "a body of unknown length (Transfer-Encoding) cannot be checked for its model"
        elif content_length is None:
            if http1 and method.upper() not in ("POST", "PUT", "PATCH"):
                return None
            problem = "a body without Content-Length cannot be checked for its model"
        elif not content_length.isdigit():
            problem = "an invalid Content-Length"
        elif int(content_length) > limit:
            problem = (
                f"a body of {int(content_length)} bytes is larger than --max-model-body ({limit})"
            )
        else:
            return None
        hint = f"{_models_hint(dest)}; the body must be sent with a Content-Length within --max-model-body"
        return _refusal(decision, "model_not_allowed", hint, problem)

    @staticmethod
    def check_inspection(
        dest: Destination | None, inspecting: bool, decision: Decision
    ) -> Decision | None:
        """A CONNECT tunnel to a destination with request rules (methods, paths, models)
        can only have them checked when the guard intercepts its TLS. Without
        interception such a tunnel is refused: relayed as bytes, its rules would not be
        checked at all. None when the tunnel may open (no rules, inspection on, or the
        target is refused or let through for another reason already, which then is the
        reason recorded). Plain HTTP requests need no interception and never ask this.
        """
        if dest is None or inspecting or not dest.needs_inspection or decision.action != "allow":
            return None
        rules = ", ".join(request_rules(dest))
        return _refusal(
            decision,
            "inspection_required",
            (
                f"destination {dest.name!r} has request rules ({rules}) that are checked only "
                "with TLS interception: run egress-guard with --inspect (mitmdump: --set "
                "egress_guard_inspect=true) and have clients trust its CA, or remove the rules"
            ),
            f"a tunnel to {dest.name!r} would be relayed without its {rules} checked",
        )

    @staticmethod
    def refuse_model(dest: Destination, decision: Decision, detail: str) -> Decision:
        """The model a request asks for could not be read from it (stage 4)."""
        return _refusal(decision, "model_not_allowed", _models_hint(dest), detail)

    # -- mode --------------------------------------------------------------------------

    def finalize(self, decision: Decision) -> Decision:
        """Apply audit mode: let a block through as would_block, unless it must not be."""
        if decision.allowed or self.policy.mode != "audit" or decision.reason in NEVER_AUDITED:
            return decision
        if decision.hint == _UNCHECKED_NAME_HINT and self.policy.deny:
            return decision  # a name that cannot be read cannot be shown not to be denied
        return decision._replace(allowed=True, action="would_block")

    # -- helpers -----------------------------------------------------------------------

    def destination(self, name: str | None) -> Destination | None:
        return self._by_name.get(name) if name is not None else None

    def _deny_port_ok(self, rule_id: int, port: int) -> bool:
        ports = self.policy.deny[rule_id].ports
        return ports is None or port in ports

    def _deny_hit(self, deny_ids: Iterable[int], host: Host, port: int) -> Decision | None:
        for i in deny_ids:
            if self._deny_port_ok(i, port):
                return _block(
                    "denylisted",
                    host.value,
                    port,
                    hint=f"denied by {self.policy.deny_origins[i]}; deny rules win over every allow",
                )
        return None

    def _name_ids(
        self, name: str, *, spelled: bool = True
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(deny rule ids, destination ids) whose patterns cover the canonical name.

        ``spelled=False`` for a name not in ``_names``: no allow rule spells it in full,
        so only the allow rules for the names below a suffix can cover it."""
        deny = self._deny.match_name(name) if self._deny.has_names else ()
        return deny, self._allow.match_name(name, spelled=spelled)

    def _deny_ip_ids(self, ip: IPAddress) -> tuple[int, ...]:
        """Deny rules covering ``ip`` or an IPv4 address it carries (NAT64, 6to4, ...):
        on a DNS64 network a denied IPv4 host is reached as 64:ff9b::a.b.c.d."""
        if not self._deny.has_ips:
            return ()
        ids = self._deny.match_ip(ip)
        if ip.version == 4:
            return ids  # sorted and unique already
        for inner in embedded_ipv4(ip):
            ids += self._deny.match_ip(inner)
        return tuple(sorted(set(ids)))

    def _is_self(self, ip: IPAddress, port: int) -> bool:
        """Would connecting to ip:port reach one of the proxy's own listeners?"""
        if (str(ip), port) in self._self:
            return True
        # 0.0.0.0 and :: as a destination mean "this host": they reach a loopback listener.
        if ip.is_unspecified and port in self._self_local_ports:
            return True
        # A listener on 0.0.0.0 / :: answers on every local address, 127.0.0.2 included.
        return ip.is_loopback and port in self._self_any_ports

    def catalog_entries(self, host: Host, port: int) -> list[str]:
        """Names of the usable catalog entries that cover ``host:port``."""
        ids = (
            self._catalog_index.match_ip(host.ip)
            if host.ip is not None
            else self._catalog_index.match_name(host.value)
        )
        return [self._catalog_names[i] for i in ids if port in self._catalog_ports[i]]

    def _unlisted(
        self, reason: Reason, host: Host, port: int, detail: str | None = None
    ) -> Decision:
        """A block for a target no destination lists, with the way to allow it."""
        names = self.catalog_entries(host, port)
        if names:
            uses = ", ".join(f"'- use: {n}'" for n in names)
            hint = f"catalog entry covers {join_hostport(host.value, port)}: add {uses} to destinations in {self.policy.source}"
        else:
            hint = (
                f"no catalog entry covers {join_hostport(host.value, port)}; to allow it add a destination "
                f"with hosts: [{host.value}] and ports: [{port}] to {self.policy.source}"
            )
        return Decision(
            False,
            "block",
            reason,
            None,
            host.value,
            port,
            hint,
            detail,
            catalog=names[0] if names else None,
        )


_LOOPBACK_OR_ANY = frozenset({"127.0.0.1", "::1", "0.0.0.0", "::"})

#: The hint of ``Engine.unreadable_name`` blocks (``finalize`` knows them by it).
_UNCHECKED_NAME_HINT = (
    "the name cannot be read, so it cannot be checked against the deny rules: "
    "refused in every mode while the policy has deny rules"
)


def _lenient_host(raw: str) -> Host | None:
    """A name as a lenient server might read one the normaliser refuses: trimmed, cut at
    the first NUL or space, without its port, brackets and trailing dots. None if even
    that is no host."""
    text = raw.strip().split("\x00", 1)[0].split(" ", 1)[0]
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    text = text.rstrip(".")
    try:
        return normalize_host(text)
    except NormalizationError:
        return None


def _refusal(decision: Decision, reason: Reason, hint: str, detail: str | None) -> Decision:
    """A stage-4 refusal of a request whose target ``decision`` allowed."""
    return decision._replace(allowed=False, action="block", reason=reason, hint=hint, detail=detail)


def request_rules(dest: Destination) -> list[str]:
    """Which request rules a destination declares: they need inspect mode in a tunnel."""
    return [k for k in ("methods", "paths", "models") if getattr(dest, k)]


def _models_hint(dest: Destination) -> str:
    return f"destination {dest.name!r} allows models {dest.models}"


def _canonical_endpoint(host: str, port: int) -> tuple[str, int]:
    """A listening address as check_self compares it: canonical IP text, no zone id."""
    try:
        return str(socket_ip(host)), int(port)
    except ValueError:
        return host, int(port)


def printable(raw: object) -> str:
    """A bounded, printable rendering of untrusted input for logs and headers."""
    text = raw if isinstance(raw, str) else repr(raw)
    text = "".join(c if c.isprintable() and c.isascii() else f"\\x{ord(c):02x}" for c in text[:200])
    return text
