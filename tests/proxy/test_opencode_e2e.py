"""The real OpenCode (opencode-ai from npm) through egress-guard, end to end.

OpenCode runs isolated (its own HOME and XDG dirs, config from OPENCODE_CONFIG_CONTENT)
against an OpenAI-compatible mock provider on loopback TLS. The policy is the one
``egress-guard policy from-opencode`` writes for that config, plus the test's network
section: the mock's name and every other allowed name resolve to loopback, so nothing
can leave the machine even for hosts the policy allows.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from support.mock_llm import ANSWER, MockLLM
from support.opencode_run import MOCK_HOST, OPENCODE, generated_policy, opencode_config, texts
from support.prereq import missing
from support.proxy import ProxyFactory, ProxyProcess, exported_ca


@pytest.fixture(autouse=True)
def _needs_opencode() -> None:
    if OPENCODE is None:
        missing(
            "opencode-ai is not installed (scripts/install-test-peers.sh installs it from "
            "npm; it could not reach the npm registry)"
        )


@pytest.fixture
def mock_llm(ca: trustme.CA) -> Iterator[MockLLM]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(MOCK_HOST).configure_cert(ctx)
    server = MockLLM(ctx, ["mock-model", "other-model"])
    yield server
    server.close()


def run_opencode(
    tmp_path: Path, proxy: ProxyProcess, config: dict[str, Any], ca_bundle: Path
) -> list[dict[str, Any]]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_STATE_HOME": str(home / ".local/state"),
        "HTTPS_PROXY": proxy.url,
        "HTTP_PROXY": proxy.url,
        "https_proxy": proxy.url,
        "http_proxy": proxy.url,
        "NO_PROXY": "",
        "no_proxy": "",
        "NODE_EXTRA_CA_CERTS": str(ca_bundle),
        "OPENCODE_CONFIG_CONTENT": json.dumps(config),
    }
    work = tmp_path / "project"
    work.mkdir(exist_ok=True)
    assert OPENCODE is not None
    res = subprocess.run(
        [OPENCODE, "run", "--format", "json", "Reply with the answer."],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
        cwd=work,
    )
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert events, (
        f"no JSON events from opencode (exit {res.returncode}):\n{res.stdout}\n{res.stderr[-3000:]}"
    )
    return events


def test_opencode_through_guard_tunnel_mode(
    proxy: ProxyFactory, mock_llm: MockLLM, ca_file: Path, tmp_path: Path
) -> None:
    config = opencode_config(mock_llm.port)
    p = proxy(generated_policy(tmp_path, config))
    events = run_opencode(tmp_path, p, config, ca_file)
    assert ANSWER in texts(events), events
    assert any(call[:2] == ("POST", "/v1/chat/completions") for call in mock_llm.calls)
    p.stop()
    decisions = p.audit("decision")
    allowed = [d for d in decisions if d["decision"] == "allow"]
    assert {d["host"] for d in allowed} == {MOCK_HOST}
    blocked = [d for d in decisions if d["decision"] == "block"]
    assert blocked, "OpenCode contacted nothing but the provider?"
    by_host = {d["host"]: d for d in blocked}
    # every host OpenCode tried beyond the provider is blocked and named by its catalog entry
    for host, rec in by_host.items():
        assert rec["catalog"], f"{host} blocked without a catalog name: {rec}"
    assert by_host["models.opencode.ai"]["catalog"] == "models-catalog"
    if "registry.npmjs.org" in by_host:
        assert by_host["registry.npmjs.org"]["catalog"] in ("npm-registry", "opencode-update")
    log = p.log()
    assert "SECRET" not in log and "SECRET" not in p.audit_path.read_text()


def test_opencode_through_guard_inspect_mode_model_allowlist(
    proxy: ProxyFactory, mock_llm: MockLLM, ca_file: Path, tmp_path: Path
) -> None:
    config = opencode_config(mock_llm.port)
    p = proxy(
        generated_policy(tmp_path, config, models=["mock-model"]),
        "--inspect",
        "--upstream-ca",
        str(ca_file),
    )
    guard_ca = exported_ca(p)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(guard_ca + ca_file.read_bytes())

    events = run_opencode(tmp_path, p, config, bundle)
    assert ANSWER in texts(events), events
    assert all(call[2] == "mock-model" for call in mock_llm.calls if call[0] == "POST")

    refused = run_opencode(tmp_path, p, opencode_config(mock_llm.port, "other-model"), bundle)
    errors = [e for e in refused if e.get("type") == "error"]
    assert errors, refused
    shown = errors[0]["error"]["data"]["message"]
    assert shown.startswith(f"egress-guard: model not allowed at {MOCK_HOST}:{mock_llm.port}"), (
        shown
    )
    assert not any(call[2] == "other-model" for call in mock_llm.calls)
    recs = p.wait_audit(lambda r: r["reason"] == "model_not_allowed")
    assert recs and recs[0]["destination"]


def test_opencode_shows_why_its_provider_is_blocked(
    proxy: ProxyFactory, mock_llm: MockLLM, ca_file: Path, tmp_path: Path
) -> None:
    """What OpenCode's user (and the agent) sees when the provider's tunnel is refused:
    the host, the reason and the hint, not only "Forbidden" (OpenCode prints a
    non-standard reason phrase as it is: responses.reason_phrase)."""
    config = opencode_config(mock_llm.port)
    policy = yaml.safe_load(generated_policy(tmp_path, config))
    policy["destinations"] = [
        d for d in policy["destinations"] if MOCK_HOST not in d.get("hosts", [])
    ]
    p = proxy(yaml.safe_dump(policy, sort_keys=False))
    events = run_opencode(tmp_path, p, config, ca_file)
    errors = [e for e in events if e.get("type") == "error"]
    assert errors, events
    shown = errors[0]["error"]["data"]["message"]
    target = f"{MOCK_HOST}:{mock_llm.port}"
    assert shown.startswith(f"Forbidden: egress-guard blocked {target} (not_allowlisted): "), shown
    assert f"add a destination with hosts: [{MOCK_HOST}]" in shown, shown
    assert str(p.policy_path) not in json.dumps(errors), "the client is told no file path"
    assert not mock_llm.calls
    rec = p.wait_audit(lambda r: r["host"] == MOCK_HOST)[0]
    assert rec["decision"] == "block" and rec["reason"] == "not_allowlisted"
