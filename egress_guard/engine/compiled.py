"""A policy compiled into the tables the rules look things up in.

Built once per policy load (start-up, SIGHUP, file watch) and read-only afterwards: the
rules (engine/rules/) are functions over a ``Compiled``, so a new policy key is the
model, maybe a table here, and one rule. Lookups only; no Decision is built here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from egress_guard.engine.addresses import embedded_ipv4
from egress_guard.engine.matcher import HostIndex
from egress_guard.normalize import IPAddress, normalize_host, socket_ip
from egress_guard.policy.loader import EffectivePolicy
from egress_guard.policy.model import CatalogEntry, Destination
from egress_guard.policy.patterns import parse_network, parse_pattern, with_mapped

_LOOPBACK_OR_ANY = frozenset({"127.0.0.1", "::1", "0.0.0.0", "::"})


@dataclass
class Compiled:
    """A policy's lookup tables (with the catalog and the proxy's own listeners)."""

    policy: EffectivePolicy
    catalog: Mapping[str, CatalogEntry] = field(default_factory=dict)
    #: (address, port) pairs the proxy itself listens on: never a destination
    self_endpoints: frozenset[tuple[str, int]] = frozenset()

    def __post_init__(self) -> None:
        self.self_pairs = frozenset(_canonical_endpoint(h, p) for h, p in self.self_endpoints)
        self.self_local_ports = frozenset(
            p for h, p in self.self_pairs if h in _LOOPBACK_OR_ANY or h.startswith("127.")
        )
        self.self_any_ports = frozenset(p for h, p in self.self_pairs if h in ("0.0.0.0", "::"))
        dests = self.policy.destinations
        self.dests: tuple[Destination, ...] = dests
        self.by_name = {d.name: d for d in dests}
        #: each destination's ports as a set, by position: probed once per allowed target
        self.ports = tuple(frozenset(d.ports) for d in dests)
        self.allow = HostIndex((i, d.hosts) for i, d in enumerate(dests))
        self.deny = HostIndex(
            (i, [parse_pattern(h, deny=True) for h in r.hosts])
            for i, r in enumerate(self.policy.deny)
        )
        #: name_ids of every name the allow rules spell out in full (``a.b``, ``**.a.b``),
        #: worked out once per policy: the names a policy lists are most of what its
        #: clients ask for, and each then costs one probe instead of two suffix walks
        self.names = {n: self.name_ids(n) for n in self.allow.full_names()}
        # An IPv4-mapped address is the IPv4 address: every network below also covers the
        # IPv4 addresses it holds in mapped form (addresses are matched in IPv4 form).
        self.dest_nets = [
            with_mapped(p.network for p in map(parse_pattern, d.hosts) if p.network is not None)
            for d in dests
        ]
        self.allow_cidrs = with_mapped(map(parse_network, self.policy.network.allow_cidrs))
        self.client_nets = with_mapped(map(parse_network, self.policy.clients.allow_cidrs))
        usable = [(n, e) for n, e in self.catalog.items() if e.usable is None]
        self.catalog_names = [n for n, _ in usable]
        self.catalog_index = HostIndex((i, e.hosts) for i, (_, e) in enumerate(usable))
        self.catalog_ports = [e.ports for _, e in usable]
        self.resolve: dict[str, tuple[IPAddress, ...]] = {}
        for name, addrs in self.policy.network.resolve.items():
            key = normalize_host(name).value
            values = addrs if isinstance(addrs, list) else [addrs]
            resolved = tuple(ip for ip in (normalize_host(a).ip for a in values) if ip is not None)
            self.resolve[key] = resolved

    def deny_port_ok(self, rule_id: int, port: int) -> bool:
        ports = self.policy.deny[rule_id].ports
        return ports is None or port in ports

    def name_ids(
        self, name: str, *, spelled: bool = True
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(deny rule ids, destination ids) whose patterns cover the canonical name.

        ``spelled=False`` for a name not in ``names``: no allow rule spells it in full,
        so only the allow rules for the names below a suffix can cover it."""
        deny = self.deny.match_name(name) if self.deny.has_names else ()
        return deny, self.allow.match_name(name, spelled=spelled)

    def deny_ip_ids(self, ip: IPAddress) -> tuple[int, ...]:
        """Deny rules covering ``ip`` or an IPv4 address it carries (NAT64, 6to4, ...):
        on a DNS64 network a denied IPv4 host is reached as 64:ff9b::a.b.c.d."""
        if not self.deny.has_ips:
            return ()
        ids = self.deny.match_ip(ip)
        if ip.version == 4:
            return ids  # sorted and unique already
        for inner in embedded_ipv4(ip):
            ids += self.deny.match_ip(inner)
        return tuple(sorted(set(ids)))

    def is_self(self, ip: IPAddress, port: int) -> bool:
        """Would connecting to ip:port reach one of the proxy's own listeners?"""
        if (str(ip), port) in self.self_pairs:
            return True
        # 0.0.0.0 and :: as a destination mean "this host": they reach a loopback listener.
        if ip.is_unspecified and port in self.self_local_ports:
            return True
        # A listener on 0.0.0.0 / :: answers on every local address, 127.0.0.2 included.
        return ip.is_loopback and port in self.self_any_ports


def _canonical_endpoint(host: str, port: int) -> tuple[str, int]:
    """A listening address as is_self compares it: canonical IP text, no zone id."""
    try:
        return str(socket_ip(host)), int(port)
    except ValueError:
        return host, int(port)
