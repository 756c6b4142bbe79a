"""Policy loading: hints, includes, presets and the rest of the loader's behaviour.

Every rejection of DESIGN.md section 3 naming ``file:LINE:`` is a file under
``tests/testdata/bad_policies/``, checked by test_bad_policy_files.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from egress_guard.policy import (
    PolicyError,
    load_policy,
    load_policy_text,
    load_preset,
)

P = pytest.param

DEST = ["version: 1", "destinations:", "  - name: api", "    hosts: [api.example.com]"]

# The refusals with their file:line live as files: tests/testdata/bad_policies/ (see
# test_bad_policy_files.py).


#: Advice, not an echo of the input: none of these fragments occur in the broken line.
HINTED = [
    P(["version: 1", "destinations:", "  - use: mdns"], "mdns", id="mdns-hint"),
    P(
        ["version: 1", "destinations:", "  - use: webfetch"],
        "add a destination naming the hosts",
        id="webfetch-hint",
    ),
    P(["version: 1", "include: [maximal]"], "minimal, offline, standard", id="preset-hint"),
    P(["version: 1", "destinations:", "  - use: nosuch"], "anthropic", id="use-hint"),
    P(["version: 1", "destinatons: []"], "did you mean 'destinations'?", id="unknown-key-hint"),
    P([*DEST, "    ports: [0443]"], "plain decimal", id="port-hint"),
    P([*DEST[:3], "    hosts: ['*.com']"], "registrable domain", id="suffix-hint"),
    P([*DEST[:3], "    hosts: ['^api']"], "'*.example.com'", id="regex-hint"),
]


@pytest.mark.parametrize(("lines", "fragment"), HINTED)
def test_rejection_carries_a_hint(
    policy_error: Callable[[str], tuple[Path, str]], lines: list[str], fragment: str
) -> None:
    _, rendered = policy_error("\n".join(lines) + "\n")
    # advice is either a separate "hint:" line or part of the message itself
    advice = rendered.split(": ", 2)[-1]
    assert fragment in advice, rendered


def test_use_mdns_hint_says_how_to_turn_it_off(
    policy_error: Callable[[str], tuple[Path, str]],
) -> None:
    _, rendered = policy_error("version: 1\ndestinations:\n  - use: mdns\n")
    assert "UDP" in rendered and '"mdns": false' in rendered


def test_line_seven(policy_error: Callable[[str], tuple[Path, str]]) -> None:
    text = (
        "# comment\n"
        "version: 1\n"
        "mode: enforce\n"
        "destinations:\n"
        "  - name: anthropic\n"
        "    hosts:\n"
        "      - '*.com'\n"
    )
    path, rendered = policy_error(text)
    assert rendered.startswith(f"{path}:7: destinations.0.hosts.0: ")


def test_empty_file(policy_error: Callable[[str], tuple[Path, str]]) -> None:
    path, rendered = policy_error("")
    assert rendered.startswith(f"{path}:1: the file is empty")


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"version: 1\n# caf\xe9\n")
    with pytest.raises(PolicyError) as info:
        load_policy(p)
    assert info.value.render().startswith(f"{p}:2: ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "nope.yaml")
    assert "cannot read policy" in info.value.render()


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ["version: 1", "a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    with pytest.raises(PolicyError) as info:
        load_policy_text("\n".join(lines) + "\n", "bomb.yaml")
    assert "expands to more values" in info.value.render()


def test_aliases_that_do_not_multiply_are_fine() -> None:
    pol = load_policy_text(
        "version: 1\ndestinations:\n"
        "  - name: a\n    hosts: &h [a.example.com, b.example.com]\n"
        "  - name: b\n    hosts: *h\n    ports: [8443]\n",
        "alias.yaml",
    )
    assert [d.hosts for d in pol.destinations] == [["a.example.com", "b.example.com"]] * 2


def test_deep_nesting_is_a_policy_error() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text("version: 1\nx: " + "[" * 800 + "]" * 800 + "\n", "deep.yaml")
    assert "nested too deeply" in info.value.render()


@pytest.mark.parametrize(
    "text",
    [
        P(
            "version: 1\ndestinations:\n  - name: a\n    hosts: [a.example.com]\n  - name: a\n    hosts: [b.example.com]\n",
            id="duplicate-name",
        ),
        P("version: 1\nx: 1\nx: 2\n", id="duplicate-key"),
        P("version: 1\ninclude: [nope]\n", id="unknown-preset"),
        P("version: 1\ndestinations:\n  - use: mdns\n", id="use-mdns"),
        P("", id="empty"),
        P("version: [\n", id="syntax"),
    ],
)
def test_every_load_error_is_a_policy_error(text: str) -> None:
    """Callers (CLI, reload) catch PolicyError: no error may escape as another class."""
    with pytest.raises(PolicyError):
        load_policy_text(text, "x.yaml")


# -- what a valid policy loads to ---------------------------------------------------------

FULL = """\
version: 1
mode: audit
include: [minimal]
destinations:
  - use: npm-registry
  - name: internal
    purpose: internal gateway
    hosts: ["API.Internal.Example.COM.", "*.svc.example.com", "**.bücher.de", "10.20.0.0/16", "0x7f.1"]
    ports: [443, 8443]
    methods: [POST]
    paths: ["/v1/*"]
    models: [m1]
deny:
  - hosts: ["**.evil.example"]
    ports: [443]
network:
  block_private: true
  allow_cidrs: [192.168.50.0/24]
  resolve:
    Static.Example.com.: [1.1.1.1]
clients:
  allow_cidrs: [10.1.0.0/16]
"""


def test_full_policy_loads_canonical(write_policy: Callable[[str, str], Path]) -> None:
    path = write_policy(FULL, "full.yaml")
    pol = load_policy(path)
    assert pol.mode == "audit"
    assert [d.name for d in pol.destinations] == [
        "anthropic",
        "opencode-auth",
        "npm-registry",
        "internal",
    ]
    internal = pol.destinations[3]
    assert internal.hosts == [
        "api.internal.example.com",
        "*.svc.example.com",
        "**.xn--bcher-kva.de",
        "10.20.0.0/16",
        "127.0.0.1",
    ]
    assert internal.ports == [443, 8443]
    assert internal.needs_inspection
    assert pol.destinations[0].ports == [443]  # the default
    assert pol.origins["internal"] == f"{path}:6"
    assert pol.origins["npm-registry"] == f"{path}:5"
    assert "(included from " + f"{path}:3)" in pol.origins["anthropic"]
    # the included minimal preset brings its metadata deny rule first
    assert pol.deny_origins[-1] == f"{path}:14"
    assert pol.deny_origins[0].endswith("minimal.yaml:12")
    assert "169.254.169.254" in pol.deny[0].hosts
    assert pol.deny[-1].ports == [443]
    assert pol.network.allow_cidrs == ["192.168.50.0/24"]
    assert pol.clients.allow_cidrs == ["10.1.0.0/16"]
    assert len(pol.sha256) == 64


def test_fingerprint_ignores_layout_but_not_content() -> None:
    a = load_policy_text(FULL, "a.yaml")
    b = load_policy_text(
        "# a comment\n" + FULL.replace("ports: [443, 8443]", "ports:  [443,8443]"), "b.yaml"
    )
    c = load_policy_text(FULL.replace("ports: [443, 8443]", "ports: [443]"), "c.yaml")
    assert a.sha256 == b.sha256
    assert a.sha256 != c.sha256


def test_same_catalog_entry_twice_is_merged() -> None:
    pol = load_policy_text(
        "version: 1\ninclude: [minimal]\ndestinations:\n  - use: anthropic\n", "x.yaml"
    )
    assert [d.name for d in pol.destinations] == ["anthropic", "opencode-auth"]


def test_defaults() -> None:
    pol = load_policy_text("version: 1\n", "x.yaml")
    assert pol.mode == "enforce"
    assert pol.destinations == () and pol.deny == ()
    assert pol.network.block_private is True
    assert pol.clients.allow_cidrs == ["127.0.0.0/8", "::1/128"]


def test_timestamps_stay_strings() -> None:
    pol = load_policy_text(
        "version: 1\ndestinations:\n  - name: a\n    purpose: 2024-01-01\n    hosts: [a.example.com]\n",
        "x.yaml",
    )
    assert pol.destinations[0].purpose == "2024-01-01"


def test_unknown_preset_by_name() -> None:
    with pytest.raises(PolicyError) as info:
        load_preset("maximal")
    assert "unknown preset 'maximal'" in info.value.render()


def test_destination_name_unlisted_is_reserved(tmp_path: Path) -> None:
    """'unlisted' labels unmatched traffic in metrics and audit: no rule may be called that."""
    from egress_guard.policy import PolicyError, load_policy

    f = tmp_path / "p.yaml"
    f.write_text("version: 1\ndestinations:\n  - name: unlisted\n    hosts: [a.example.com]\n")
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    assert f"{f}:3:" in e.value.render() and "reserved" in e.value.render()
