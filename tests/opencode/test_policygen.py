"""``egress-guard policy from-opencode``: realistic opencode.json files -> exact policies.

Each case compares the *effective* policy (catalog references resolved by the real
loader) with the destinations the configuration needs, so a missing, extra or widened
destination fails. The real CLI runs as a subprocess for the JSONC case and for errors.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path

import pytest

from egress_guard.cli import app as cli
from egress_guard.engine import Engine, Match
from egress_guard.engine.rules.addresses import decide_addresses
from egress_guard.engine.rules.names import decide_target
from egress_guard.opencode import contacts as oc
from egress_guard.opencode.config import OpenCodeConfig, load_config
from egress_guard.opencode.jsonc import parse_jsonc
from egress_guard.opencode.policygen import Generated, generate
from egress_guard.policy import EffectivePolicy, load_catalog, load_policy_text, load_preset
from egress_guard.policy.writer import comment_safe, destination_name

BIN = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "egress-guard")
LOOP = ("localhost", "127.0.0.1", "::1")
UPDATE = (
    "api.github.com",
    "github.com",
    "objects.githubusercontent.com",
    "release-assets.githubusercontent.com",
    "registry.npmjs.org",
)
AUTH = {"opencode-auth": (("api.opencode.ai",), (443,))}
SHARE = {"opencode-share": (("opncd.ai", "**.opncd.ai"), (443,))}


def gen(path: Path, *remote: str) -> Generated:
    return generate(load_config(path), load_catalog(), path.name, remote)


def effective(g: Generated) -> EffectivePolicy:
    return load_policy_text(g.text, "generated.yaml")


def dests(g: Generated) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    return {d.name: (tuple(d.hosts), tuple(d.ports)) for d in effective(g).destinations}


def flat(text: str) -> str:
    """The comments of a generated policy as one line (they are wrapped at ~100 columns)."""
    parts = [ln.strip()[1:].strip() for ln in text.splitlines() if ln.strip().startswith("#")]
    return " ".join(parts)


def allowed(pol: EffectivePolicy, host: str, port: int, addr: str | None = None) -> bool:
    eng = Engine(pol, load_catalog())
    m = decide_target(eng.compiled, host, port)
    if not isinstance(m, Match):
        return False
    if addr is None:
        return True
    return decide_addresses(eng.compiled, m, [ipaddress.ip_address(addr)]).allowed


# -- the five configurations --------------------------------------------------------------


def test_a_anthropic_only(fixtures: Path) -> None:
    g = gen(fixtures / "anthropic.json")
    assert dests(g) == {
        **AUTH,
        "anthropic": (("api.anthropic.com",), (443,)),
        # autoupdate and share are not set: OpenCode's defaults (on, manual) need these
        "opencode-update": (UPDATE, (443,)),
        **SHARE,
    }
    # provenance comments
    f = fixtures / "anthropic.json"
    assert f"provider anthropic: from model ({f}:3), small_model ({f}:4)" in flat(g.text)
    assert "autoupdate is not set (OpenCode's default: true)" in flat(g.text)
    # webfetch is on by default: a commented template, never an active destination
    assert "  # - name: webfetch" in g.text
    assert any("webfetch" in n for n in g.notes)
    assert g.warnings == []


def test_b_openai_and_a_custom_provider(fixtures: Path) -> None:
    g = gen(fixtures / "openai_corp.json")
    assert dests(g) == {
        **AUTH,
        "corp": (("llm.corp.example",), (8443,)),
        "openai": (("api.openai.com",), (443,)),
        "opencode-update": (UPDATE, (443,)),  # "notify" still checks
        **SHARE,
    }
    f = fixtures / "openai_corp.json"
    assert f"provider corp: provider.corp.options.baseURL ({f}:14)" in flat(g.text)
    assert "path prefix /v1 " in flat(g.text)
    assert f'"autoupdate": "notify" ({f}:4) still checks' in flat(g.text)
    pol = effective(g)
    assert allowed(pol, "llm.corp.example", 8443)
    assert not allowed(pol, "llm.corp.example", 443)  # only the port the baseURL names


def test_c_ollama_offline(fixtures: Path) -> None:
    g = gen(fixtures / "ollama_offline.json")
    assert dests(g) == {
        **AUTH,
        # ollama's baseURL is exactly what the catalog entry covers: taken as is
        "ollama": (LOOP, (11434,)),
        # custom loopback servers: a localhost baseURL gets every loopback spelling
        "llamacpp": (("127.0.0.1",), (8081,)),
        "lm-studio": (LOOP, (1234,)),
        "vllm": (LOOP, (8000,)),
    }
    f = fixtures / "ollama_offline.json"
    assert f"provider ollama: provider.ollama.options.baseURL ({f}:11)" in flat(g.text)
    assert f'opencode-update not added: "autoupdate": false ({f}:5)' in flat(g.text)
    assert f'opencode-share not added: "share": "disabled" ({f}:6)' in flat(g.text)
    pol = effective(g)
    assert pol.network.block_private  # stays on: loopback is allowed by explicit entries
    # localhost resolving to either loopback address passes the private-address check
    assert allowed(pol, "localhost", 11434, "127.0.0.1")
    assert allowed(pol, "localhost", 8000, "::1")
    assert allowed(pol, "127.0.0.1", 8081, "127.0.0.1")
    # nothing external: offline-compatible
    for host in ("api.anthropic.com", "opncd.ai", "github.com", "registry.npmjs.org"):
        assert not allowed(pol, host, 443)
    assert not allowed(pol, "10.0.0.5", 11434)
    assert g.warnings == []
    # the preset's deny rules (cloud metadata) are carried over, so audit mode cannot lift them
    assert pol.deny == load_preset("minimal").deny
    assert pol.deny and not allowed(pol, "169.254.169.254", 80)
    # provider packages come from npm unless cached: said, not silently allowed
    assert "npm-registry for provider packages (@ai-sdk/openai-compatible)" in flat(g.text)


def test_d_mixed_with_mcp_and_auto_share(fixtures: Path) -> None:
    g = gen(fixtures / "mixed_mcp.json")
    assert dests(g) == {
        **AUTH,
        "anthropic": (("api.anthropic.com",), (443,)),
        "groq": (("api.groq.com",), (443,)),
        "openai": (("api.openai.com",), (443,)),
        "opencode-update": (UPDATE, (443,)),
        **SHARE,
        "npm-registry": (("registry.npmjs.org",), (443,)),
        "mcp-context7": (("mcp.context7.com",), (443,)),
    }
    # togetherai is disabled although an agent names it; sentry is disabled; the local
    # plugin and local MCP server need no host; webfetch is off
    assert "together" not in g.text.split("# Not in this policy:")[0]
    assert any("togetherai" in w and "disabled_providers" in w for w in g.warnings)
    f = fixtures / "mixed_mcp.json"
    assert "mcp.sentry.dev" not in g.text
    assert "local MCP server filesystem" in flat(g.text)
    assert f"webfetch not added: the tool is off by tools.webfetch ({f}:21)" in flat(g.text)
    assert f"share is auto ({f}:6)" in flat(g.text)
    assert f"MCP server context7: mcp.context7.url ({f}:17)" in flat(g.text)


def test_e_jsonc_with_comments_commas_urls_and_env(fixtures: Path) -> None:
    g = gen(fixtures / "commented.jsonc")
    assert dests(g) == {
        **AUTH,
        "gateway": (("ai-gateway.example.net",), (443,)),
        # {env:OPENCODE_AUTOUPDATE} is unknown here: assumed on, like OpenCode's default
        "opencode-update": (UPDATE, (443,)),
        "instructions-docs-example-net": (("docs.example.net",), (443,)),
    }
    # the unresolved baseURL is a commented template plus a warning, never a guess
    assert "  # - name: backup" in g.text
    assert any("BACKUP_URL" in w for w in g.warnings)
    assert "path prefix /v1//openai " in flat(g.text)
    cfg = load_config(fixtures / "commented.jsonc")
    assert cfg.get("$schema") == "https://opencode.ai/config.json"
    assert cfg.get("provider", "gateway", "options", "headers", "X-Note") == (
        'a /* not a comment */ and "// quoted"'
    )


def test_remote_config_host(fixtures: Path) -> None:
    g = gen(fixtures / "anthropic.json", "https://auth.corp.example/")
    assert dests(g)["remote-config"] == (("auth.corp.example",), (443,))
    assert "https://auth.corp.example/.well-known/opencode" in g.text


def test_enterprise_url_replaces_opncd_for_sharing() -> None:
    cfg = OpenCodeConfig.from_doc(
        parse_jsonc(
            '{"model": "anthropic/x", "enterprise": {"url": "https://share.corp.example"}}',
            "c.json",
        )
    )
    d = dests(generate(cfg, load_catalog(), "c.json"))
    assert d["opencode-enterprise"] == (("share.corp.example",), (443,))
    assert "opencode-share" not in d


def test_unknown_provider_and_no_provider_are_templates_with_warnings() -> None:
    cfg = OpenCodeConfig.from_doc(parse_jsonc('{"model": "openrouter/anthropic/claude"}', "c.json"))
    g = generate(cfg, load_catalog(), "c.json")
    assert "openrouter" not in dests(g)
    assert "  # - name: openrouter" in g.text
    assert any("openrouter" in w and "catalog" in w for w in g.warnings)
    empty = generate(OpenCodeConfig.from_doc(parse_jsonc("{}", "e.json")), load_catalog(), "e.json")
    assert set(dests(empty)) == {"opencode-auth", "opencode-update", "opencode-share"}
    assert any("no provider" in w for w in empty.warnings)


def test_name_collisions_get_suffixes() -> None:
    # a custom "together" next to the built-in "togetherai" (both map to the name together)
    cfg = OpenCodeConfig.from_doc(
        parse_jsonc(
            '{"model": "togetherai/m", "provider": {"together": {"options": '
            '{"baseURL": "https://together.corp.example/v1"}}, "npm-registry": {"options": '
            '{"baseURL": "https://npm.corp.example"}}}, "plugin": ["p"], "autoupdate": false}',
            "c.json",
        )
    )
    d = dests(generate(cfg, load_catalog(), "c.json"))
    assert d["together"] == (("api.together.xyz",), (443,))
    assert d["together-2"] == (("together.corp.example",), (443,))
    assert d["npm-registry"] == (("registry.npmjs.org",), (443,))
    assert d["npm-registry-2"] == (("npm.corp.example",), (443,))


def test_output_is_deterministic(fixtures: Path) -> None:
    for name in ("anthropic.json", "mixed_mcp.json", "commented.jsonc"):
        assert gen(fixtures / name).text == gen(fixtures / name).text


def test_values_from_the_config_cannot_write_policy_lines() -> None:
    """Line breaks in ids and URLs would end a YAML comment and start a policy line."""
    evil = (
        '{"model": "evil\\n  - name: pwn\\n    hosts: [\\"evil.example\\"]\\n#/m",'
        ' "provider": {"x\\u2028  - use: npm-registry": {"options": {"baseURL":'
        ' "https://ok.example/v1\\n  - name: pwn2\\n    hosts: [\\"evil2.example\\"]"}}},'
        ' "mcp": {"m\\r  - use: github-downloads": {"type": "remote", "url": "https://m.example/\\u0085x"}},'
        ' "autoupdate": false, "share": "disabled"}'
    )
    g = generate(
        OpenCodeConfig.from_doc(parse_jsonc(evil, "evil.json")), load_catalog(), "e\nvil.json"
    )
    names = set(dests(g))
    assert not names & {"pwn", "pwn2", "npm-registry", "github-downloads"}
    hosts = {h for hs, _ in dests(g).values() for h in hs}
    assert not hosts & {"evil.example", "evil2.example"}
    for line in g.text.splitlines():
        assert line.isprintable() or line == ""
    assert comment_safe("a\nb\u2028c\x85d\re") == "a\\u000ab\\u2028c\\u0085d\\u000de"


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("corp", "corp"),
        ("My Gateway!", "my-gateway"),
        ("--x__", "x"),
        ("a.b/c", "a-b-c"),
        ("é", "destination"),
        ("x" * 80, "x" * 63),
    ],
)
def test_sanitize_name(raw: str, name: str) -> None:
    assert destination_name(raw) == name


# -- the command ------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"}


def test_cli_subprocess_jsonc_to_file(fixtures: Path, tmp_path: Path) -> None:
    out = tmp_path / "policy.yaml"
    r = subprocess.run(
        [BIN, "policy", "from-opencode", str(fixtures / "commented.jsonc"), "-o", str(out)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert "warning:" in r.stderr and "BACKUP_URL" in r.stderr
    pol = load_policy_text(out.read_text(), str(out))
    assert {d.name for d in pol.destinations} == {
        "opencode-auth",
        "gateway",
        "opencode-update",
        "instructions-docs-example-net",
    }
    v = subprocess.run(
        [BIN, "validate", str(out)], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert v.returncode == 0, v.stderr


def test_cli_subprocess_syntax_error_exit_2_with_file_line(tmp_path: Path) -> None:
    bad = tmp_path / "opencode.json"
    bad.write_text('{\n  "model": "anthropic/x"\n  "share": "disabled"\n}\n')
    r = subprocess.run(
        [BIN, "policy", "from-opencode", str(bad)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert r.returncode == 2
    assert f"{bad}:2: JSON syntax error" in r.stderr
    assert r.stdout == ""


def test_cli_errors_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["policy", "from-opencode", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    wrong = tmp_path / "wrong.jsonc"
    wrong.write_text('{\n // x\n "autoupdate": "sometimes"}')
    assert cli.main(["policy", "from-opencode", str(wrong)]) == 2
    assert f"{wrong}:3: autoupdate: must be" in capsys.readouterr().err
    ok = tmp_path / "ok.json"
    ok.write_text('{"model": "anthropic/x"}')
    assert cli.main(["policy", "from-opencode", str(ok), "--remote-config", "not a url"]) == 2
    assert cli.main(["policy", "from-opencode", str(ok)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Generated by `egress-guard policy from-opencode`")
    assert "- use: anthropic" in out


@pytest.mark.parametrize(
    ("text", "enabled"),
    [
        ("{}", True),
        ('{"tools": {"webfetch": false}}', False),
        ('{"permission": {"webfetch": "deny"}}', False),
        ('{"permission": "deny"}', False),
        ('{"permission": {"*": "deny"}}', False),
        ('{"permission": {"*": "deny", "webfetch": "ask"}}', True),
        # permission wins over tools, as OpenCode merges them
        ('{"tools": {"webfetch": false}, "permission": {"webfetch": "allow"}}', True),
        ('{"tools": {"webfetch": true}, "permission": {"webfetch": "deny"}}', False),
        # an agent that turns it back on makes it reachable
        (
            '{"tools": {"webfetch": false}, "agent": {"docs": {"permission": {"webfetch": "allow"}}}}',
            True,
        ),
        ('{"tools": {"webfetch": false}, "agent": {"x": {"tools": {"webfetch": false}}}}', False),
        ('{"permission": {env:PERM}}', True),  # unknown until run time: assume on
    ],
)
def test_webfetch_switches(text: str, enabled: bool) -> None:
    cfg = OpenCodeConfig.from_doc(parse_jsonc(text, "c.json"))
    assert oc.webfetch(cfg).enabled is enabled
    g = generate(cfg, load_catalog(), "c.json")
    assert ("  # - name: webfetch" in g.text) is enabled
    assert "webfetch" not in dests(g)  # never an active destination


def test_site_internal_and_plain_http_providers() -> None:
    cfg = OpenCodeConfig.from_doc(
        parse_jsonc(
            '{"provider": {'
            '"lan": {"options": {"baseURL": "http://gpu.lan:11434/v1"}},'
            '"dc": {"options": {"baseURL": "http://10.1.2.3:8000/v1"}},'
            '"pub": {"options": {"baseURL": "http://llm.example.com/v1"}}},'
            ' "autoupdate": false, "share": "disabled"}',
            "c.json",
        )
    )
    g = generate(cfg, load_catalog(), "c.json")
    d = dests(g)
    assert d["lan"] == (("gpu.lan",), (11434,))
    assert d["dc"] == (("10.1.2.3",), (8000,))
    assert d["pub"] == (("llm.example.com",), (80,))
    pol = effective(g)
    # a private IP literal listed in hosts passes block_private; other private IPs do not
    assert allowed(pol, "10.1.2.3", 8000, "10.1.2.3")
    assert not allowed(pol, "10.1.2.4", 8000)
    # a name that resolves privately is still blocked: the comment and warning say so
    m = decide_target(Engine(pol, load_catalog()).compiled, "gpu.lan", 11434)
    assert isinstance(m, Match)
    blocked = decide_addresses(
        Engine(pol, load_catalog()).compiled, m, [ipaddress.ip_address("192.168.1.9")]
    )
    assert blocked.reason == "private_address"
    assert any("gpu.lan looks site-internal" in w for w in g.warnings)
    assert any("llm.example.com" in w and "in clear" in w for w in g.warnings)
    assert not any("gpu.lan" in w and "in clear" in w for w in g.warnings)
