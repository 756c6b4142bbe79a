"""The policy language, version 1, as pydantic models.

Every model forbids unknown keys: a misspelt ``deny`` or ``block_privte`` must be an
error at load, never a silently ignored safety setting. Host patterns are checked and
canonicalised here (see patterns.py) so nothing later has to re-validate them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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


def _parsed(parse: Callable[[str], object], raw: str) -> str:
    """The canonical text of ``raw``, for the field validators below: one place that
    turns a PatternError into the plain ValueError they have always raised."""
    try:
        return str(parse(raw))
    except PatternError as e:
        raise ValueError(str(e)) from e


def _pattern(raw: str) -> str:
    return _parsed(parse_pattern, raw)


def _deny_pattern(raw: str) -> str:
    return _parsed(lambda r: parse_pattern(r, deny=True), raw)


def _cidr(raw: str) -> str:
    return _parsed(parse_network, raw)


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

    methods: list[Method] | None = Field(
        default=None,
        description="Inspect mode only: HTTP methods allowed (`method_not_allowed` otherwise). "
        "`null` allows every method.",
    )
    paths: list[PathGlob] | None = Field(
        default=None,
        description="Inspect mode only: request paths allowed, as shell-style globs matched "
        "against the path without its query, percent-decoded (`*` also matches `/`). Paths "
        "that servers read differently (empty or dot segments, `;`, `\\\\`, encoded "
        "`/ \\\\ % ? # ;`) are refused as `path_not_allowed` on destinations with `paths` "
        "or `models`. `null` allows every path.",
    )
    models: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None,
        description="Inspect mode only: model names a request body may ask for (the JSON "
        "`model` field, `model_not_allowed` otherwise). `null` allows every model.",
    )


class Destination(InspectRules):
    """One allowed destination: a label for audit and metrics, and what it covers."""

    name: DestName = Field(
        description="Label for the audit log (`destination`) and metrics (`destination` "
        "label). Unique in the effective policy, presets included."
    )
    purpose: str = Field(
        default="", description="Free text for humans; shown by `egress-guard check`."
    )
    hosts: list[HostPatternStr] = Field(
        min_length=1,
        description="Host patterns this destination covers (at least one, no duplicates).",
    )
    ports: list[Port] = Field(
        default_factory=lambda: [443],
        min_length=1,
        description="TCP ports allowed for these hosts (no duplicates).",
    )

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

    use: DestName = Field(
        description="The name of a [catalog entry](#catalog), taken as it is (hosts, ports, "
        "request rules). Entries without fixed hosts, or that are not TCP, cannot be `use`d; "
        "the loader says why."
    )


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
    hosts: list[DenyPatternStr] = Field(
        min_length=1, description="Host patterns to deny (at least one)."
    )
    ports: list[Port] | None = Field(
        default=None,
        description="None: every port. Deny rules win over every allow. Leave it out (or "
        "write `null`) to deny every port.",
    )
    comment: str = Field(default="", description="Free text for humans (why this is denied).")


class Network(_Strict):
    block_private: bool = Field(
        default=True,
        description="Refuse destinations whose addresses are not public: loopback, RFC 1918, "
        "link-local, CGNAT, ULA, multicast, reserved ranges, cloud metadata endpoints, and "
        "IPv6 forms that embed such an IPv4 address (mapped, NAT64, 6to4, Teredo). Checked "
        "on every address a name resolves to (`private_address`).",
    )
    allow_cidrs: list[Cidr] = Field(
        default_factory=list,
        description="Private ranges that may be reached anyway, e.g. an internal LLM gateway. "
        "A destination whose `hosts` lists an IP or CIDR allows that range for itself only.",
    )
    resolve: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description="Static host -> address(es), for air-gapped sites without DNS; checked "
        "like DNS answers. Each value is one IP address or a list of them; keys are host "
        "names (not addresses). A name listed here is never looked up in DNS.",
    )


class Auth(_Strict):
    users_file: str = Field(
        description="Htpasswd-style file, one `user:password` or `user:sha256:<hex>` per "
        "line. Relative paths are relative to the policy file."
    )


class Clients(_Strict):
    allow_cidrs: list[Cidr] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="Source addresses allowed to use the proxy (`client_not_allowed` "
        "otherwise, in every mode). The default admits the local machine only; a proxy "
        "listening on a network address needs the clients' ranges here.",
    )
    auth: Auth | None = Field(
        default=None,
        description="Optional proxy authentication (`Proxy-Authorization: Basic`); clients "
        "without valid credentials get `407` (`proxy_auth_required`).",
    )


class PolicyFile(_Strict):
    """A policy file as written. ``include`` and ``use`` are resolved by the loader."""

    version: Literal[1] = Field(description="The policy language version. Always `1`.")
    mode: Literal["enforce", "audit"] = Field(
        default="enforce",
        description="`enforce` blocks what the policy does not allow. `audit` lets it through "
        "and records `would_block` in the audit log and metrics; blocks about who may use the "
        "proxy (`client_not_allowed`, `proxy_auth_required`), unusable input "
        "(`invalid_host`), self-connections, DNS failures and internal errors stay blocks "
        "in audit mode. `egress-guard run --mode` overrides it.",
    )
    include: list[DestName] = Field(
        default_factory=list,
        description="Presets shipped in `policies/` (see [Presets](#presets)). Their "
        "destinations and deny rules come before this file's own; `mode`, `network` and "
        "`clients` are taken from this file only.",
    )
    destinations: list[DestinationItem] = Field(
        default_factory=list,
        description="What may be reached. Each item is either `use: <catalog entry>` or a "
        "destination written in full.",
    )
    deny: list[DenyRule] = Field(
        default_factory=list,
        description="Hosts that are never reached, whatever a destination allows. Checked first.",
    )
    network: Network = Field(
        default_factory=Network,
        description="Address-level rules: private ranges and static name resolution.",
    )
    clients: Clients = Field(default_factory=Clients, description="Who may use the proxy.")


class CatalogEntry(InspectRules):
    """A row of OpenCode's destination table, as data."""

    name: DestName = Field(description="The name a policy gives to `use:`.")
    purpose: str = Field(description="What OpenCode uses this traffic for.")
    required: Literal["yes", "no", "conditional", "licensed"] = Field(
        description="`yes`, `no`, `conditional` (depends on configuration) or `licensed` "
        "(needed for licensed features), as in OpenCode's network documentation."
    )
    hosts: list[HostPatternStr] = Field(
        default_factory=list,
        description="Hosts; empty when they depend on the user's configuration.",
    )
    ports: list[Port] = Field(
        default_factory=lambda: [443], min_length=1, description="TCP (or UDP) ports."
    )
    transport: Literal["tcp", "udp"] = Field(
        "tcp", description="`udp` entries document traffic no HTTP proxy can carry."
    )
    disabled_by: list[str] = Field(
        default_factory=list,
        description="The opencode.json key or environment variable that turns this traffic off.",
    )
    source: list[Literal["docs", "observed"]] = Field(
        min_length=1,
        description="Where the row comes from: the network doc's table, or observed traffic.",
    )
    seed_row: str | None = Field(
        None, description="The row of OpenCode's network table this entry comes from."
    )
    notes: str = Field(default="", description="Free text.")

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
    version: Literal[1] = Field(description="The catalog format version. Always `1`.")
    entries: list[CatalogEntry] = Field(
        description="One entry per destination, in the order of the table above."
    )
