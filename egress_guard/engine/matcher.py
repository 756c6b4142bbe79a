"""Host-pattern index whose lookup cost does not grow with the number of rules.

A name is looked up once as itself and once per suffix length the rules use (for
``*.zone.example.net``, the 4-label suffix of the name), one hash-table probe each; an
address once per prefix length in its bucket (see _ip_tables). With 100k rules that is still
a handful of dict probes, where a list of patterns would be 100k comparisons per
connection. At that size a probe is mostly cache misses, so the tables are built to need
one probe per suffix: what covers a name itself (exact and ``**.`` rules) is in one table,
what covers the names below a suffix (``*.`` and ``**.`` rules) in another.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable

from egress_guard.normalize import IPAddress
from egress_guard.policy.patterns import HostPattern, parse_pattern, with_mapped


class HostIndex:
    """Maps canonical hosts and addresses to the ids (policy order) of matching rules."""

    __slots__ = (
        "_below",
        "_depths",
        "_nets",
        "_tlds",
        "_whole",
        "has_ips",
        "has_names",
    )

    def __init__(self, rules: Iterable[tuple[int, Iterable[str | HostPattern]]]) -> None:
        exact: dict[str, list[int]] = defaultdict(list)
        sub: dict[str, list[int]] = defaultdict(list)
        apex_sub: dict[str, list[int]] = defaultdict(list)
        #: (version, prefix length) -> network address as an int -> rule ids
        nets: dict[tuple[int, int], dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for rule_id, patterns in rules:
            for raw in patterns:
                pat = raw if isinstance(raw, HostPattern) else parse_pattern(raw)
                if pat.kind == "exact":
                    exact[pat.value].append(rule_id)
                elif pat.kind == "sub":
                    sub[pat.value].append(rule_id)
                elif pat.kind == "apex_sub":
                    apex_sub[pat.value].append(rule_id)
                else:
                    assert pat.network is not None
                    # an IPv6 network covers the IPv4 addresses it holds IPv4-mapped
                    for net in with_mapped((pat.network,)):
                        key = (net.version, net.prefixlen)
                        nets[key][int(net.network_address)].append(rule_id)
        #: name -> rules that cover the name itself: exact ``name`` and ``**.name``
        self._whole = _union(exact, apex_sub)
        #: suffix -> rules that cover every name below it: ``*.suffix`` and ``**.suffix``
        self._below = _union(sub, apex_sub)
        #: per IP version: (mask, table) pairs for the prefix lengths shorter than the
        #: version's bucket length, and buckets of the longer ones (see _ip_tables)
        self._nets = {v: _ip_tables(v, nets) for v in (4, 6)}
        #: label counts of the suffixes in _below, ascending: only suffixes of those
        #: lengths are probed
        self._depths = tuple(sorted({k.count(".") + 1 for k in self._below}))
        #: the last label of every name and suffix in the tables: a name ending in any
        #: other label matches nothing, which one probe settles (most names a deny list
        #: or the catalog is asked about)
        self._tlds = frozenset(k[k.rfind(".") + 1 :] for k in (*self._whole, *self._below))
        #: whether any name / any address rule exists: an empty side needs no lookup
        self.has_names = bool(self._whole or self._below)
        self.has_ips = bool(nets)

    def full_names(self) -> Iterable[str]:
        """The names some rule covers by spelling them in full (exact and ``**.``)."""
        return self._whole.keys()

    def match_name(self, name: str, *, spelled: bool = True) -> tuple[int, ...]:
        """Rule ids whose name patterns cover the canonical name, in policy order.

        Only the suffixes with as many labels as some key of ``_below`` are probed
        (usually one or two lengths), each cut off the name with one ``split`` from the
        left. (A canonical name is at most 253 characters, so a split makes at most
        127 pieces, whatever name a client sends.)
        ``spelled=False``: the caller knows the name is none of ``full_names()``, so the
        table of whole names is not probed.
        """
        if name[name.rfind(".") + 1 :] not in self._tlds:
            return ()
        whole = self._whole.get(name) if spelled else None
        hits = [whole] if whole else []
        labels = name.count(".") + 1
        below = self._below
        for depth in self._depths:
            if depth >= labels:  # a suffix rule covers the names below it, not its own
                break
            hit = below.get(name.split(".", labels - depth)[-1])
            if hit:
                hits.append(hit)
        return _merged(hits)

    def match_ip(self, ip: IPAddress) -> tuple[int, ...]:
        """Rule ids whose IP or CIDR patterns contain the address, in policy order."""
        value = int(ip)
        short, shift, buckets = self._nets[ip.version]
        hits = []
        for mask, table in short + buckets.get(value >> shift, ()):
            hit = table.get(value & mask)
            if hit:
                hits.append(hit)
        return _merged(hits)


#: (mask, network address as an int -> rule ids), one per prefix length
_Tables = tuple[tuple[int, dict[int, tuple[int, ...]]], ...]
#: address length in bits, by IP version
_BITS = {4: 32, 6: 128}
#: prefix length of the buckets: /16 for IPv4, /32 (a usual allocation) for IPv6
_BUCKET = {4: 16, 6: 32}


def _ip_tables(
    version: int, nets: dict[tuple[int, int], dict[int, list[int]]]
) -> tuple[_Tables, int, dict[int, _Tables]]:
    """An address is probed once per prefix length, so the cost grew with the number of
    different lengths a policy has (a cloud provider's published ranges use dozens).
    Networks at least as long as the bucket length are grouped by the bucket their
    address falls in; an address then probes the short lengths, its one bucket, and
    only the lengths present in that bucket. Single addresses are /32 or /128, and the
    keys are ints (they hash several times faster than ipaddress objects)."""
    bits, cut = _BITS[version], _BUCKET[version]
    short: list[tuple[int, dict[int, tuple[int, ...]]]] = []
    grouped: dict[int, dict[int, dict[int, tuple[int, ...]]]] = defaultdict(dict)
    for v, prefixlen in sorted(nets):
        if v != version:
            continue
        table = {n: tuple(sorted(set(ids))) for n, ids in nets[(v, prefixlen)].items()}
        if prefixlen < cut:
            short.append((_mask(version, prefixlen), table))
            continue
        for n, ids in table.items():
            grouped[n >> (bits - cut)].setdefault(prefixlen, {})[n] = ids
    buckets = {
        b: tuple((_mask(version, p), by_len[p]) for p in sorted(by_len))
        for b, by_len in grouped.items()
    }
    return tuple(short), bits - cut, buckets


def _merged(hits: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The rule ids of several table hits, sorted and each once (a single hit already is)."""
    if not hits:
        return ()
    if len(hits) == 1:
        return hits[0]
    return tuple(sorted(set().union(*hits)))


def _union(*tables: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    keys = set().union(*tables)
    return {k: tuple(sorted({i for t in tables for i in t.get(k, ())})) for k in keys}


def _mask(version: int, prefixlen: int) -> int:
    return ((1 << prefixlen) - 1) << (_BITS[version] - prefixlen)


def networks_contain(
    nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network], ip: IPAddress
) -> bool:
    return any(ip.version == n.version and ip in n for n in nets)
