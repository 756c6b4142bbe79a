"""The values ``egress-guard doctor`` reads, judged on their own: proxy URLs, NO_PROXY
entries, CORS origins, OpenCode's flags; and where OpenCode's config files are.

None of this needs the policy: ``doctor`` and ``doctor_env`` turn these answers into
findings.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path as FsPath
from urllib.parse import urlsplit

from publicsuffixlist import PublicSuffixList

from egress_guard.normalize import NormalizationError, normalize_host
from egress_guard.opencode import contacts as oc
from egress_guard.opencode import jsonc
from egress_guard.opencode.doctor_report import Severity
from egress_guard.opencode.jsonc import JsoncDoc
from egress_guard.policy.patterns import is_public_suffix


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
