"""The policy language, version 1, as pydantic models.

Every model forbids unknown keys: a misspelt ``deny`` or ``block_privte`` must be an
error at load, never a silently ignored safety setting. Host patterns are checked and
canonicalised here (see patterns.py) so nothing later has to re-validate them.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
)

from egress_guard.policy.patterns import MAPPED, PatternError, parse_network, parse_pattern

NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_METHOD_RE = re.compile(r"^[A-Z]{1,20}$")


def _pattern(raw: str) -> str:
    try:
        return str(parse_pattern(raw))
    except PatternError as e:
        raise ValueError(str(e)) from e


def _deny_pattern(raw: str) -> str:
    try:
        return str(parse_pattern(raw, deny=True))
    except PatternError as e:
        raise ValueError(str(e)) from e


def _cidr(raw: str) -> str:
    try:
        return str(parse_network(raw))
    except PatternError as e:
        raise ValueError(str(e)) from e


def _method(raw: str) -> str:
    if not _METHOD_RE.match(raw):
        raise ValueError(f"{raw!r} is not an HTTP method (upper case, e.g. POST)")
    return raw


def _path_glob(raw: str) -> str:
    if not raw.startswith("/"):
        raise ValueError(f"path pattern {raw!r} must start with '/'")
    if any(c in raw for c in "?#") or any(ord(c) < 0x21 for c in raw):
        raise ValueError(f"path pattern {raw!r} may not contain a query, fragment or spaces")
    return raw


HostPatternStr = Annotated[str, AfterValidator(_pattern)]
#: a deny rule's host: may cover every address (it allows nothing)
DenyPatternStr = Annotated[str, AfterValidator(_deny_pattern)]
Cidr = Annotated[str, AfterValidator(_cidr)]
Port = Annotated[int, Field(ge=1, le=65535, strict=True)]
Method = Annotated[str, AfterValidator(_method)]
PathGlob = Annotated[str, AfterValidator(_path_glob)]
#: the metric label and audit word for traffic no rule covers; a rule may not take it
RESERVED_NAMES = frozenset({"unlisted"})


def _not_reserved(name: str) -> str:
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} is reserved (it labels traffic that no rule covers)")
    return name


DestName = Annotated[str, Field(pattern=NAME_RE), AfterValidator(_not_reserved)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class InspectRules(_Strict):
    """Request-level rules; they need TLS interception (``run --inspect``)."""

    methods: list[Method] | None = None
    paths: list[PathGlob] | None = None
    models: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = None


class Destination(InspectRules):
    """One allowed destination: a label for audit and metrics, and what it covers."""

    name: DestName
    purpose: str = ""
    hosts: list[HostPatternStr] = Field(min_length=1)
    ports: list[Port] = Field(default_factory=lambda: [443], min_length=1)

    @field_validator("hosts", "ports")
    @classmethod
    def _no_duplicates(cls, v: list[object]) -> list[object]:
        seen: set[object] = set()
        for item in v:
            if item in seen:
                raise ValueError(f"{item!r} is listed twice")
            seen.add(item)
        return v

    @field_validator("hosts")
    @classmethod
    def _not_every_ipv4(cls, v: list[str]) -> list[str]:
        # An IPv4-mapped address is the IPv4 address, so an IPv6 network around all of
        # ::ffff:0:0/96 would allow every IPv4 address (like ::ffff:0:0/96 itself).
        for raw in v:
            net = parse_pattern(raw).network
            if net is not None and net.version == 6 and MAPPED.subnet_of(net):
                raise ValueError(
                    f"{raw!r} contains {MAPPED} (every IPv4 address, IPv4-mapped): it would "
                    "allow every IPv4 address; narrow it (e.g. 2000::/3, global unicast)"
                )
        return v

    @property
    def needs_inspection(self) -> bool:
        return bool(self.methods or self.paths or self.models)


class UseRef(_Strict):
    """``- use: <catalog entry>``: take a catalog entry as it is."""

    use: DestName


def _entry_kind(value: object) -> str:
    if isinstance(value, dict) and "use" in value:
        return "use"
    if isinstance(value, UseRef):
        return "use"
    return "destination"


#: Discriminated so a bad destination reports its own errors, not also "missing 'use'".
DestinationItem = Annotated[
    Annotated[UseRef, Tag("use")] | Annotated[Destination, Tag("destination")],
    Discriminator(_entry_kind),
]


class DenyRule(_Strict):
    hosts: list[DenyPatternStr] = Field(min_length=1)
    #: None: every port. Deny rules win over every allow.
    ports: list[Port] | None = None
    comment: str = ""


class Network(_Strict):
    block_private: bool = True
    allow_cidrs: list[Cidr] = Field(default_factory=list)
    #: static host -> address(es), for air-gapped sites without DNS; checked like DNS answers
    resolve: dict[str, str | list[str]] = Field(default_factory=dict)


class Auth(_Strict):
    #: htpasswd-style file, one ``user:password`` or ``user:sha256:<hex>`` per line
    users_file: str


class Clients(_Strict):
    allow_cidrs: list[Cidr] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    auth: Auth | None = None


class PolicyFile(_Strict):
    """A policy file as written. ``include`` and ``use`` are resolved by the loader."""

    version: Literal[1]
    mode: Literal["enforce", "audit"] = "enforce"
    include: list[DestName] = Field(default_factory=list)
    destinations: list[DestinationItem] = Field(default_factory=list)
    deny: list[DenyRule] = Field(default_factory=list)
    network: Network = Field(default_factory=Network)
    clients: Clients = Field(default_factory=Clients)


class CatalogEntry(InspectRules):
    """A row of OpenCode's destination table, as data."""

    name: DestName
    purpose: str
    required: Literal["yes", "no", "conditional", "licensed"]
    hosts: list[HostPatternStr] = Field(default_factory=list)
    ports: list[Port] = Field(default_factory=lambda: [443], min_length=1)
    transport: Literal["tcp", "udp"] = "tcp"
    #: the opencode.json key or environment variable that turns this traffic off
    disabled_by: list[str] = Field(default_factory=list)
    #: where the row comes from: the network doc's table, or observed traffic
    source: list[Literal["docs", "observed"]] = Field(min_length=1)
    seed_row: str | None = None
    notes: str = ""

    @property
    def usable(self) -> str | None:
        """None when ``use:`` may take this entry, else why not."""
        if self.transport != "tcp":
            return (
                f"'{self.name}' is {self.transport.upper()} traffic, which cannot pass through "
                "an HTTP proxy; " + (self.notes or "disable it in opencode.json")
            )
        if not self.hosts:
            return (
                f"'{self.name}' has no fixed hosts ({self.notes or 'they depend on your use'}); "
                "add a destination naming the hosts you allow"
            )
        return None

    def as_destination(self) -> Destination:
        return Destination(
            name=self.name,
            purpose=self.purpose,
            hosts=self.hosts,
            ports=self.ports,
            methods=self.methods,
            paths=self.paths,
            models=self.models,
        )


class Catalog(_Strict):
    version: Literal[1]
    entries: list[CatalogEntry]
