"""Readers for the deployment files under docker/: Dockerfile, .dockerignore, compose
variable interpolation, and metric names in PromQL. Small on purpose: each understands
the subset of its format the shipped files use, and fails loudly on anything else."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"


# -- YAML ------------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[Any]:
    """Every document of a (multi-document) YAML file, empty documents dropped."""
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_objects() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml_docs(path):
            if isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc:
                if doc["kind"] == "Kustomization":
                    continue
                doc["__file__"] = str(path.relative_to(ROOT))
                out.append(doc)
    return out


def k8s_one(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} under docker/k8s, found {len(found)}"
    return found[0]


# -- Dockerfile ------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    stage = -1
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(p for p in buf if p)
        buf = []
        keyword, _, args = joined.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), start, stage))
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction (ENTRYPOINT, CMD, HEALTHCHECK CMD)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@dataclass(frozen=True)
class Dockerfile:
    instructions: list[Instruction]

    @classmethod
    def load(cls, path: Path = DOCKER / "Dockerfile") -> Dockerfile:
        return cls(parse_dockerfile(path.read_text(encoding="utf-8")))

    @property
    def final_stage(self) -> int:
        return max(i.stage for i in self.instructions)

    def final(self, keyword: str) -> list[Instruction]:
        return [
            i for i in self.instructions if i.keyword == keyword and i.stage == self.final_stage
        ]

    def last(self, keyword: str) -> Instruction:
        found = self.final(keyword)
        assert found, f"the final stage has no {keyword}"
        return found[-1]

    @property
    def entrypoint(self) -> list[str]:
        return exec_form(self.last("ENTRYPOINT").args)

    @property
    def cmd(self) -> list[str]:
        return exec_form(self.last("CMD").args)

    @property
    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for inst in self.final("ENV"):
            for token in shlex.split(inst.args):
                key, sep, value = token.partition("=")
                assert sep, f"ENV without '=' (line {inst.line}): {token}"
                out[key] = value
        return out

    @property
    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        args = self.last("HEALTHCHECK").args
        opts: dict[str, str] = {}
        while args.startswith("--"):
            opt, _, args = args.partition(" ")
            k, _, v = opt[2:].partition("=")
            opts[k] = v
            args = args.strip()
        keyword, _, rest = args.partition(" ")
        assert keyword.upper() == "CMD", f"HEALTHCHECK must be 'CMD [...]', got {args!r}"
        return opts, exec_form(rest.strip())

    @property
    def exposed(self) -> set[int]:
        ports: set[int] = set()
        for inst in self.final("EXPOSE"):
            ports.update(int(p.split("/")[0]) for p in inst.args.split())
        return ports

    @property
    def volumes(self) -> list[str]:
        out: list[str] = []
        for inst in self.final("VOLUME"):
            out.extend(exec_form(inst.args) if inst.args.startswith("[") else inst.args.split())
        return out

    def copies(self) -> Iterator[tuple[list[str], str, Instruction]]:
        """(sources, destination, instruction) of every COPY from the build context."""
        for inst in self.instructions:
            if inst.keyword != "COPY":
                continue
            parts = inst.args.split()
            if any(p.startswith("--from") for p in parts):
                continue
            parts = [p for p in parts if not p.startswith("--")]
            yield parts[:-1], parts[-1], inst


def flag_value(argv: list[str], flag: str) -> str:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in an argument vector."""
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {argv}")


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def url_hostport(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    return parts.hostname, parts.port


# -- .dockerignore ---------------------------------------------------------------------


def _glob_re(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += fnmatch.translate(pattern[i : end + 1])[4:-3]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """Docker's rules: patterns in order, the last match wins, ``!`` re-includes, and a
    pattern that matches a parent directory matches everything under it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        self.negations: list[str] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:] if negate else line
            pattern = pattern.strip().strip("/")
            self.rules.append((negate, _glob_re(pattern)))
            if negate:
                self.negations.append(pattern)

    def excluded(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negate, rx in self.rules:
            if any(rx.match(c) for c in candidates):
                result = not negate
        return result

    def may_reinclude(self, directory: str) -> bool:
        """Whether a ``!`` pattern could re-include something under an excluded
        directory (if not, a walk need not enter it)."""
        return any(
            n.startswith(("*", "?", "[")) or n == directory or n.startswith(directory + "/")
            for n in self.negations
        )


def build_context(root: Path = ROOT) -> list[Path]:
    """The files ``docker build`` sends from ``root`` under its .dockerignore."""
    ignore = DockerIgnore((root / ".dockerignore").read_text(encoding="utf-8"))
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        rel_dir = base.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not ignore.excluded(prefix + d) or ignore.may_reinclude(prefix + d)
        )
        for name in sorted(filenames):
            if not ignore.excluded(prefix + name):
                out.append(base / name)
    return sorted(out)


# -- compose -----------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation over a parsed document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        current = env.get(name)
        if op in (":-", "-"):
            empty = current is None or (op == ":-" and current == "")
            return arg if empty else str(current)
        if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
            raise AssertionError(f"compose requires ${name}: {arg}")
        return current or ""

    return _VAR.sub(sub, value)


def env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {raw!r}"
        out[key.strip()] = value.strip()
    return out


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    doc = yaml_docs(DOCKER / "compose.yaml")[0]
    result: dict[str, Any] = interpolate(doc, env or {})
    return result


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a service's bind mounts (short or long syntax)."""
    out: list[tuple[str, str, bool]] = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            src, target = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
            if src.startswith((".", "/", "~")):
                out.append((src, target, ro))
        elif v.get("type") == "bind":
            out.append((v["source"], v["target"], bool(v.get("read_only"))))
    return out


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(e.split("=", 1) for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# -- PromQL ----------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
#: label lists: aggregation grouping, and vector matching (``on``, ``group_left``...)
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
#: PromQL functions, keywords and aggregations the shipped expressions may use
PROMQL_WORDS = frozenset(
    [
        "sum",
        "by",
        "without",
        "rate",
        "irate",
        "increase",
        "histogram_quantile",
        "count",
        "max",
        "min",
        "avg",
        "and",
        "or",
        "unless",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "topk",
        "bottomk",
        "delta",
        "abs",
        "clamp_min",
        "absent",
        "offset",
        "le",
    ]
)


def strip_strings(expr: str) -> str:
    return re.sub(r'"[^"]*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects (identifiers that are not PromQL words,
    label names or durations)."""
    text = re.sub(r"\[[^\]]*\]", "", strip_strings(expr))  # range selectors
    text = _GROUPING.sub("", text)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\$\w+", "", text)  # grafana variables
    return {t for t in _IDENT.findall(text) if t not in PROMQL_WORDS}


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value)]) for every ``metric{...}`` in the expression."""
    return [(m.group(1), _MATCHER.findall(m.group(2))) for m in _SELECTOR.finditer(expr)]


def grouping_labels(expr: str) -> set[str]:
    out: set[str] = set()
    for m in _GROUPING.finditer(expr):
        out.update(x.strip() for x in m.group(1).split(",") if x.strip())
    return out


def dashboard_exprs(doc: Any) -> list[str]:
    """Every ``expr`` in a Grafana dashboard (panels, nested row panels, targets)."""
    found: list[str] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "expr" and isinstance(v, str):
                found.append(v)
            else:
                found.extend(dashboard_exprs(v))
    elif isinstance(doc, list):
        for v in doc:
            found.extend(dashboard_exprs(v))
    return found
