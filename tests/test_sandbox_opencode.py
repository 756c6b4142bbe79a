"""The real OpenCode (``opencode run``) inside ``egress-guard sandbox``: it answers
through the guard from a namespace whose only way out is the guard, against the
loopback mock provider on the host (support/opencode_run.py)."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from support.mock_llm import ANSWER, MockLLM
from support.opencode_run import MOCK_HOST, OPENCODE, generated_policy, opencode_config, texts
from support.prereq import missing
from support.proxy import EGRESS_GUARD

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def _prerequisites() -> None:
    if os.geteuid() != 0:
        missing("egress-guard sandbox needs root")
    if shutil.which("nft") is None:
        missing("nft is not installed (scripts/install-test-peers.sh)")
    if OPENCODE is None:
        missing("opencode-ai is not installed (scripts/install-test-peers.sh installs it)")


@pytest.fixture
def mock_llm(ca: trustme.CA) -> Iterator[MockLLM]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(MOCK_HOST).configure_cert(ctx)
    server = MockLLM(ctx, ["mock-model"])
    yield server
    server.close()


def test_opencode_answers_from_inside_the_sandbox(
    mock_llm: MockLLM, ca_file: Path, tmp_path: Path
) -> None:
    config = opencode_config(mock_llm.port)
    policy = tmp_path / "policy.yaml"
    policy.write_text(generated_policy(tmp_path, config))
    audit = tmp_path / "audit.jsonl"
    home = tmp_path / "home"
    work = tmp_path / "project"
    work.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_STATE_HOME": str(home / ".local/state"),
        "NODE_EXTRA_CA_CERTS": str(ca_file),
        "OPENCODE_CONFIG_CONTENT": json.dumps(config),
    }
    confdir = os.environ.get("EG_TEST_CONFDIR") or str(tmp_path / "confdir")
    assert OPENCODE is not None
    guard = [EGRESS_GUARD, "sandbox", "--policy", str(policy), "--audit-log", str(audit)]
    res = subprocess.run(
        [*guard, "--confdir", confdir, "--", OPENCODE, "run", "--format", "json", "Reply."],
        capture_output=True,
        text=True,
        timeout=170,
        env=env,
        cwd=work,
    )
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert ANSWER in texts(events), f"exit {res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    assert res.returncode == 0
    assert any(call[:2] == ("POST", "/v1/chat/completions") for call in mock_llm.calls)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    allowed = [r for r in records if r.get("event") == "decision" and r["decision"] == "allow"]
    assert {r["host"] for r in allowed} == {MOCK_HOST}
