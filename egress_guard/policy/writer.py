"""Writing policy YAML: the pieces shared by the commands that generate policies
(``policy from-opencode``, ``audit learn``).

Every value is written as a plain scalar only when YAML cannot read it as anything else,
otherwise as a JSON string (JSON is YAML). Text that comes from outside (a config file,
an audit log) goes into comments only through ``comment_safe``, so it cannot start a line
of its own and write policy.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from egress_guard.policy.model import Clients, DenyRule, Network

_PLAIN_SCALAR = re.compile(r"^[a-z][a-z0-9_.-]*$")
#: plain scalars YAML 1.1 reads as booleans or null
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})
_NAME_BAD = re.compile(r"[^a-z0-9_-]+")


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through ``path.tmp`` and a rename, so a proxy reloading
    the policy reads the old file or the new one, never half of one. Raises ``OSError``."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def destination_name(raw: str, fallback: str = "destination") -> str:
    """A destination name ([a-z0-9][a-z0-9_-]{0,62}, the model's ``NAME_RE``) derived from
    an id or a host: what a generated policy may call a destination."""
    name = _NAME_BAD.sub("-", raw.lower()).lstrip("-_")
    name = re.sub(r"-{2,}", "-", name)[:63].rstrip("-_")
    return name or fallback


def comment_safe(text: str) -> str:
    """Text for a YAML comment: every line break and control character escaped."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def yaml_str(value: str) -> str:
    if _PLAIN_SCALAR.match(value) and value not in _YAML_WORDS:
        return value
    return json.dumps(value, ensure_ascii=True)


def flow_list(values: Sequence[str | int]) -> str:
    """``[a, "b c", 443]``."""
    return "[" + ", ".join(str(v) if isinstance(v, int) else yaml_str(v) for v in values) + "]"


def destination_lines(
    name: str, purpose: str, hosts: Sequence[str], ports: Sequence[int]
) -> list[str]:
    """One destination as list-item lines (indent them for ``destinations:``)."""
    return [
        f"- name: {yaml_str(name)}",
        f"  purpose: {json.dumps(purpose, ensure_ascii=True)}",
        f"  hosts: {flow_list(hosts)}",
        f"  ports: {flow_list(ports)}",
    ]


def deny_lines(rules: Sequence[DenyRule]) -> list[str]:
    """The items of a ``deny:`` section, indented by two spaces."""
    out: list[str] = []
    for rule in rules:
        out.append(f"  - hosts: {flow_list(rule.hosts)}")
        if rule.ports is not None:
            out.append(f"    ports: {flow_list(rule.ports)}")
        if rule.comment:
            out.append(f"    comment: {json.dumps(rule.comment, ensure_ascii=True)}")
    return out


def network_lines(network: Network) -> list[str]:
    """A whole ``network:`` section."""
    out = [
        "network:",
        f"  block_private: {'true' if network.block_private else 'false'}",
        f"  allow_cidrs: {flow_list(network.allow_cidrs)}",
    ]
    if network.resolve:
        out.append("  resolve:")
        for name, addrs in network.resolve.items():
            value = flow_list(addrs) if isinstance(addrs, list) else yaml_str(addrs)
            out.append(f"    {yaml_str(name)}: {value}")
    else:
        out.append("  resolve: {}")
    return out


def clients_lines(clients: Clients, relative_to: Path | None = None) -> list[str]:
    """A whole ``clients:`` section. A relative ``users_file`` is made absolute against
    ``relative_to`` (the folder of the policy it came from), so it names the same file
    wherever the new policy is written."""
    out = ["clients:", f"  allow_cidrs: {flow_list(clients.allow_cidrs)}"]
    if clients.auth is not None:
        users = Path(clients.auth.users_file)
        if not users.is_absolute() and relative_to is not None:
            users = (relative_to / users).absolute()
        out += ["  auth:", f"    users_file: {json.dumps(str(users), ensure_ascii=True)}"]
    return out
