"""``egress-guard doctor``: what in OpenCode's config or environment defeats the guard.

Each finding has a severity, a message naming the setting (``file:line`` or the
environment variable) and the exact fix. Errors are what makes the setup leak or fail:
traffic that bypasses the proxy (proxy variables unset or pointing elsewhere, a NO_PROXY
wider than the local network, TLS checks turned off), traffic that cannot pass it (mDNS),
a config whose needs the policy blocks (the provider, auto-update), and an OpenCode server
that any web page may drive (CORS ``*``). Warnings are risky but working setups; info is
context. Exit 1 when there is an error, else 0.

Nothing here touches the network: the policy is checked by name with the engine
(``decide_target``), exactly as the proxy's first stage would.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path as FsPath
from typing import Literal
from urllib.parse import urlsplit

from publicsuffixlist import PublicSuffixList

from egress_guard.engine import Engine, Match
from egress_guard.normalize import NormalizationError, join_hostport, normalize_host
from egress_guard.opencode import contacts as oc
from egress_guard.opencode import jsonc
from egress_guard.opencode.config import OpenCodeConfig
from egress_guard.opencode.jsonc import JsoncDoc
from egress_guard.policy import CatalogEntry, EffectivePolicy
from egress_guard.policy.patterns import is_public_suffix
from egress_guard.policy.writer import comment_safe, destination_name

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER: Mapping[str, int] = {"error": 0, "warning": 1, "info": 2}
DEFAULT_PROXY_URL = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class Finding:
    severity: Severity
    check: str
    message: str
    fix: str
    source: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "severity": self.severity,
            "check": self.check,
            "message": self.message,
            "fix": self.fix,
            "source": self.source,
        }


@dataclass
class DoctorInput:
    cfg: OpenCodeConfig | None
    env: Mapping[str, str]
    policy: EffectivePolicy
    catalog: Mapping[str, CatalogEntry]
    policy_label: str = "the built-in minimal preset"
    proxy_url: str = DEFAULT_PROXY_URL
    inspect: bool = False
    #: files read when the config was discovered (not given): reported as info
    discovered: Sequence[str] | None = None
    checked_places: Sequence[str] = field(default_factory=tuple)


def truthy(value: str | None) -> bool:
    """OpenCode's flag test (``OPENCODE_DISABLE_*``): "true" or "1"."""
    return (value or "").strip().lower() in ("true", "1")


# -- proxy URLs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyTarget:
    scheme: str
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_proxy_url(value: str) -> ProxyTarget | None:
    """The proxy a ``*_PROXY`` value names (no scheme means http://, as curl reads it)."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
        hostname = parts.hostname
    except ValueError:
        return None
    if not hostname:
        return None
    try:
        host = normalize_host(hostname).value
    except NormalizationError:
        return None
    scheme = parts.scheme.lower()
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme, 1080)
    return ProxyTarget(scheme, host, port)


def redact(value: str) -> str:
    """A proxy URL without its password."""
    try:
        parts = urlsplit(value if "://" in value else "http://" + value)
    except ValueError:
        return value
    if parts.password is None and parts.username is None:
        return value
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return value.replace(parts.netloc, f"***@{netloc}", 1)


# -- NO_PROXY -----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _known_suffixes() -> PublicSuffixList:
    # is_public_suffix() also counts unknown TLDs (PSL's "*" rule), which is right for
    # wildcards in a policy; here a single intranet label ("buildhost") is not a TLD.
    return PublicSuffixList(accept_unknown=False)


def classify_no_proxy(entry: str) -> tuple[Severity, str] | None:
    """None when the entry only exempts local or site-internal names."""
    e = entry.strip().lower()
    if not e:
        return None
    if e in ("*", "*.", "."):
        return "error", "exempts every host: nothing goes through the guard"
    if "/" in e:
        try:
            net = ipaddress.ip_network(e, strict=False)
        except ValueError:
            return "warning", "is not a host, domain or CIDR that clients understand"
        if net.prefixlen == 0:
            return "error", "exempts every address"
        if net.is_loopback:
            return None
        return (
            "warning",
            f"exempts {net} from the guard: those connections are not checked or logged",
        )
    host = e
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.removeprefix("*.").lstrip(".")
    if "*" in host:
        return "warning", "has a wildcard inside it, which NO_PROXY matching does not understand"
    try:
        h = normalize_host(host)
    except NormalizationError:
        return "warning", "is not a valid host name"
    if h.ip is not None:
        if h.ip.is_loopback:
            return None
        return "warning", f"exempts {h.value} from the guard: not checked, not logged"
    name = h.value
    if name == "localhost" or name.endswith(".localhost"):
        return None
    if any(name == s or name.endswith("." + s) for s in oc.PRIVATE_SUFFIXES):
        return None
    if is_public_suffix(name):
        if "." in name or _known_suffixes().is_public(name):
            return (
                "error",
                f"covers the public suffix {name!r}: every site registered under it "
                "bypasses the guard",
            )
        return (
            "warning",
            f"exempts the single-label name {name!r} (and its subdomains) from the guard",
        )
    return "warning", f"exempts {name} and its subdomains from the guard: not checked, not logged"


def split_no_proxy(value: str) -> list[str]:
    return [p for p in value.replace(" ", ",").split(",") if p.strip()]


# -- CORS ---------------------------------------------------------------------------------


def cors_problem(origin: str) -> str | None:
    if origin.strip() == "*":
        return "'*' lets any web page drive the OpenCode server (and it is not supported)"
    if "*" in origin:
        return "wildcards are not supported: OpenCode matches origins exactly"
    if origin.strip().lower() == "null":
        return "'null' is the origin of sandboxed iframes and file: pages: any of them could drive the server"
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "is not an origin (scheme://host[:port])"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an origin (scheme://host[:port])"
    if parts.username is not None or parts.password is not None:
        return "an origin has no user or password"
    if parts.path or parts.query or parts.fragment:
        return "an origin has no path, query or trailing '/': browsers never send this, so it never matches"
    if origin != origin.strip() or any(c.isupper() for c in f"{parts.scheme}://{parts.netloc}"):
        return "browsers send origins in lower case without spaces: this never matches exactly"
    return None


# -- discovery ----------------------------------------------------------------------------


def discover(env: Mapping[str, str], cwd: FsPath) -> tuple[list[JsoncDoc], list[str]]:
    """The files OpenCode would merge, lowest precedence first, and the places looked at."""
    docs: list[JsoncDoc] = []
    places: list[str] = []
    base = env.get("XDG_CONFIG_HOME") or (
        str(FsPath(env["HOME"]) / ".config") if env.get("HOME") else ""
    )
    if base:
        for name in ("config.json", "opencode.json", "opencode.jsonc"):
            p = FsPath(base) / "opencode" / name
            places.append(str(p))
            if p.is_file():
                docs.append(jsonc.read_jsonc(p))
    if env.get("OPENCODE_CONFIG"):
        places.append(env["OPENCODE_CONFIG"])
        docs.append(jsonc.read_jsonc(env["OPENCODE_CONFIG"]))
    if not truthy(env.get("OPENCODE_DISABLE_PROJECT_CONFIG")):
        chain: list[FsPath] = []
        for d in (cwd, *cwd.parents):
            chain.append(d)
            if (d / ".git").exists():
                break
        for d in reversed(chain):  # the nearest file wins
            for name in ("opencode.jsonc", "opencode.json"):
                p = d / name
                places.append(str(p))
                if p.is_file():
                    docs.append(jsonc.read_jsonc(p))
    if env.get("OPENCODE_CONFIG_CONTENT"):
        places.append("OPENCODE_CONFIG_CONTENT")
        docs.append(jsonc.parse_jsonc(env["OPENCODE_CONFIG_CONTENT"], "OPENCODE_CONFIG_CONTENT"))
    return docs, places


# -- the checks ---------------------------------------------------------------------------


class _Doctor:
    def __init__(self, inp: DoctorInput) -> None:
        self.inp = inp
        self.cfg = inp.cfg if inp.cfg is not None else OpenCodeConfig({}, {}, ())
        self.env = inp.env
        self.engine = Engine(inp.policy, inp.catalog)
        self.out: list[Finding] = []

    def add(
        self, severity: Severity, check: str, message: str, fix: str, source: str | None = None
    ) -> None:
        self.out.append(Finding(severity, check, message, fix, source))

    def allowed(self, host: str, port: int) -> bool:
        return isinstance(self.engine.decide_target(host, port), Match)

    def where(self, *path: str) -> str | None:
        if self.inp.cfg is None or self.cfg.line_of(path) is None:
            return None
        return self.cfg.where(path)

    def entry(self, name: str | None) -> CatalogEntry | None:
        e = self.inp.catalog.get(name) if name else None
        return e if e is not None and e.usable is None else None

    # -- config ------------------------------------------------------------------------

    def config_files(self) -> None:
        if self.inp.discovered is None:
            if self.env.get("OPENCODE_CONFIG_CONTENT"):
                self.add(
                    "info",
                    "config",
                    "OPENCODE_CONFIG_CONTENT is set: OpenCode merges it over the file given, "
                    "and it was not checked here",
                    "run `egress-guard doctor` without a file to check the merged configuration",
                    "env:OPENCODE_CONFIG_CONTENT",
                )
            return
        if self.inp.discovered:
            self.add(
                "info",
                "config",
                "checked the merged configuration of: " + ", ".join(self.inp.discovered),
                "name a file to check just that one",
            )
        else:
            self.add(
                "info",
                "config",
                "no OpenCode config found (looked at "
                + ", ".join(self.inp.checked_places[:6])
                + (" ..." if len(self.inp.checked_places) > 6 else "")
                + "): OpenCode's defaults are checked",
                "pass the opencode.json to check as an argument",
            )

    def autoupdate(self) -> None:
        state = oc.autoupdate(self.cfg)
        if state == "off" or truthy(self.env.get("OPENCODE_DISABLE_AUTOUPDATE")):
            return
        entry = self.inp.catalog.get("opencode-update")
        if entry is None:
            return
        blocked = [h for h in entry.hosts if not self.allowed(h, entry.ports[0])]
        if not blocked:
            return
        value = self.cfg.get("autoupdate")
        desc = {
            "on": '"autoupdate": true'
            if value is not None
            else "autoupdate is not set (default true)",
            "notify": '"autoupdate": "notify" (it still checks for new versions)',
            "unknown": f"autoupdate is {value} (assumed on)",
        }[state]
        self.add(
            "error",
            "autoupdate",
            f"{desc}: OpenCode contacts {', '.join(blocked)}, which {self.inp.policy_label} "
            "blocks; every start-up produces blocked requests and updates cannot install",
            'set "autoupdate": false in opencode.json (or export OPENCODE_DISABLE_AUTOUPDATE=1), '
            "or add `- use: opencode-update` to the policy",
            self.where("autoupdate"),
        )

    def mdns(self) -> None:
        value = self.cfg.get("server", "mdns")
        if value is True:
            self.add(
                "error",
                "mdns",
                "server.mdns is true: mDNS is UDP multicast to 224.0.0.251/ff02::fb port 5353, "
                "which never passes an HTTP proxy (it goes around the guard, or fails)",
                'set "server": {"mdns": false} in opencode.json',
                self.where("server", "mdns"),
            )
        elif isinstance(value, jsonc.Placeholder):
            self.add(
                "warning",
                "mdns",
                f"server.mdns is {value}: known only when OpenCode runs",
                'set "server": {"mdns": false} in opencode.json',
                self.where("server", "mdns"),
            )

    def cors(self) -> None:
        origins = self.cfg.get("server", "cors")
        if not isinstance(origins, list):
            return
        for i, origin in enumerate(origins):
            if not isinstance(origin, str):
                continue
            problem = cors_problem(origin)
            if problem is not None:
                self.add(
                    "error",
                    "cors",
                    f"server.cors entry {origin!r}: {problem}",
                    "list exact origins only, e.g. "
                    '"server": {"cors": ["https://opencode.internal.example.com"]}',
                    self.cfg.where(("server", "cors", i)) if self.inp.cfg is not None else None,
                )

    def share(self) -> None:
        mode = oc.share(self.cfg)
        if mode == "disabled":
            return
        ent = oc.url_setting(self.cfg, ("enterprise", "url"))
        if ent is not None and ent.endpoint is not None:
            host, port = ent.endpoint.host, ent.endpoint.port
        elif ent is not None:
            host, port = f"the host of enterprise.url ({ent.raw})", 0
        else:
            host, port = "opncd.ai", 443
        if port and self.allowed(host, port):
            effect = f"sessions (code, prompts, outputs) can be uploaded to {host}"
        elif port:
            effect = f"the policy blocks {host}, so sharing fails (and each attempt is logged)"
        else:
            effect = f"sessions can be uploaded to {host}"
        desc = (
            'share is not set (default "manual")'
            if self.cfg.get("share") is None and self.cfg.get("autoshare") is None
            else f"share is {mode}"
        )
        self.add(
            "warning",
            "share",
            f"{desc}: {effect}",
            'set "share": "disabled" in opencode.json',
            self.where("share") or self.where("autoshare"),
        )

    def providers(self) -> None:
        if self.inp.cfg is None:
            return
        found = oc.providers(self.cfg)
        for note in found.notes:
            self.add(
                "warning", "provider", note, "name models as provider/model; see opencode.json"
            )
        if not found.used:
            self.add(
                "warning",
                "provider",
                "no provider is named in the config (model, small_model, agents, provider): "
                "OpenCode picks one from your credentials, and it cannot be checked here",
                'set "model": "provider/model" in opencode.json',
            )
        for p in found.used:
            self.provider(p)

    def provider(self, p: oc.ProviderUse) -> None:
        source = p.refs[0].rsplit(" (", 1)[-1].rstrip(")") if p.refs else None
        name = p.catalog or p.id
        target: tuple[str, int] | None = None
        if p.url is not None:
            source = p.url.where
            if p.url_ignored:
                self.add(
                    "warning",
                    "provider",
                    f"provider.{p.id}.baseURL is ignored by OpenCode 1.18, which reads "
                    f"provider.{p.id}.options.baseURL: OpenCode does not use {p.url.raw!r}",
                    f'move it: "provider": {{"{p.id}": {{"options": {{"baseURL": "{p.url.raw}"}}}}}}',
                    source,
                )
            ep = p.url.endpoint
            if ep is not None:
                target = (ep.host, ep.port)
                if ep.scheme == "http" and not ep.loopback:
                    self.add(
                        "info" if ep.site_internal else "warning",
                        "provider",
                        f"provider {p.id} uses plain http:// to {ep.host}: prompts and API keys "
                        "cross the network in clear",
                        f"use https:// in {p.url.key}",
                        source,
                    )
            elif p.url.unresolved:
                self.add(
                    "warning",
                    "provider",
                    f"provider {p.id}: {p.url.key} is {p.url.raw!r}, known only when OpenCode "
                    "runs; its host cannot be checked against the policy",
                    "check the expanded host with `egress-guard check --policy FILE HOST:PORT`",
                    source,
                )
                return
            else:
                self.add(
                    "error",
                    "provider",
                    f"provider {p.id}: {p.url.key} {p.url.raw!r} is unusable: {p.url.problem}",
                    f"write {p.url.key} as an absolute https:// URL",
                    source,
                )
                return
        else:
            entry = self.entry(p.catalog)
            if entry is None:
                self.add(
                    "warning",
                    "provider",
                    f"provider {p.id} is not in the catalog and sets no options.baseURL: "
                    "its API host cannot be checked",
                    f"make sure the policy has a destination for {p.id}'s API host",
                    source,
                )
                return
            target = (entry.hosts[0], entry.ports[0])
        host, port = target
        decision = self.engine.decide_target(host, port)
        if isinstance(decision, Match):
            return
        entry = self.entry(p.catalog)
        if entry is not None and host in entry.hosts and port in entry.ports:
            fix = f"add `- use: {entry.name}` to the policy"
        else:
            fix = (
                f"add a destination to the policy: {{name: {destination_name(name, 'provider')}, hosts: [{host}], "
                f"ports: [{port}]}} (`egress-guard policy from-opencode` writes it)"
            )
        self.add(
            "error",
            "provider",
            f"provider {p.id} ({', '.join(p.refs)}) calls {join_hostport(host, port)}, which "
            f"{self.inp.policy_label} does not allow ({decision.reason})",
            fix,
            source,
        )

    def mcp(self) -> None:
        for server in oc.mcp_servers(self.cfg):
            if server.kind != "remote" or server.url is None or server.url.endpoint is None:
                continue
            ep = server.url.endpoint
            if not self.allowed(ep.host, ep.port):
                self.add(
                    "warning",
                    "mcp",
                    f"remote MCP server {server.name} at {join_hostport(ep.host, ep.port)} is not "
                    f"allowed by {self.inp.policy_label}: its tools will fail",
                    f"add a destination for {ep.host} port {ep.port}, or set "
                    f'"mcp": {{"{server.name}": {{"enabled": false}}}}',
                    server.url.where,
                )

    def plugins(self) -> None:
        npm = [(p, s) for p, s in oc.plugin_specs(self.cfg) if oc.is_npm_spec(s)]
        entry = self.inp.catalog.get("npm-registry")
        if not npm or entry is None:
            return
        if all(self.allowed(h, entry.ports[0]) for h in entry.hosts):
            return
        self.add(
            "warning",
            "plugins",
            f"plugins {', '.join(s for _, s in npm)} install from registry.npmjs.org, which "
            f"{self.inp.policy_label} blocks: they load only if already installed",
            "pre-install the plugins into OpenCode's config directory, or add "
            "`- use: npm-registry` to the policy",
            self.cfg.where(npm[0][0]) if self.inp.cfg is not None else None,
        )

    def webfetch(self) -> None:
        state = oc.webfetch(self.cfg)
        if state.enabled:
            self.add(
                "info",
                "webfetch",
                f"the webfetch tool is on ({state.why}): the agent can read any host the policy "
                "allows; other hosts are blocked and logged",
                'if the agent needs no web pages, set "permission": {"webfetch": "deny"}',
            )

    def models_fetch(self) -> None:
        if truthy(self.env.get("OPENCODE_DISABLE_MODELS_FETCH")):
            return
        if self.allowed("models.opencode.ai", 443):
            return
        self.add(
            "info",
            "models-fetch",
            "OpenCode fetches models.opencode.ai at start-up, which the policy blocks: each start "
            "logs a blocked request (OpenCode falls back to its bundled model list)",
            "export OPENCODE_DISABLE_MODELS_FETCH=1, or add `- use: models-catalog` to the policy",
            "env:OPENCODE_DISABLE_MODELS_FETCH",
        )

    # -- environment -------------------------------------------------------------------

    def proxy_env(self) -> None:
        guard = parse_proxy_url(self.inp.proxy_url)
        assert guard is not None  # checked by the CLI
        for var, kind in (("HTTPS_PROXY", "HTTPS"), ("HTTP_PROXY", "plain-HTTP")):
            present = [(n, self.env[n]) for n in (var, var.lower()) if self.env.get(n, "").strip()]
            if not present:
                self.add(
                    "error",
                    "proxy-env",
                    f"{var} is not set: OpenCode's {kind} requests go straight out, "
                    "unchecked and unlogged",
                    f"export {var}={self.inp.proxy_url} in the environment that starts OpenCode",
                    f"env:{var}",
                )
                continue
            for name, value in present:
                self.proxy_value(name, value, guard)

    def proxy_value(self, name: str, value: str, guard: ProxyTarget) -> None:
        shown = redact(value)
        target = parse_proxy_url(value)
        fix = f"export {name}={self.inp.proxy_url}"
        if target is None:
            self.add(
                "error", "proxy-env", f"{name}={shown!r} is not a proxy URL", fix, f"env:{name}"
            )
        elif target.scheme != "http":
            self.add(
                "error",
                "proxy-env",
                f"{name}={shown!r}: egress-guard is a plain http:// proxy "
                f"(TLS goes inside CONNECT); a {target.scheme}:// proxy URL does not reach it",
                fix,
                f"env:{name}",
            )
        elif (target.host, target.port) == (guard.host, guard.port):
            return
        elif target.loopback and guard.loopback and target.port == guard.port:
            self.add(
                "warning",
                "proxy-env",
                f"{name}={shown!r} names the guard's port on another loopback spelling than "
                f"{self.inp.proxy_url} (localhost may resolve to ::1 where the guard does not listen)",
                fix,
                f"env:{name}",
            )
        else:
            self.add(
                "error",
                "proxy-env",
                f"{name}={shown!r} does not point at the guard ({self.inp.proxy_url}): "
                "OpenCode's traffic goes around it",
                fix + " (or pass the guard's address with --proxy-url)",
                f"env:{name}",
            )

    def no_proxy(self) -> None:
        for var in ("NO_PROXY", "no_proxy"):
            value = self.env.get(var)
            if not value:
                continue
            for entry in split_no_proxy(value):
                verdict = classify_no_proxy(entry)
                if verdict is None:
                    continue
                severity, why = verdict
                self.add(
                    severity,
                    "no-proxy",
                    f"{var} entry {entry.strip()!r} {why}",
                    f"remove {entry.strip()!r} from {var}; keep only local names "
                    "(localhost,127.0.0.1,::1,.local) and allow real destinations in the policy",
                    f"env:{var}",
                )

    def tls(self) -> None:
        if (self.env.get("NODE_TLS_REJECT_UNAUTHORIZED") or "").strip() == "0":
            self.add(
                "error",
                "tls",
                "NODE_TLS_REJECT_UNAUTHORIZED=0 turns off certificate checks: any interceptor "
                "on the path can read and change OpenCode's traffic",
                "unset NODE_TLS_REJECT_UNAUTHORIZED; for inspect mode trust the guard's CA with "
                "NODE_EXTRA_CA_CERTS",
                "env:NODE_TLS_REJECT_UNAUTHORIZED",
            )
        if not self.inp.inspect:
            return
        fix = (
            "egress-guard ca export -o guard-ca.pem, then export "
            "NODE_EXTRA_CA_CERTS=$PWD/guard-ca.pem for OpenCode"
        )
        path = (self.env.get("NODE_EXTRA_CA_CERTS") or "").strip()
        if not path:
            self.add(
                "error",
                "ca",
                "inspect mode intercepts TLS, but NODE_EXTRA_CA_CERTS is not set: OpenCode "
                "will refuse the guard's certificates",
                fix,
                "env:NODE_EXTRA_CA_CERTS",
            )
            return
        try:
            pem = FsPath(path).read_text(encoding="ascii", errors="replace")
        except OSError as e:
            self.add(
                "error",
                "ca",
                f"NODE_EXTRA_CA_CERTS={path!r} cannot be read ({e.strerror or e})",
                fix,
                "env:NODE_EXTRA_CA_CERTS",
            )
            return
        if "-----BEGIN CERTIFICATE-----" not in pem:
            self.add(
                "error",
                "ca",
                f"NODE_EXTRA_CA_CERTS={path!r} holds no PEM certificate",
                fix,
                "env:NODE_EXTRA_CA_CERTS",
            )

    def run(self) -> list[Finding]:
        self.config_files()
        self.proxy_env()
        self.no_proxy()
        self.tls()
        self.autoupdate()
        self.mdns()
        self.cors()
        self.providers()
        self.share()
        self.mcp()
        self.plugins()
        self.webfetch()
        self.models_fetch()
        return sorted(self.out, key=lambda f: SEVERITY_ORDER[f.severity])


def diagnose(inp: DoctorInput) -> list[Finding]:
    """Every finding, errors first."""
    return _Doctor(inp).run()


def render_text(findings: Sequence[Finding]) -> Iterator[str]:
    for f in findings:
        where = f"{f.source}: " if f.source else ""
        # values from opencode.json and the environment: no line breaks or escapes reach
        # the terminal
        yield comment_safe(f"{f.severity.upper():<8} [{f.check}] {where}{f.message}")
        yield comment_safe(f"         fix: {f.fix}")
    counts = {s: sum(1 for f in findings if f.severity == s) for s in SEVERITY_ORDER}
    yield (
        f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info"
        + ("" if counts["error"] else ": no errors")
    )
