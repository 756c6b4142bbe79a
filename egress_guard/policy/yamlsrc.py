"""YAML reading that remembers where every value came from.

Pydantic reports errors by path (``destinations.2.hosts.0``); operators fix files by line.
Composing the YAML node tree ourselves gives both: plain data for validation and a map
from each path to its line. Duplicate mapping keys are an error here, unlike in PyYAML,
because in a security policy the second ``deny:`` silently replacing the first is a hole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


class SourceError(ValueError):
    """An error tied to a file position: rendered as ``file:line: message``."""

    def __init__(self, file: str, line: int | None, message: str, hint: str | None = None):
        self.file = file
        self.line = line
        self.message = message
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


@dataclass
class SourceDoc:
    file: str
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    #: values still allowed to be built; aliases (``*name``) must not multiply a small
    #: file into millions of values ("billion laughs")
    budget: int = field(default=0, repr=False)

    def line_of(self, path: Path) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), None)

    def error(self, path: Path, message: str, hint: str | None = None) -> SourceError:
        return SourceError(self.file, self.line_of(path), message, hint)


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader without timestamp/date magic: every scalar stays str, int, float, bool."""


_INT_TAG = "tag:yaml.org,2002:int"
#: Plain decimal only. YAML 1.1 would read ``ports: [0443]`` as octal 291, ``0x1bb`` as
#: 443, ``+443`` and ``4_43`` as 443 and ``1:30`` as 90: a port is written one way, or
#: it stays a string and validation rejects it.
_DECIMAL_INT = re.compile(r"^(?:0|-?[1-9][0-9]*)$")

# Dates and other implicit types would turn "2024-01-01" or "1:30" into non-strings.
_StrictSafeLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:timestamp", _INT_TAG)]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "-0123456789":
    _StrictSafeLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, (_INT_TAG, _DECIMAL_INT)
    )


def _convert(node: yaml.Node, path: Path, doc: SourceDoc, loader: _StrictSafeLoader) -> Any:
    doc.lines[path] = node.start_mark.line + 1
    doc.budget -= 1
    if doc.budget < 0:
        raise doc.error(
            path,
            "the document expands to more values than the file has characters",
            "YAML aliases (*name) may not multiply the document; write the values out",
        )
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise doc.error(path, "YAML merge keys (<<) are not supported in policies")
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | bool):
                raise SourceError(
                    doc.file, key_node.start_mark.line + 1, "mapping keys must be scalars"
                )
            if key in out:
                raise SourceError(
                    doc.file,
                    key_node.start_mark.line + 1,
                    f"duplicate key {key!r}",
                    "each key may appear once; merge the two entries",
                )
            child = (*path, str(key))
            out[key] = _convert(value_node, child, doc, loader)
            doc.lines[child] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), doc, loader) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def parse_yaml(text: str, file: str) -> SourceDoc:
    """Parse one YAML document into data plus a path-to-line map."""
    # Without aliases a document cannot hold more values than characters.
    doc = SourceDoc(file=file, data=None, budget=len(text) + 1000)
    loader = _StrictSafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SourceError(file, 1, "the file is empty", "a policy starts with 'version: 1'")
        doc.data = _convert(node, (), doc, loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise SourceError(file, line, f"YAML syntax error: {e.problem or e}") from e
    except yaml.YAMLError as e:
        raise SourceError(file, None, f"YAML error: {e}") from e
    except RecursionError:
        raise SourceError(file, None, "the document is nested too deeply") from None
    finally:
        loader.dispose()
    return doc
