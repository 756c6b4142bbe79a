"""Generate ``docs/policy-reference.md`` from the policy models.

    python -m egress_guard.cli.docgen > docs/policy-reference.md

The reference is a walk over the pydantic models of the policy language
(``egress_guard.policy.model``), starting at ``PolicyFile``: every key, its type, its
default and its description, section by section, followed by the shipped presets and the
catalog (``policies/``). A key's description is its ``Field(description=...)`` in the
model, so a new policy key is described where it is declared; a key without one is an
error, so the reference cannot silently fall behind the language.

The output is deterministic (no dates, no paths of this machine): a test compares the
committed file with a fresh run, so a change to the models, presets or catalog that is not
followed by regenerating the reference fails the test suite.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from egress_guard.cli.exits import EXIT_ERROR, EXIT_OK
from egress_guard.policy import load_catalog, load_preset, policies_dir, preset_names
from egress_guard.policy import model as m

__all__ = ["main", "render"]

#: Value types with a name of their own in the reference, and the anchor that explains them.
_ALIASES: tuple[tuple[object, str, str], ...] = (
    (m.HostPatternStr, "host pattern", "host-patterns"),
    (m.Cidr, "CIDR", "cidrs-and-addresses"),
    (m.Port, "port", "ports"),
    (m.Method, "HTTP method", "http-methods"),
    (m.PathGlob, "path pattern", "path-patterns"),
    (m.DestName, "name", "names"),
    (m.DestinationItem, "catalog reference or destination", ""),
)

#: Extra prose for a section, by model class name (shown after the class docstring).
SECTION_NOTES: dict[str, str] = {
    "PolicyFile": (
        "Every mapping in a policy forbids unknown keys: a misspelt key is an error at "
        "load (with file, line and a hint), never a silently ignored setting."
    ),
    "Destination": (
        "`methods`, `paths` and `models` need TLS interception (`egress-guard run "
        "--inspect`) for HTTPS: without it, CONNECT tunnels to a destination that declares "
        "them are refused as `inspection_required` (audit mode: let through unchecked and "
        "recorded as `would_block`), and `run`, `validate` and `check` warn. Plain-HTTP "
        "requests get the rules without interception."
    ),
    "DenyRule": "Deny rules win over every destination, in every mode.",
    "Network": (
        "`resolve` answers take the place of DNS for those names and are checked like DNS "
        "answers (`block_private`, `allow_cidrs`, deny rules); the proxy connects to exactly "
        "the address it checked."
    ),
}


@dataclass(frozen=True)
class _Section:
    path: str
    model: type[BaseModel]


# -- types -----------------------------------------------------------------------------


def _alias(tp: object) -> tuple[str, str] | None:
    for alias, name, anchor in _ALIASES:
        if tp is alias or tp == alias:
            return name, anchor
    return None


def _anchor(model: type[BaseModel]) -> str:
    return f"model-{model.__name__.lower()}"


def _constraints(meta: list[Any]) -> list[str]:
    out: list[str] = []
    for c in meta:
        if isinstance(c, annotated_types.MinLen) and c.min_length:
            out.append(f"at least {c.min_length}")
        elif isinstance(c, annotated_types.MaxLen):
            out.append(f"at most {c.max_length}")
        elif isinstance(c, annotated_types.Ge):
            out.append(f">= {c.ge}")
        elif isinstance(c, annotated_types.Le):
            out.append(f"<= {c.le}")
        elif isinstance(c, FieldInfo):
            out.extend(_constraints(list(c.metadata)))
    return out


def render_type(tp: object) -> str:
    """A type annotation as reference text (Markdown)."""
    named = _alias(tp)
    if named is not None:
        name, anchor = named
        return f"[{name}](#{anchor})" if anchor else name
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Annotated:
        inner = render_type(args[0])
        extra = _constraints(list(args[1:]))
        if extra and args[0] is str:
            return f"{inner} ({' and '.join(extra)} characters)"
        return f"{inner} ({', '.join(extra)})" if extra else inner
    if origin is Literal:
        return " or ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(render_type(a) for a in args)
    if origin is list:
        return f"list of {render_type(args[0])}"
    if origin is dict:
        return f"mapping of {render_type(args[0])} to {render_type(args[1])}"
    if tp is type(None):
        return "`null`"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{_anchor(tp)})"
    simple = {str: "string", int: "integer", bool: "boolean", float: "number"}
    if isinstance(tp, type) and tp in simple:
        return simple[tp]
    raise TypeError(f"docgen: no rendering for type {tp!r}; teach render_type about it")


def _models_in(tp: object) -> Iterator[type[BaseModel]]:
    """BaseModel classes a type annotation refers to, in order of appearance."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield tp
        return
    for a in get_args(tp):
        yield from _models_in(a)


def _container_suffix(tp: object) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return _container_suffix(get_args(tp)[0])
    if origin is list:
        return "[]"
    if origin is dict:
        return ".<key>"
    if origin in (Union, types.UnionType):
        for a in get_args(tp):
            suffix = _container_suffix(a)
            if suffix:
                return suffix
    return ""


# -- descriptions ------------------------------------------------------------------------


def _all_models() -> list[type[BaseModel]]:
    return [
        v
        for v in vars(m).values()
        if isinstance(v, type) and issubclass(v, BaseModel) and v.__module__ == m.__name__
    ]


def _check_descriptions() -> None:
    """Every key of the language is described where it is declared: a key added without
    ``Field(description=...)`` fails here (and so the docs test), not silently in the
    reference as an empty cell."""
    bare = sorted(
        f"{cls.__name__}.{name}"
        for cls in _all_models()
        for name, info in cls.model_fields.items()
        if not info.description
    )
    if bare:
        raise RuntimeError(f"docgen: policy keys without Field(description=...): {bare}")


# -- defaults ----------------------------------------------------------------------------


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        factory = typing.cast(Callable[[], Any], info.default_factory)
        value = factory()
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return f"see [{type(value).__name__}](#{_anchor(type(value))})"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


# -- walking -----------------------------------------------------------------------------


def _walk(root: type[BaseModel], root_path: str) -> list[_Section]:
    sections: list[_Section] = []
    seen: set[type[BaseModel]] = set()

    def visit(model: type[BaseModel], path: str) -> None:
        if model in seen:
            return
        seen.add(model)
        sections.append(_Section(path, model))
        hints = typing.get_type_hints(model, include_extras=True)
        for name in _field_order(model):
            tp = hints[name]
            child_path = f"{path}.{name}" if path else name
            child_path += _container_suffix(tp)
            for child in _models_in(tp):
                visit(child, child_path)

    visit(root, root_path)
    return sections


def _field_order(model: type[BaseModel]) -> list[str]:
    """The model's own fields first, then inherited ones (a Destination's name before its
    inspect-mode rules)."""
    own = [f for f in getattr(model, "__annotations__", {}) if f in model.model_fields]
    return own + [f for f in model.model_fields if f not in own]


def _cell(text: str) -> str:
    """One table cell: one line, ``|`` escaped, ``<`` escaped outside code spans (GitHub
    would take ``<host>`` for an HTML tag)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _code(text: str) -> str:
    """A code span, unless the text already holds code spans of its own."""
    return text if "`" in text else f"`{text}`"


def _model_table(model: type[BaseModel], out: list[str]) -> None:
    hints = typing.get_type_hints(model, include_extras=True)
    out.append("| key | type | default | description |")
    out.append("|---|---|---|---|")
    for name in _field_order(model):
        info = model.model_fields[name]
        tp = hints[name]
        ftype = render_type(tp)
        extra = _constraints(list(info.metadata))
        if extra:
            ftype += f" ({', '.join(extra)})"
        desc = info.description or ""
        out.append(
            f"| `{name}` | {_cell(ftype)} | {_cell(_default(info))} | {_cell(desc) or ' '} |"
        )
    out.append("")


def _doc(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or ""
    if doc and any(doc == inspect.getdoc(b) for b in (BaseModel, m._Strict)):
        return ""
    return _md(" ".join(doc.split()))


def _md(text: str) -> str:
    """reStructuredText literals (``x``) as Markdown code spans (`x`)."""
    return text.replace("``", "`")


def _sections_md(sections: list[_Section], out: list[str], level: int = 3) -> None:
    for s in sections:
        title = f"`{s.path}`" if s.path else "Top level"
        out.append(f'<a id="{_anchor(s.model)}"></a>')
        out.append("")
        out.append(f"{'#' * level} {title} ({s.model.__name__})")
        out.append("")
        doc = _doc(s.model)
        if doc:
            out.append(doc)
            out.append("")
        if s.model.__name__ in SECTION_NOTES:
            out.append(SECTION_NOTES[s.model.__name__])
            out.append("")
        _model_table(s.model, out)


_VALUE_TYPES = f"""\
## Value types

### Host patterns

Every entry of a `hosts` list is one of:

| pattern | matches | example |
|---|---|---|
| exact name | that name only | `api.anthropic.com` |
| `*.` + name | subdomains of the name, not the name itself | `*.example.com` |
| `**.` + name | the name and all its subdomains | `**.example.com` |
| IP address | that address (any spelling of it in a request) | `192.0.2.10`, `2001:db8::1` |
| CIDR | every address in the range | `192.0.2.0/24` |

Names are compared after normalisation, the same way for patterns and requests: lower
case, one trailing dot removed, IDNA (UTS 46) A-labels. IP literals in requests are
canonicalised in every form (`127.1`, `2130706433`, `0x7f000001`, `::ffff:127.0.0.1`)
before they are matched or checked against private ranges. Refused at load, with the file,
line and a hint: `*` alone, wildcards over a public suffix (`*.com`, `*.co.uk`,
`*.github.io`), wildcards anywhere but the leftmost label, empty patterns and anything that
looks like a regular expression.

### CIDRs and addresses

An IPv4 or IPv6 network in CIDR notation (`10.0.0.0/8`, `fd00::/8`); a bare address is a
single host (`/32`, `/128`). Host bits must be zero.

### Ports

Decimal integers from 1 to 65535, written without quotes, sign or leading zeros.

### Names

Destination names, catalog entry names and preset names: `{m.NAME_RE}` (lower case
letters, digits, `_` and `-`; at most 63 characters). They are metric label values, so
their number is bounded by the policy, never by what clients send.

### HTTP methods

Upper-case method names, e.g. `GET`, `POST`.

### Path patterns

Shell-style globs that start with `/` and contain no query, fragment or spaces, e.g.
`/v1/*`.
"""


def _presets_md(out: list[str]) -> None:
    out.append("## Presets")
    out.append("")
    out.append(
        "Shipped in `policies/` and named in `include:`. `egress-guard run` without "
        "`--policy` uses `minimal`."
    )
    out.append("")
    out.append("| preset | destinations | denied hosts | description |")
    out.append("|---|---|---|---|")
    for name in preset_names():
        policy = load_preset(name)
        dests = ", ".join(f"`{d.name}`" for d in policy.destinations) or "none"
        denied = ", ".join(f"`{h}`" for rule in policy.deny for h in rule.hosts) or "none"
        text = (policies_dir() / f"{name}.yaml").read_text(encoding="utf-8")
        comment = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        out.append(f"| `{name}` | {dests} | {denied} | {_cell(' '.join(comment))} |")
    out.append("")


def _catalog_md(out: list[str]) -> None:
    out.append('<a id="catalog"></a>')
    out.append("")
    out.append("## Catalog")
    out.append("")
    out.append(
        "`policies/catalog.yaml` is OpenCode's destination table as data: every row of its "
        "network documentation plus the hosts OpenCode was observed to contact. A policy "
        "takes an entry with `- use: <name>`."
    )
    out.append("")
    out.append("| name | purpose | required | hosts | ports | turned off by | `use` |")
    out.append("|---|---|---|---|---|---|---|")
    for entry in load_catalog().values():
        hosts = ", ".join(f"`{h}`" for h in entry.hosts) or "(depends on configuration)"
        ports = ", ".join(str(p) for p in entry.ports)
        if entry.transport != "tcp":
            ports += f" ({entry.transport.upper()})"
        off = "; ".join(_code(d) for d in entry.disabled_by) or "not configurable"
        usable = "yes" if entry.usable is None else "no"
        out.append(
            f"| `{entry.name}` | {_cell(entry.purpose)} | {entry.required} | {_cell(hosts)} "
            f"| {ports} | {_cell(off)} | {usable} |"
        )
    out.append("")
    out.append("### catalog.yaml format")
    out.append("")
    _sections_md(_walk(m.Catalog, ""), out, level=4)


def render() -> str:
    """The whole reference, as Markdown text."""
    _check_descriptions()
    out: list[str] = [
        "# Policy reference",
        "",
        "<!-- Generated by `python -m egress_guard.cli.docgen > docs/policy-reference.md` from",
        "     egress_guard/policy/model.py and policies/. Do not edit by hand: a test fails",
        "     when this file and the generator's output differ. -->",
        "",
        "A policy is a YAML file, policy language version 1. Check one with "
        "`egress-guard validate FILE` and try it with `egress-guard check --policy FILE "
        "TARGET...`. `validate` reports every error in one run, each at its `file:line`: "
        "unknown keys first, with the key most likely meant (`hostz` -> did you mean "
        "`hosts`?); given the catalog (`policies/catalog.yaml`) it checks it as a catalog.",
        "",
        "```yaml",
        "version: 1",
        "mode: enforce",
        "include: [minimal]",
        "destinations:",
        "  - use: models-catalog",
        "  - name: corp-gateway",
        "    hosts: [llm.corp.example]",
        "    ports: [443]",
        "deny:",
        '  - hosts: ["**.pastebin.com"]',
        "network:",
        "  block_private: true",
        "  allow_cidrs: []",
        "  resolve: {}",
        "clients:",
        '  allow_cidrs: [127.0.0.0/8, "::1/128"]',
        "```",
        "",
        "## Keys",
        "",
    ]
    _sections_md(_walk(m.PolicyFile, ""), out)
    out.append(_VALUE_TYPES)
    _presets_md(out)
    _catalog_md(out)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["-"]):
        print(
            "usage: python -m egress_guard.cli.docgen > docs/policy-reference.md", file=sys.stderr
        )
        return EXIT_ERROR
    sys.stdout.write(render())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
