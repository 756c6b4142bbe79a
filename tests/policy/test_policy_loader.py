"""Policy loading: every rejection of DESIGN.md section 3 names ``file:LINE:`` and says why.

Each case is written line by line; ``line`` is the 1-based line that holds the mistake, so
an error that points anywhere else fails the test.
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

REJECTIONS = [
    # unknown keys, at every level
    P(
        ["version: 1", "mode: enforce", "destinatons: []"],
        3,
        "unknown key 'destinatons'",
        id="unknown-top-key",
    ),
    P([*DEST, "    port: [443]"], 5, "unknown key 'port'", id="unknown-destination-key"),
    P(
        ["version: 1", "network:", "  block_privte: false"],
        3,
        "unknown key 'block_privte'",
        id="unknown-network-key",
    ),
    P(
        ["version: 1", "deny:", "  - hosts: [a.example.com]", "    port: 443"],
        4,
        "unknown key 'port'",
        id="unknown-deny-key",
    ),
    P(
        ["version: 1", "clients:", "  allow_cidr: [127.0.0.0/8]"],
        3,
        "unknown key 'allow_cidr'",
        id="unknown-clients-key",
    ),
    P(
        ["version: 1", "destinations:", "  - use: anthropic", "    ports: [8443]"],
        4,
        "unknown key 'ports'",
        id="use-with-extra-key",
    ),
    # wildcards
    P(
        [
            "version: 1",
            "destinations:",
            "  - name: api",
            "    hosts:",
            "      - api.example.com",
            "      - '*'",
        ],
        6,
        "would allow every host",
        id="star-alone",
    ),
    P([*DEST[:3], "    hosts: ['**']"], 4, "would allow every host", id="double-star-alone"),
    P([*DEST[:3], "    hosts: ['*.com']"], 4, "public suffix 'com'", id="star-dot-com"),
    P([*DEST[:3], "    hosts: ['**.com']"], 4, "public suffix 'com'", id="double-star-dot-com"),
    P([*DEST[:3], "    hosts: ['*.co.uk']"], 4, "public suffix 'co.uk'", id="star-dot-co-uk"),
    P(
        [*DEST[:3], "    hosts: ['*.github.io']"],
        4,
        "public suffix 'github.io'",
        id="star-private-suffix",
    ),
    P([*DEST[:3], "    hosts: ['api.*.com']"], 4, "api.*.com", id="wildcard-middle"),
    P(
        [*DEST[:3], "    hosts: ['a*.example.com']"],
        4,
        "wildcard may only be the whole leftmost label",
        id="wildcard-partial-label",
    ),
    P([*DEST[:3], "    hosts: ['example.*']"], 4, "example.*", id="wildcard-rightmost"),
    P(
        ["version: 1", "deny:", "  - hosts: ['*.com']"],
        3,
        "public suffix 'com'",
        id="deny-star-dot-com",
    ),
    # empty hosts
    P([*DEST[:3], "    hosts: ['']"], 4, "empty host pattern", id="empty-host"),
    P([*DEST[:3], "    hosts: []"], 4, "at least 1 item", id="empty-host-list"),
    P(
        [*DEST[:3], "    hosts: [' api.example.com']"],
        4,
        "surrounding spaces",
        id="host-with-space",
    ),
    P([*DEST[:3], "    hosts: [1234]"], 4, "valid string", id="host-not-a-string"),
    # ports
    P([*DEST, "    ports:", "      - 0"], 6, "greater than or equal to 1", id="port-0"),
    P([*DEST, "    ports: [65536]"], 5, "less than or equal to 65535", id="port-65536"),
    P([*DEST, '    ports: ["443"]'], 5, "valid integer", id="port-quoted-string"),
    P([*DEST, "    ports: [0443]"], 5, "valid integer", id="port-leading-zero-not-octal"),
    P([*DEST, "    ports: [0x1bb]"], 5, "valid integer", id="port-hex"),
    P([*DEST, "    ports: [+443]"], 5, "valid integer", id="port-plus"),
    P([*DEST, "    ports: [true]"], 5, "valid integer", id="port-bool"),
    P([*DEST, "    ports: [443.0]"], 5, "valid integer", id="port-float"),
    P([*DEST, "    ports: []"], 5, "at least 1 item", id="port-list-empty"),
    P(
        ["version: 1", "deny:", "  - hosts: [a.example.com]", "    ports: [70000]"],
        4,
        "less than or equal to 65535",
        id="deny-port-70000",
    ),
    # duplicates
    P(
        [*DEST, "  - name: api", "    hosts: [b.example.com]"],
        5,
        "duplicate destination name 'api'",
        id="duplicate-name",
    ),
    P(
        [
            "version: 1",
            "include: [minimal]",
            "destinations:",
            "  - name: anthropic",
            "    hosts: [x.example.com]",
        ],
        4,
        "duplicate destination name 'anthropic'",
        id="duplicate-name-with-preset",
    ),
    P(
        [*DEST[:3], "    hosts: [api.example.com, API.Example.com.]"],
        4,
        "listed twice",
        id="duplicate-host-canonical",
    ),
    P([*DEST, "    ports: [443, 443]"], 5, "listed twice", id="duplicate-port"),
    # invalid CIDRs
    P([*DEST[:3], "    hosts: [10.0.0.1/8]"], 4, "not a valid CIDR", id="cidr-host-bits"),
    P([*DEST[:3], "    hosts: [300.0.0.0/8]"], 4, "not a valid CIDR", id="cidr-octet-300"),
    P([*DEST[:3], "    hosts: [10.0.0.0/33]"], 4, "not a valid CIDR", id="cidr-prefix-33"),
    P(
        [*DEST[:3], "    hosts: [0.0.0.0/0]"],
        4,
        "would allow every address",
        id="cidr-everything-v4",
    ),
    P([*DEST[:3], "    hosts: ['::/0']"], 4, "would allow every address", id="cidr-everything-v6"),
    P(
        [*DEST[:3], "    hosts: ['::ffff:0.0.0.0/96']"],
        4,
        "would allow every address",
        id="cidr-everything-v4-mapped",
    ),
    P(
        ["version: 1", "network:", "  allow_cidrs: [10.0.0.1/8]"],
        3,
        "not a valid CIDR",
        id="allow-cidrs-host-bits",
    ),
    P(
        ["version: 1", "clients:", "  allow_cidrs:", "    - 127.0.0.0/8", "    - 300.0.0.0/8"],
        5,
        "not a valid CIDR",
        id="client-cidr-invalid",
    ),
    # regex-looking strings
    P(
        [*DEST[:3], "    hosts: ['.*\\.example\\.com']"],
        4,
        "looks like a regular expression",
        id="regex-dot-star",
    ),
    P([*DEST[:3], "    hosts: ['^api']"], 4, "looks like a regular expression", id="regex-caret"),
    P(
        [*DEST[:3], "    hosts: ['api.example.com$']"],
        4,
        "looks like a regular expression",
        id="regex-dollar",
    ),
    P(
        [*DEST[:3], "    hosts: ['(api|www).example.com']"],
        4,
        "looks like a regular expression",
        id="regex-alternation",
    ),
    P(
        [*DEST[:3], "    hosts: ['[a-z]+.example.com']"],
        4,
        "looks like a regular expression",
        id="regex-class",
    ),
    # YAML structure
    P(
        [
            "version: 1",
            "deny:",
            "  - hosts: [a.example.com]",
            "deny:",
            "  - hosts: [b.example.com]",
        ],
        4,
        "duplicate key 'deny'",
        id="duplicate-yaml-key",
    ),
    P(
        [*DEST[:3], "    name: api2", "    hosts: [api.example.com]"],
        4,
        "duplicate key 'name'",
        id="duplicate-yaml-key-nested",
    ),
    P(
        ["version: 1", "network:", "  <<: {block_private: false}"],
        3,
        "merge keys",
        id="yaml-merge-key",
    ),
    P(
        ["version: 1", "mode: enforce", "destinations: foo: bar"],
        3,
        "YAML syntax error",
        id="yaml-syntax",
    ),
    P(
        ["version: 1", "mode: audit", "destinations:", "\t- name: a"],
        4,
        "YAML syntax error",
        id="yaml-tab",
    ),
    P(["- version: 1"], 1, "must be a mapping", id="not-a-mapping"),
    P(["version: 2"], 1, "Input should be 1", id="version-2"),
    P(["mode: enforce"], 1, "missing required key 'version'", id="version-missing"),
    P(["version: 1", "mode: permissive"], 2, "'enforce' or 'audit'", id="mode-invalid"),
    P(
        ["version: 1", "destinations:", "  - name: Bad Name", "    hosts: [a.example.com]"],
        3,
        "should match pattern",
        id="name-invalid",
    ),
    # presets and catalog references
    P(
        ["version: 1", "include:", "  - minimal", "  - maximal"],
        4,
        "unknown preset 'maximal'",
        id="unknown-preset",
    ),
    P(
        ["version: 1", "include: [catalog]"],
        2,
        "unknown preset 'catalog'",
        id="catalog-is-not-a-preset",
    ),
    P(
        ["version: 1", "destinations:", "  - use: anthropic", "  - use: nosuch"],
        4,
        "no catalog entry named 'nosuch'",
        id="unknown-use",
    ),
    P(
        ["version: 1", "destinations:", "  - use: anthropic", "  - use: mdns"],
        4,
        "cannot use 'mdns'",
        id="use-mdns",
    ),
    P(
        ["version: 1", "destinations:", "  - use: webfetch"],
        3,
        "cannot use 'webfetch'",
        id="use-webfetch",
    ),
    P(
        ["version: 1", "destinations:", "  - use: remote-config"],
        3,
        "cannot use 'remote-config'",
        id="use-remote-config",
    ),
    # network.resolve
    P(
        ["version: 1", "network:", "  resolve:", "    a.example.com: not-an-ip"],
        4,
        "not an IP address",
        id="resolve-not-ip",
    ),
    P(
        ["version: 1", "network:", "  resolve:", "    1.2.3.4: 5.6.7.8"],
        4,
        "is an address",
        id="resolve-key-is-ip",
    ),
    P(
        ["version: 1", "network:", "  resolve:", "    a.example.com: []"],
        4,
        "maps to no address",
        id="resolve-empty",
    ),
    P(
        ["version: 1", "network:", "  resolve:", "    'bad host': 1.2.3.4"],
        4,
        "invalid host",
        id="resolve-bad-host",
    ),
    # auth
    P(
        ["version: 1", "clients:", "  auth:", "    users_file: does-not-exist.htpasswd"],
        4,
        "does not exist",
        id="users-file-missing",
    ),
]


@pytest.mark.parametrize(("lines", "line", "fragment"), REJECTIONS)
def test_rejection_names_file_and_line(
    policy_error: Callable[[str], tuple[Path, str]], lines: list[str], line: int, fragment: str
) -> None:
    path, rendered = policy_error("\n".join(lines) + "\n")
    assert rendered.startswith(f"{path}:{line}: "), rendered
    assert fragment in rendered


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
    P(["version: 1", "destinatons: []"], "check the spelling", id="unknown-key-hint"),
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
