"""Imports go one way, down the layers: policy -> engine -> proxy / sinks -> cli.

A module that imports upward (the engine reaching for mitmproxy code, a sink for the
proxy, the proxy for a command's argument parsing) is how "the engine holds the
security logic" stops being true without anyone deciding it. This reads every module's
imports (``import`` and ``from ... import``, also inside functions) with ``ast``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "egress_guard"

#: what each layer may import from egress_guard (besides itself and the shared modules)
SHARED = {"egress_guard", "egress_guard.normalize"}
ALLOWED: dict[str, set[str]] = {
    "policy": set(),
    "engine": {"policy"},
    "sinks": {"policy", "engine"},
    "proxy": {"policy", "engine", "sinks"},
    "opencode": {"policy", "engine"},
    "cli": {"policy", "engine", "sinks", "proxy", "opencode"},
}
#: third-party packages a layer must not import
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "policy": {"mitmproxy", "prometheus_client"},
    "engine": {"mitmproxy", "prometheus_client", "logging"},
    "sinks": {"mitmproxy"},
    # the proxy takes its settings as a RunSettings value, not a command line
    "proxy": {"argparse"},
}


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "_policies" not in p.parts)


def test_every_layer_is_a_package() -> None:
    for layer in ALLOWED:
        assert (PKG / layer / "__init__.py").is_file(), layer
    flat = sorted(p.name for p in PKG.glob("*.py"))
    assert flat == ["__init__.py", "addon.py", "normalize.py"], flat


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_only_downward(path: Path) -> None:
    rel = path.relative_to(PKG)
    if len(rel.parts) == 1:
        return  # addon.py (the mitmdump entry), normalize.py, __init__.py
    layer = rel.parts[0]
    allowed = ALLOWED[layer] | {layer}
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN_THIRD_PARTY.get(layer, set()), f"{rel} imports {name}"
        if not name.startswith("egress_guard.") or name in SHARED:
            continue
        target = name.split(".")[1]
        if target in ALLOWED:
            assert target in allowed, f"{rel} ({layer}) imports {name} ({target})"
