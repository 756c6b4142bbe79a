"""Policy errors, and pydantic's validation errors in an operator's words.

A policy with three mistakes should take one ``validate`` run to fix, not three: every
error is reported, each with its ``file:line``. Unknown keys come first, with the key
the writer most likely meant (``hostz`` -> ``hosts``): a misspelt key is the usual cause
of the "missing required key" that follows it.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from egress_guard.policy.yamlsrc import Path, SourceDoc, SourceError


class PolicyError(SourceError):
    """A policy that cannot be loaded; ``render()`` gives ``file:line: message`` for
    each of its errors (``errors``: the first is this one)."""

    def __init__(
        self,
        file: str,
        line: int | None,
        message: str,
        hint: str | None = None,
        more: Sequence[SourceError] = (),
    ):
        self.more = tuple(more)
        super().__init__(file, line, message, hint)

    @property
    def errors(self) -> tuple[SourceError, ...]:
        return (SourceError(self.file, self.line, self.message, self.hint), *self.more)

    def render(self) -> str:
        first = super().render()
        if not getattr(self, "more", ()):
            return first
        return "\n".join([first, *(e.render() for e in self.more)])

    @classmethod
    def of(cls, errors: Sequence[SourceError]) -> PolicyError:
        """One PolicyError carrying ``errors`` (at least one), unknown keys first, then
        in file order."""
        ordered = sorted(
            errors,
            key=lambda e: ("unknown key " not in e.message, e.file, e.line or 0),
        )
        head = ordered[0]
        return cls(head.file, head.line, head.message, head.hint, ordered[1:])


def _tag_of(member: Any) -> str | None:
    for meta in typing.get_args(member)[1:]:
        tag = getattr(meta, "tag", None)
        if isinstance(tag, str):
            return tag
    return None


def model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model whose field ``loc`` names (``loc`` as pydantic reports it, union tags
    included), or None: where the keys a misspelt key could have meant are listed."""
    t: Any = root
    for part in loc:
        while typing.get_origin(t) is typing.Annotated:
            t = typing.get_args(t)[0]
        if isinstance(t, type) and issubclass(t, BaseModel):
            field = t.model_fields.get(str(part))
            if field is None:
                return None
            t = field.annotation
            continue
        origin, args = typing.get_origin(t), typing.get_args(t)
        if origin in (list, tuple, set, frozenset) and isinstance(part, int):
            t = args[0]
        elif origin is dict:
            t = args[1]
        elif origin in (typing.Union, types.UnionType):
            tagged = {_tag_of(a): a for a in args}
            t = tagged.get(str(part))
            if t is None:
                return None
        else:
            return None
    while typing.get_origin(t) is typing.Annotated:
        t = typing.get_args(t)[0]
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _shown(value: object) -> str:
    """A value as the YAML had it (``true``, not Python's ``True``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _plain(kind: str, msg: str, raw: object) -> str:
    """pydantic's message in plain words, with what was written when it helps."""
    msg = msg.removeprefix("Value error, ")
    value = _shown(raw)
    if kind == "int_type" or kind == "int_parsing":
        return f"must be a whole number, not {value}"
    if kind in ("string_type", "str_type"):
        return f"must be text, not {value}"
    if kind == "list_type":
        return f"must be a list (e.g. [a, b]), not {value}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping of keys to values, not {value}"
    if kind == "bool_type":
        return f"must be true or false, not {value}"
    if kind == "literal_error":
        return f"{msg.replace('Input should be', 'must be')}, not {value}"
    return msg.replace("Input should be", "must be")


def _where(loc: Sequence[str | int]) -> list[str | int]:
    """``loc`` without a union's tag (``destinations.0.destination.hosts``)."""
    out = list(loc)
    if len(out) > 2 and out[0] == "destinations" and out[2] in ("use", "destination"):
        del out[2]
    return out


def from_validation(doc: SourceDoc, err: ValidationError, root: type[BaseModel]) -> PolicyError:
    """Every error pydantic found in ``doc``, each at its line, in plain words."""
    found: list[SourceError] = []
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        where = _where(loc)
        path: Path = tuple(where)
        name = ".".join(str(p) for p in where)
        kind, hint = e["type"], None
        if kind == "extra_forbidden":
            key = str(loc[-1])
            parent = model_at(root, loc[:-1])
            close = difflib.get_close_matches(key, _keys(parent), n=1) if parent else []
            msg = f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            if parent is not None and not close:
                hint = f"the keys here are: {', '.join(_keys(parent))}"
            found.append(SourceError(doc.file, doc.line_of(path), f"{name}: {msg}", hint))
            continue
        if kind == "missing":
            msg = f"missing required key {loc[-1]!r}"
        else:
            msg = _plain(kind, e["msg"], e.get("input"))
        if kind == "literal_error" and where == ["version"]:
            hint = "this egress-guard reads policy version 1"
        elif kind == "literal_error" and isinstance(e.get("input"), bool):
            hint = "YAML reads a bare yes, no, on or off as true or false: quote it ('yes')"
        elif kind in ("int_type", "int_parsing"):
            hint = "write numbers in plain decimal without quotes, sign or leading zeros, e.g. 443"
        found.append(SourceError(doc.file, doc.line_of(path), f"{name}: {msg}", hint))
    return PolicyError.of(found)
