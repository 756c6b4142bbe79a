"""What an OpenCode configuration makes OpenCode contact, without running OpenCode.

The providers in use and their endpoints, auto-update, sharing, plugins, remote MCP
servers, remote instructions and skills, the webfetch tool. ``policygen`` turns the
answers into a policy; ``doctor`` checks them against one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from egress_guard.normalize import NormalizationError, join_hostport, normalize_host
from egress_guard.opencode.config import OpenCodeConfig, dotted
from egress_guard.opencode.jsonc import Path, Placeholder, has_substitution

#: OpenCode's built-in provider ids (models.dev ids and the documented spellings) ->
#: catalog entry. A provider with its own baseURL uses that instead.
BUILTIN_PROVIDERS: Mapping[str, str] = {
    "anthropic": "anthropic",
    "openai": "openai",
    "google": "google",
    "groq": "groq",
    "together": "together",
    "togetherai": "together",
    "fireworks": "fireworks",
    "fireworks-ai": "fireworks",
    "mistral": "mistral",
    "cohere": "cohere",
    "ollama": "ollama",
    "lm-studio": "lm-studio",
    "lmstudio": "lm-studio",
    "opencode": "opencode-zen",  # https://opencode.ai/zen/v1
    "opencode-go": "opencode-zen",  # https://opencode.ai/zen/go/v1
}

#: Names that never leave a site: mDNS, reserved and private-use TLDs (RFC 6761/6762/8375,
#: ICANN's .internal). A NO_PROXY entry or a baseURL under one of them is site-internal.
PRIVATE_SUFFIXES = (
    "localhost",
    "local",
    "internal",
    "localdomain",
    "lan",
    "home.arpa",
    "intranet",
    "corp",
    "private",
    "test",
    "invalid",
)

_SCHEME_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)$", re.S)


# -- URLs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a URL setting sends OpenCode: canonical host, port, and the path prefix."""

    scheme: str
    host: str
    port: int
    path: str
    is_ip: bool

    @property
    def loopback(self) -> bool:
        if self.is_ip:
            return ipaddress.ip_address(self.host).is_loopback
        return self.host == "localhost" or self.host.endswith(".localhost")

    @property
    def site_internal(self) -> bool:
        """A name that can only resolve inside a site (or a private/special address)."""
        if self.loopback:
            return False
        if self.is_ip:
            ip = ipaddress.ip_address(self.host)
            return not ip.is_global
        return "." not in self.host or any(
            self.host == s or self.host.endswith("." + s) for s in PRIVATE_SUFFIXES
        )

    def authority(self) -> str:
        return join_hostport(self.host, self.port)


@dataclass(frozen=True, slots=True)
class UrlSetting:
    """A URL written in the configuration, and what it resolves to (if it can be known)."""

    path: Path
    raw: str
    where: str
    endpoint: Endpoint | None
    #: the host part is a {env:}/{file:} substitution: known only when OpenCode runs
    unresolved: bool = False
    #: why the URL is neither usable nor unresolved
    problem: str | None = None

    @property
    def key(self) -> str:
        return dotted(self.path)


def parse_url(raw: str) -> tuple[Endpoint | None, bool, str | None]:
    """(endpoint, unresolved, problem) for an http(s) URL."""
    m = _SCHEME_AUTHORITY.match(raw.strip())
    if m is None:
        if has_substitution(raw):
            return None, True, None
        return None, False, "not an absolute http:// or https:// URL"
    scheme, authority, rest = m.group(1).lower(), m.group(2), m.group(3)
    if has_substitution(scheme) or has_substitution(authority):
        return None, True, None
    if scheme not in ("http", "https"):
        return None, False, f"scheme {scheme!r} is not http or https"
    try:
        parts = urlsplit(f"{scheme}://{authority}")
        port = parts.port
        hostname = parts.hostname
    except ValueError as e:
        return None, False, f"invalid host or port: {e}"
    if not hostname:
        return None, False, "no host"
    try:
        host = normalize_host(hostname)
    except NormalizationError as e:
        return None, False, f"invalid host {hostname!r}: {e}"
    if port is None:
        port = 443 if scheme == "https" else 80
    if port == 0:
        return None, False, "port 0"
    path = re.split(r"[?#]", rest, maxsplit=1)[0] or "/"
    return Endpoint(scheme, host.value, port, path, host.ip is not None), False, None


def url_setting(cfg: OpenCodeConfig, path: Path) -> UrlSetting | None:
    value = cfg.get(*path)
    if value is None:
        return None
    raw = str(value)
    if isinstance(value, Placeholder):
        return UrlSetting(path, raw, cfg.where(path), None, unresolved=True)
    endpoint, unresolved, problem = parse_url(raw)
    return UrlSetting(path, raw, cfg.where(path), endpoint, unresolved, problem)


# -- providers ----------------------------------------------------------------------------


@dataclass
class ProviderUse:
    """A provider OpenCode may call with this configuration."""

    id: str
    #: which settings name it, each as "key (file:line)"
    refs: list[str] = field(default_factory=list)
    #: catalog entry for a built-in provider id (None: not a provider the catalog knows)
    catalog: str | None = None
    #: its own endpoint: options.baseURL, else api, else the documented top-level baseURL
    url: UrlSetting | None = None

    @property
    def url_ignored(self) -> bool:
        """OpenCode 1.18 drops ``provider.<id>.baseURL``; only ``options.baseURL`` counts."""
        return self.url is not None and self.url.path[-1] == "baseURL" and len(self.url.path) == 3


@dataclass
class Providers:
    used: list[ProviderUse]
    #: things a reader must be told: unresolved model names, disabled providers named...
    notes: list[str]


def _model_refs(cfg: OpenCodeConfig) -> Iterator[tuple[Path, object]]:
    yield ("model",), cfg.get("model")
    yield ("small_model",), cfg.get("small_model")
    for section in ("agent", "mode"):
        for name, agent in sorted(cfg.mapping(section).items()):
            if isinstance(agent, dict) and agent.get("disable") is not True:
                yield (section, name, "model"), agent.get("model")


def providers(cfg: OpenCodeConfig) -> Providers:
    notes: list[str] = []
    refs: dict[str, list[str]] = {}
    for path, value in _model_refs(cfg):
        if value is None:
            continue
        key = f"{dotted(path)} ({cfg.where(path)})"
        text = str(value)
        if isinstance(value, Placeholder) or has_substitution(text.split("/", 1)[0]):
            notes.append(
                f"{key} is {text}: the provider is known only when OpenCode runs; "
                "make sure its host is in the policy"
            )
            continue
        if "/" not in text or not text.split("/", 1)[0]:
            notes.append(f"{key} is {text!r}, not 'provider/model': OpenCode cannot use it")
            continue
        refs.setdefault(text.split("/", 1)[0], []).append(key)
    for pid in cfg.mapping("provider"):
        refs.setdefault(pid, []).append(f"provider.{pid} ({cfg.where(('provider', pid))})")

    disabled = {str(v) for v in _strs(cfg.get("disabled_providers"))}
    enabled_raw = cfg.get("enabled_providers")
    enabled = {str(v) for v in _strs(enabled_raw)} if isinstance(enabled_raw, list) else None
    used: list[ProviderUse] = []
    for pid in sorted(refs):
        if pid in disabled:
            if any(not r.startswith("provider.") for r in refs[pid]):
                notes.append(
                    f"provider {pid!r} is in disabled_providers but "
                    f"{refs[pid][0].split(' ')[0]} names it: OpenCode will not use it"
                )
            continue
        if enabled is not None and pid not in enabled:
            notes.append(f"provider {pid!r} is not in enabled_providers: OpenCode will not use it")
            continue
        use = ProviderUse(pid, refs[pid], BUILTIN_PROVIDERS.get(pid))
        for path in (
            ("provider", pid, "options", "baseURL"),
            ("provider", pid, "api"),
            ("provider", pid, "baseURL"),
        ):
            setting = url_setting(cfg, path)
            if setting is not None:
                use.url = setting
                break
        used.append(use)
    return Providers(used, notes)


def _strs(value: object) -> list[str | Placeholder]:
    return [v for v in value if isinstance(v, str | Placeholder)] if isinstance(value, list) else []


# -- OpenCode's own services ------------------------------------------------------------

Switch = Literal["on", "notify", "off", "unknown"]


def autoupdate(cfg: OpenCodeConfig) -> Switch:
    value = cfg.get("autoupdate")
    if value is None or value is True:
        return "on"  # OpenCode's default
    if value is False:
        return "off"
    if value == "notify":
        return "notify"
    return "unknown"


ShareMode = Literal["manual", "auto", "disabled", "unknown"]


def share(cfg: OpenCodeConfig) -> ShareMode:
    value = cfg.get("share")
    if value is None:
        return "auto" if cfg.get("autoshare") is True else "manual"  # OpenCode's default
    if value == "manual" or value == "auto" or value == "disabled":
        return value
    return "unknown"


def plugin_specs(cfg: OpenCodeConfig) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    plugins = cfg.get("plugin")
    for i, item in enumerate(plugins if isinstance(plugins, list) else []):
        spec = item[0] if isinstance(item, list) and item else item
        out.append((("plugin", i), str(spec)))
    return out


def is_npm_spec(spec: str) -> bool:
    """False for plugins loaded from a path or file: URL (nothing to download)."""
    return not spec.startswith(("file:", ".", "/", "~", "\\")) and not re.match(r"^[A-Za-z]:", spec)


@dataclass(frozen=True)
class McpServer:
    name: str
    kind: str
    where: str
    url: UrlSetting | None
    oauth: bool
    command: str | None


def mcp_servers(cfg: OpenCodeConfig) -> list[McpServer]:
    """Enabled MCP servers, by name."""
    out: list[McpServer] = []
    for name, server in sorted(cfg.mapping("mcp").items()):
        if not isinstance(server, dict) or server.get("enabled") is False:
            continue
        kind = str(server.get("type", ""))
        path: Path = ("mcp", name)
        url = url_setting(cfg, (*path, "url")) if kind == "remote" else None
        cmd = server.get("command")
        command = " ".join(map(str, cmd)) if isinstance(cmd, list) else None
        out.append(
            McpServer(name, kind, cfg.where(path), url, server.get("oauth") is not False, command)
        )
    return out


def remote_urls(cfg: OpenCodeConfig) -> list[UrlSetting]:
    """Remote ``instructions`` and ``skills.urls``: fetched by OpenCode at start-up."""
    out: list[UrlSetting] = []
    for i, item in enumerate(_strs(cfg.get("instructions"))):
        # local paths and globs are read from disk; a {env:} value may be either: unknown
        if isinstance(item, str) and item.lower().startswith(("http://", "https://")):
            setting = url_setting(cfg, ("instructions", i))
            if setting is not None:
                out.append(setting)
    for i, _ in enumerate(_strs(cfg.get("skills", "urls"))):
        setting = url_setting(cfg, ("skills", "urls", i))
        if setting is not None:
            out.append(setting)
    return out


@dataclass(frozen=True)
class ToolState:
    enabled: bool
    #: the settings that decided it, for comments and messages
    why: str


def webfetch(cfg: OpenCodeConfig) -> ToolState:
    """Is the webfetch tool on? Precedence as in OpenCode: ``permission.webfetch`` over
    ``tools.webfetch`` over ``permission`` as a whole / ``permission["*"]``; default on.
    An agent that turns it back on makes it reachable."""
    state = _tool_state(cfg, ())
    if state.enabled:
        return state
    for section in ("agent", "mode"):
        for name in sorted(cfg.mapping(section)):
            agent = _tool_state(cfg, (section, name), inherit=False)
            if agent.enabled:
                return agent
    return state


def _tool_state(cfg: OpenCodeConfig, base: Path, inherit: bool = True) -> ToolState:
    perm_path: Path = (*base, "permission")
    perm = cfg.get(*perm_path)
    tools = cfg.get(*base, "tools")
    where = cfg.where
    if isinstance(perm, dict) and "webfetch" in perm:
        p: Path = (*perm_path, "webfetch")
        return _action(perm["webfetch"], f"{dotted(p)} ({where(p)})")
    if isinstance(tools, dict) and "webfetch" in tools:
        p = (*base, "tools", "webfetch")
        v = tools["webfetch"]
        return ToolState(v is not False, f"{dotted(p)} ({where(p)})")
    if isinstance(perm, str | Placeholder):
        return _action(perm, f"{dotted(perm_path)} ({where(perm_path)})")
    if isinstance(perm, dict) and "*" in perm:
        p = (*perm_path, "*")
        return _action(perm["*"], f'{dotted(perm_path)}["*"] ({where(p)})')
    if not inherit:
        return ToolState(False, "")
    return ToolState(True, "OpenCode's default: no tools.webfetch or permission.webfetch")


def _action(value: object, why: str) -> ToolState:
    return ToolState(value != "deny", why)
