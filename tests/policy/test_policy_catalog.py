"""The catalog is OpenCode's destination table as data; the presets are built from it.

The seed table is parsed out of the seed document (not copied here), so a row added to the
documentation fails this test until the catalog has it too.
"""

from __future__ import annotations

import re
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from support.prereq import missing

from egress_guard.engine import Engine, HostIndex, Match
from egress_guard.engine.rules.addresses import decide_addresses
from egress_guard.engine.rules.names import decide_target
from egress_guard.normalize import normalize_host
from egress_guard.policy import (
    CatalogEntry,
    PolicyError,
    load_catalog,
    load_policy_text,
    load_preset,
    policies_dir,
    preset_names,
)

#: ../shared/seed/opencode-network.txt next to the checkout (DESIGN.md section 1)
SEED = Path(__file__).resolve().parents[3] / "shared" / "seed" / "opencode-network.txt"

#: DESIGN.md section 9: hosts OpenCode was observed to contact (port 443).
OBSERVED_HOSTS = [
    "models.opencode.ai",
    "registry.npmjs.org",
    "opencode.ai",
    "api.opencode.ai",
    "opncd.ai",
    "github.com",
    "api.github.com",
]


def _seed_text() -> str:
    if not SEED.is_file():
        missing(f"seed document {SEED} is not available in this checkout")
    return SEED.read_text(encoding="utf-8")


def _seed_table_rows(text: str) -> list[dict[str, str]]:
    """Rows of the markdown table under "Outbound Connections", as {column: cell}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Outbound Connections")
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    table = []
    for line in lines[first:]:  # the table is contiguous
        if not line.startswith("|"):
            break
        table.append(line)
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = []
    for line in table[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if all(set(c) <= set("-: ") for c in cells):
            continue  # the |---|---| separator
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _seed_provider_urls(text: str) -> list[str]:
    """The "Common endpoints" listed under LLM Provider APIs."""
    section = text.split("LLM Provider APIs", 2)[-1].split("For self-hosted", 1)[0]
    return re.findall(r"^https://\S+$", section, flags=re.MULTILINE)


def _seed_local_base_urls(text: str) -> dict[str, str]:
    """provider name -> baseURL from the self-hosted JSON example."""
    return dict(re.findall(r'"([a-z-]+)":\s*\{\s*"baseURL":\s*"([^"]+)"', text))


@pytest.fixture(scope="module")
def catalog() -> dict[str, CatalogEntry]:
    return load_catalog()


def _covering(catalog: dict[str, CatalogEntry], host: str, port: int) -> list[str]:
    entries = list(catalog.values())
    index = HostIndex((i, e.hosts) for i, e in enumerate(entries))
    h = normalize_host(host)
    ids = index.match_ip(h.ip) if h.ip is not None else index.match_name(h.value)
    return [entries[i].name for i in ids if port in entries[i].ports]


# -- the seed table --------------------------------------------------------------------------


def test_seed_table_parses() -> None:
    rows = _seed_table_rows(_seed_text())
    assert len(rows) >= 7
    assert {"Destination", "Purpose", "Required", "Configurable"} <= set(rows[0])


def test_every_seed_row_is_in_the_catalog(catalog: dict[str, CatalogEntry]) -> None:
    rows = _seed_table_rows(_seed_text())
    covered = {e.seed_row for e in catalog.values()}
    missing = [r["Destination"] for r in rows if r["Destination"] not in covered]
    assert not missing, f"seed rows with no catalog entry: {missing}"


def test_seed_rows_in_catalog_are_real_rows(catalog: dict[str, CatalogEntry]) -> None:
    rows = {r["Destination"] for r in _seed_table_rows(_seed_text())}
    for e in catalog.values():
        assert e.seed_row is None or e.seed_row in rows, (e.name, e.seed_row)
        assert (e.seed_row is not None) == ("docs" in e.source) or e.name in {
            "opencode-zen",  # docs row "OpenCode Zen / Go" names no host; observed as opencode.ai
        }, e.name


def test_configurable_rows_say_how_to_turn_them_off(catalog: dict[str, CatalogEntry]) -> None:
    for row in _seed_table_rows(_seed_text()):
        if row["Configurable"].lower() != "yes":
            continue
        entries = [e for e in catalog.values() if e.seed_row == row["Destination"]]
        assert entries
        for e in entries:
            assert e.disabled_by, f"{e.name} (row {row['Destination']!r}) has no disabled_by"


def test_provider_endpoints_are_covered(catalog: dict[str, CatalogEntry]) -> None:
    urls = _seed_provider_urls(_seed_text())
    assert len(urls) == 8, urls
    for url in urls:
        parts = urlsplit(url)
        assert parts.hostname is not None
        names = _covering(catalog, parts.hostname, parts.port or 443)
        assert names, f"no catalog entry covers {url}"
        assert all(catalog[n].seed_row == "LLM provider APIs" for n in names), names


@pytest.mark.parametrize(
    ("provider", "port"), [("ollama", 11434), ("lm-studio", 1234)], ids=["ollama", "lm-studio"]
)
def test_local_providers(catalog: dict[str, CatalogEntry], provider: str, port: int) -> None:
    base = _seed_local_base_urls(_seed_text()).get(provider)
    assert base is not None, f"seed has no baseURL for {provider}"
    parts = urlsplit(base)
    assert (parts.hostname, parts.port) == ("localhost", port)
    entry = catalog[provider]
    assert port in entry.ports and entry.usable is None
    assert provider in _covering(catalog, "localhost", port)
    # the loopback addresses localhost resolves to are the entry's own, so they pass
    # block_private; another port on the same host does not
    assert provider in _covering(catalog, "127.0.0.1", port)
    assert provider in _covering(catalog, "::1", port)
    assert provider not in _covering(catalog, "localhost", 443)


@pytest.mark.parametrize("host", OBSERVED_HOSTS)
def test_observed_hosts_are_covered(catalog: dict[str, CatalogEntry], host: str) -> None:
    names = _covering(catalog, host, 443)
    assert names, f"no catalog entry covers {host}:443"
    assert any("observed" in catalog[n].source for n in names)


def test_catalog_entries_are_complete(catalog: dict[str, CatalogEntry]) -> None:
    assert len(catalog) >= 10
    for name, e in catalog.items():
        assert e.name == name
        assert e.purpose.strip(), name
        assert e.required in {"yes", "no", "conditional", "licensed"}
        assert e.source, name


@pytest.mark.parametrize(
    ("name", "why"),
    [("mdns", "UDP"), ("webfetch", "no fixed hosts"), ("remote-config", "no fixed hosts")],
    ids=["mdns", "webfetch", "remote-config"],
)
def test_unusable_entries_say_why(catalog: dict[str, CatalogEntry], name: str, why: str) -> None:
    reason = catalog[name].usable
    assert reason is not None and why in reason


def test_usable_entries_convert_to_destinations(catalog: dict[str, CatalogEntry]) -> None:
    usable = [e for e in catalog.values() if e.usable is None]
    assert {"anthropic", "opencode-auth", "ollama", "npm-registry"} <= {e.name for e in usable}
    for e in usable:
        d = e.as_destination()
        assert (d.name, d.hosts, d.ports) == (e.name, e.hosts, e.ports)


def test_duplicate_catalog_entry_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "catalog.yaml"
    p.write_text(
        "version: 1\nentries:\n"
        "  - name: a\n    purpose: x\n    required: 'no'\n    source: [docs]\n    hosts: [a.example.com]\n"
        "  - name: a\n    purpose: y\n    required: 'no'\n    source: [docs]\n    hosts: [b.example.com]\n"
    )
    with pytest.raises(PolicyError) as info:
        load_catalog(p)
    assert info.value.render().startswith(f"{p}:8: duplicate catalog entry 'a'")


# -- presets -------------------------------------------------------------------------------


def test_preset_names() -> None:
    assert preset_names() == ["minimal", "offline", "standard"]
    assert (policies_dir() / "catalog.yaml").is_file()


PRESETS = {
    "minimal": ["anthropic", "opencode-auth"],
    "offline": ["ollama", "lm-studio"],
    "standard": ["anthropic", "opencode-auth", "opencode-update", "models-catalog", "npm-registry"],
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_loads(name: str) -> None:
    pol = load_preset(name)
    assert [d.name for d in pol.destinations] == PRESETS[name]
    assert pol.mode == "enforce"
    assert pol.network.block_private is True
    assert pol.clients.allow_cidrs == ["127.0.0.0/8", "::1/128"]


def _decide(name: str, host: str, port: int) -> object:
    return decide_target(Engine(load_preset(name), load_catalog()).compiled, host, port)


@pytest.mark.parametrize(
    ("preset", "host", "port", "allowed"),
    [
        ("minimal", "api.anthropic.com", 443, True),
        ("minimal", "api.opencode.ai", 443, True),
        ("minimal", "models.opencode.ai", 443, False),
        ("minimal", "registry.npmjs.org", 443, False),
        ("offline", "localhost", 11434, True),
        ("offline", "127.0.0.1", 1234, True),
        ("offline", "api.anthropic.com", 443, False),
        ("offline", "api.opencode.ai", 443, False),
        ("offline", "localhost", 8080, False),
        ("standard", "api.anthropic.com", 443, True),
        ("standard", "models.opencode.ai", 443, True),
        ("standard", "registry.npmjs.org", 443, True),
        ("standard", "github.com", 443, True),
        ("standard", "example.com", 443, False),  # webfetch stays off
        ("standard", "docs.python.org", 443, False),
        ("standard", "opncd.ai", 443, False),  # share links are not in standard
    ],
)
def test_preset_decisions(preset: str, host: str, port: int, allowed: bool) -> None:
    assert isinstance(_decide(preset, host, port), Match) is allowed


def test_offline_sends_nothing_off_the_machine() -> None:
    eng = Engine(load_preset("offline"), load_catalog())
    for dest in load_preset("offline").destinations:
        for pattern in dest.hosts:
            h = normalize_host(pattern)
            assert h.value == "localhost" or (h.ip is not None and h.ip.is_loopback), pattern
    m = decide_target(eng.compiled, "localhost", 11434)
    assert isinstance(m, Match)
    for addr in ("127.0.0.1", "::1"):
        assert decide_addresses(eng.compiled, m, [ip_address(addr)]).allowed
    # localhost resolving somewhere else is not "local"
    assert decide_addresses(eng.compiled, m, [ip_address("10.0.0.1")]).reason == "private_address"


def test_a_policy_can_use_every_usable_entry(catalog: dict[str, CatalogEntry]) -> None:
    # localhost entries share hosts but differ in name: all of them load together
    uses = "".join(f"  - use: {n}\n" for n, e in catalog.items() if e.usable is None)
    pol = load_policy_text(f"version: 1\ndestinations:\n{uses}", "all.yaml")
    assert len(pol.destinations) == sum(1 for e in catalog.values() if e.usable is None)
