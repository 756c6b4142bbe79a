"""One OpenCode configuration: files merged the way OpenCode merges them, shape-checked.

What OpenCode would refuse in the keys egress-guard reads is refused here too, with the
file and line (``ConfigError``). What the configuration makes OpenCode contact is
``contacts``; the JSONC reading is ``jsonc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Literal

from egress_guard.opencode.jsonc import ConfigError, JsoncDoc, Path, Placeholder, read_jsonc

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
