"""Read OpenCode's configuration the way OpenCode (1.18) reads it, without running OpenCode.

Format. opencode.json and opencode.jsonc are both JSONC: ``//`` and ``/* */`` comments
outside strings, trailing commas in objects and arrays. A ``//`` inside a string (every
URL) is text, not a comment. Duplicate keys: the last one wins, as in ``JSON.parse``.

Substitutions. OpenCode replaces ``{env:VAR}`` and ``{file:path}`` in the raw text before
parsing, so they may stand inside a string (``"https://{env:HOST}/v1"``) or as a whole
value (``"autoupdate": {env:AU}``). We never resolve them: a policy generated on one
machine must not depend on that machine's environment, and a ``{file:}`` is usually an
API key. Inside a string they stay literal text; as a whole value they parse to a
``Placeholder``. Code that needs the value treats both as unknown and says so.

Analysis. The functions at the end answer "what does this configuration make OpenCode
contact": the providers in use and their endpoints, auto-update, sharing, plugins, remote
MCP servers, remote instructions and skills, the webfetch tool. ``policygen`` turns the
answers into a policy; ``doctor`` checks them against one.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Literal
from urllib.parse import urlsplit

from egress_guard.normalize import NormalizationError, normalize_host
from egress_guard.policy.yamlsrc import SourceError

Path = tuple[str | int, ...]

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 200

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

_PLACEHOLDER = re.compile(r"\{(env|file):([^{}\r\n]*)\}")
_SCHEME_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)$", re.S)


class ConfigError(SourceError):
    """An opencode.json OpenCode would refuse (or we cannot read): ``file:line: message``."""


@dataclass(frozen=True, slots=True)
class Placeholder:
    """A whole value written as ``{env:VAR}`` or ``{file:path}``: known only at run time."""

    text: str

    @property
    def kind(self) -> str:
        return self.text[1:].split(":", 1)[0]

    def __str__(self) -> str:
        return self.text


def has_substitution(text: str) -> bool:
    return _PLACEHOLDER.search(text) is not None


# -- JSONC ---------------------------------------------------------------------------------


@dataclass
class JsoncDoc:
    file: str
    data: dict[str, object]
    #: path -> line of the key (members) or of the value (array items)
    lines: dict[Path, int]


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_STR_CHUNK = re.compile(r'[^"\\\x00-\x1f]+')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_WS = " \t\r\n\v\f\u00a0\ufeff"


class _Parser:
    """Recursive descent over the text: positions give ``file:line`` for every value."""

    def __init__(self, text: str, file: str) -> None:
        self.s = text
        self.n = len(text)
        self.i = 0
        self.file = file
        self.lines: dict[Path, int] = {}
        self._newlines = [k for k, c in enumerate(text) if c == "\n"]

    def line(self, pos: int) -> int:
        return bisect_left(self._newlines, pos) + 1

    def error(self, message: str, pos: int | None = None) -> ConfigError:
        p = min(self.i if pos is None else pos, self.n)
        k = bisect_left(self._newlines, p)
        col = p - (self._newlines[k - 1] + 1 if k else 0) + 1
        return ConfigError(self.file, k + 1, f"JSON syntax error: {message} (column {col})")

    def peek(self) -> str:
        return self.s[self.i] if self.i < self.n else ""

    def skip(self) -> None:
        s, n = self.s, self.n
        while self.i < n:
            c = s[self.i]
            if c in _WS:
                self.i += 1
            elif s.startswith("//", self.i):
                ends = [j for j in (s.find("\n", self.i), s.find("\r", self.i)) if j >= 0]
                self.i = min(ends) if ends else n
            elif s.startswith("/*", self.i):
                end = s.find("*/", self.i + 2)
                if end < 0:
                    raise self.error("unterminated /* comment")
                self.i = end + 2
            else:
                return

    def document(self) -> object:
        self.skip()
        if self.i >= self.n:
            raise self.error("the file is empty; expected a JSON object")
        value = self.value((), 0)
        self.skip()
        if self.i < self.n:
            raise self.error("unexpected text after the end of the top-level value")
        return value

    def value(self, path: Path, depth: int) -> object:
        if depth > MAX_DEPTH:
            raise self.error(f"nested more than {MAX_DEPTH} levels deep")
        c = self.peek()
        if c == "{":
            m = _PLACEHOLDER.match(self.s, self.i)
            if m is not None:
                self.i = m.end()
                return Placeholder(m.group(0))
            return self.obj(path, depth)
        if c == "[":
            return self.arr(path, depth)
        if c == '"':
            return self.string()
        for word, val in (("true", True), ("false", False), ("null", None)):
            if self.s.startswith(word, self.i):
                self.i += len(word)
                return val
        m = _NUMBER.match(self.s, self.i)
        if m is not None and m.end() > self.i:
            self.i = m.end()
            text = m.group(0)
            return float(text) if (m.group(1) or m.group(2)) else int(text)
        if not c:
            raise self.error("unexpected end of file; expected a value")
        raise self.error(f"unexpected character {c!r}; expected a value")

    def obj(self, path: Path, depth: int) -> dict[str, object]:
        start = self.i
        self.i += 1
        out: dict[str, object] = {}
        self.skip()
        if self.peek() == "}":
            self.i += 1
            return out
        while True:
            if self.peek() != '"':
                if not self.peek():
                    raise self.error("unterminated object", start)
                raise self.error("expected a property name in double quotes")
            key_pos = self.i
            key = self.string()
            self.skip()
            if self.peek() != ":":
                raise self.error(f"expected ':' after property name {key!r}")
            self.i += 1
            self.skip()
            member: Path = (*path, key)
            self.lines[member] = self.line(key_pos)
            out.pop(key, None)  # last one wins, and keeps its own position in the order
            out[key] = self.value(member, depth + 1)
            value_end = self.i
            self.skip()
            c = self.peek()
            if c == ",":
                self.i += 1
                self.skip()
                if self.peek() == "}":  # trailing comma
                    self.i += 1
                    return out
                continue
            if c == "}":
                self.i += 1
                return out
            if not c:
                raise self.error("unterminated object", start)
            # point at the value that lacks its comma, not at the next line's key
            raise self.error("expected ',' or '}' after this property value", value_end)

    def arr(self, path: Path, depth: int) -> list[object]:
        start = self.i
        self.i += 1
        out: list[object] = []
        self.skip()
        if self.peek() == "]":
            self.i += 1
            return out
        while True:
            item: Path = (*path, len(out))
            self.lines[item] = self.line(self.i)
            out.append(self.value(item, depth + 1))
            value_end = self.i
            self.skip()
            c = self.peek()
            if c == ",":
                self.i += 1
                self.skip()
                if self.peek() == "]":
                    self.i += 1
                    return out
                continue
            if c == "]":
                self.i += 1
                return out
            if not c:
                raise self.error("unterminated array", start)
            raise self.error("expected ',' or ']' after this array item", value_end)

    def string(self) -> str:
        start = self.i
        self.i += 1
        s = self.s
        buf: list[str] = []
        while True:
            if self.i >= self.n:
                raise self.error("unterminated string", start)
            c = s[self.i]
            if c == '"':
                self.i += 1
                return "".join(buf)
            if c == "\\":
                esc = s[self.i + 1] if self.i + 1 < self.n else ""
                if esc in _ESCAPES and esc:
                    buf.append(_ESCAPES[esc])
                    self.i += 2
                elif esc == "u":
                    buf.append(self._unicode_escape())
                else:
                    raise self.error(f"invalid escape \\{esc} in a string")
                continue
            if ord(c) < 0x20:
                raise self.error("control character in a string (write it as an escape)")
            m = _STR_CHUNK.match(s, self.i)
            assert m is not None
            buf.append(m.group(0))
            self.i = m.end()

    def _unicode_escape(self) -> str:
        hex1 = self.s[self.i + 2 : self.i + 6]
        if not _HEX4.fullmatch(hex1):
            raise self.error("invalid \\u escape (four hex digits expected)")
        cp = int(hex1, 16)
        self.i += 6
        if 0xD800 <= cp < 0xDC00 and self.s.startswith("\\u", self.i):
            hex2 = self.s[self.i + 2 : self.i + 6]
            if _HEX4.fullmatch(hex2) and 0xDC00 <= int(hex2, 16) < 0xE000:
                self.i += 6
                return chr(0x10000 + ((cp - 0xD800) << 10) + (int(hex2, 16) - 0xDC00))
        return chr(cp)


def parse_jsonc(text: str, file: str) -> JsoncDoc:
    """Parse JSONC text whose top level must be an object, or raise ConfigError."""
    if text.startswith("\ufeff"):
        text = text[1:]
    p = _Parser(text, file)
    data = p.document()
    if not isinstance(data, dict):
        raise ConfigError(file, 1, "an OpenCode config must be a JSON object ({...})")
    return JsoncDoc(file, data, p.lines)


def read_jsonc(path: str | FsPath) -> JsoncDoc:
    p = FsPath(path)
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(str(p), None, f"file is larger than {MAX_FILE_BYTES} bytes")
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(p), None, f"cannot read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(str(p), line, "file is not valid UTF-8") from e
    return parse_jsonc(text, str(p))


# -- the configuration -------------------------------------------------------------------


@dataclass
class OpenCodeConfig:
    """One configuration: a single file, or several merged the way OpenCode merges them."""

    data: dict[str, object]
    #: path -> (file, line) where that key was written
    origins: dict[Path, tuple[str, int]] = field(default_factory=dict)
    files: tuple[str, ...] = ()

    @classmethod
    def from_doc(cls, doc: JsoncDoc) -> OpenCodeConfig:
        cfg = cls(doc.data, {p: (doc.file, n) for p, n in doc.lines.items()}, (doc.file,))
        validate(cfg)
        return cfg

    @classmethod
    def merged(cls, docs: Sequence[JsoncDoc]) -> OpenCodeConfig:
        """Later files override earlier ones key by key; ``plugin`` lists are joined."""
        data: dict[str, object] = {}
        origins: dict[Path, tuple[str, int]] = {}
        for doc in docs:
            cls.from_doc(doc)  # each file must be valid on its own, as OpenCode checks
            data = _merge(data, doc.data)
            origins.update({p: (doc.file, n) for p, n in doc.lines.items()})
        return cls(data, origins, tuple(d.file for d in docs))

    def get(self, *path: str | int) -> object:
        cur: object = self.data
        for key in path:
            if isinstance(key, str) and isinstance(cur, dict):
                cur = cur.get(key)
            elif isinstance(key, int) and isinstance(cur, list) and 0 <= key < len(cur):
                cur = cur[key]
            else:
                return None
        return cur

    def mapping(self, *path: str) -> dict[str, object]:
        v = self.get(*path)
        return v if isinstance(v, dict) else {}

    def line_of(self, path: Path) -> tuple[str, int] | None:
        p = tuple(path)
        while p:
            if p in self.origins:
                return self.origins[p]
            p = p[:-1]
        return None

    def where(self, path: Path) -> str:
        """``file:line`` of a key (or of its nearest ancestor)."""
        hit = self.line_of(path)
        if hit is None:
            return self.files[-1] if self.files else "opencode.json"
        return f"{hit[0]}:{hit[1]}"

    def error(self, path: Path, message: str, hint: str | None = None) -> ConfigError:
        hit = self.line_of(path)
        file = hit[0] if hit else (self.files[-1] if self.files else "opencode.json")
        return ConfigError(file, hit[1] if hit else None, f"{dotted(path)}: {message}", hint)


def dotted(path: Path) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else p for p in path).replace(".[", "[")


def _merge(base: dict[str, object], top: dict[str, object]) -> dict[str, object]:
    out = dict(base)
    for k, v in top.items():
        old = out.get(k)
        if isinstance(old, dict) and isinstance(v, dict):
            out[k] = _merge(old, v)
        elif k == "plugin" and isinstance(old, list) and isinstance(v, list):
            out[k] = old + [p for p in v if p not in old]
        else:
            out[k] = v
    return out


def load_config(path: str | FsPath) -> OpenCodeConfig:
    """Read and check one opencode.json / opencode.jsonc, or raise ConfigError."""
    return OpenCodeConfig.from_doc(read_jsonc(path))


# -- shape checks: what OpenCode itself would refuse, in the keys we read -----------------

_Kind = Literal["str", "bool", "list", "dict", "strlist", "autoupdate", "share", "permission"]


def _ok(value: object, kind: _Kind) -> bool:
    if isinstance(value, Placeholder):
        return kind not in ("list", "dict", "strlist")
    match kind:
        case "str":
            return isinstance(value, str)
        case "bool":
            return isinstance(value, bool)
        case "list":
            return isinstance(value, list)
        case "dict":
            return isinstance(value, dict)
        case "strlist":
            return isinstance(value, list) and all(isinstance(v, str | Placeholder) for v in value)
        case "autoupdate":
            return isinstance(value, bool) or value == "notify"
        case "share":
            return value in ("manual", "auto", "disabled")
        case "permission":
            return value in ("allow", "ask", "deny") or isinstance(value, dict)
    return False  # pragma: no cover


_EXPECTED = {
    "str": "a string",
    "bool": "true or false",
    "list": "an array",
    "dict": "an object",
    "strlist": "an array of strings",
    "autoupdate": 'true, false or "notify"',
    "share": '"manual", "auto" or "disabled"',
    "permission": '"allow", "ask", "deny" or an object',
}


def _check(cfg: OpenCodeConfig, path: Path, kind: _Kind) -> None:
    value = cfg.get(*path)
    if value is None:
        return
    if not _ok(value, kind):
        raise cfg.error(path, f"must be {_EXPECTED[kind]}, not {_describe(value)}")


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if len(value) < 60 else "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "null" if value is None else type(value).__name__


def validate(cfg: OpenCodeConfig) -> None:
    """Raise ConfigError (file:line) for values of a shape OpenCode's schema refuses."""
    top: list[tuple[Path, _Kind]] = [
        (("model",), "str"),
        (("small_model",), "str"),
        (("autoupdate",), "autoupdate"),
        (("share",), "share"),
        (("autoshare",), "bool"),
        (("disabled_providers",), "strlist"),
        (("enabled_providers",), "strlist"),
        (("provider",), "dict"),
        (("mcp",), "dict"),
        (("plugin",), "list"),
        (("tools",), "dict"),
        (("permission",), "permission"),
        (("server",), "dict"),
        (("server", "mdns"), "bool"),
        (("server", "cors"), "strlist"),
        (("agent",), "dict"),
        (("mode",), "dict"),
        (("enterprise",), "dict"),
        (("enterprise", "url"), "str"),
        (("instructions",), "strlist"),
        (("skills",), "dict"),
        (("skills", "urls"), "strlist"),
    ]
    for path, kind in top:
        _check(cfg, path, kind)
    for pid in cfg.mapping("provider"):
        _check(cfg, ("provider", pid), "dict")
        _check(cfg, ("provider", pid, "options"), "dict")
        _check(cfg, ("provider", pid, "options", "baseURL"), "str")
        _check(cfg, ("provider", pid, "api"), "str")
        _check(cfg, ("provider", pid, "baseURL"), "str")
    for name in cfg.mapping("mcp"):
        _check(cfg, ("mcp", name), "dict")
        _check(cfg, ("mcp", name, "url"), "str")
        _check(cfg, ("mcp", name, "enabled"), "bool")
    for section in ("agent", "mode"):
        for name in cfg.mapping(section):
            _check(cfg, (section, name), "dict")
            _check(cfg, (section, name, "model"), "str")
            _check(cfg, (section, name, "tools"), "dict")
            _check(cfg, (section, name, "permission"), "permission")
    plugins = cfg.get("plugin")
    for i, spec in enumerate(plugins if isinstance(plugins, list) else []):
        if isinstance(spec, list):
            spec = spec[0] if spec else None
        if not isinstance(spec, str | Placeholder):
            raise cfg.error(("plugin", i), "must be a package name (or [name, options])")


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
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


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


def iter_unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
