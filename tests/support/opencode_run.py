"""Driving the real OpenCode in tests: where it is installed, the config that points it at
the loopback mock provider, and the policy ``policy from-opencode`` writes for that config
(tests/proxy/test_opencode_e2e.py, tests/test_sandbox_opencode.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from support.proxy import EGRESS_GUARD

ROOT = Path(__file__).resolve().parents[2]
MOCK_HOST = "llm.test"


def opencode_bin() -> str | None:
    for candidate in (
        os.environ.get("EG_OPENCODE_BIN"),
        str(ROOT / ".cache/opencode/node_modules/.bin/opencode"),
        shutil.which("opencode"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


OPENCODE = opencode_bin()


def opencode_config(port: int, model: str = "mock-model") -> dict[str, Any]:
    return {
        "$schema": "https://opencode.ai/config.json",
        "autoupdate": False,
        "share": "disabled",
        "model": f"mock/{model}",
        "provider": {
            "mock": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Mock provider",
                "options": {
                    "baseURL": f"https://{MOCK_HOST}:{port}/v1",
                    "apiKey": "sk-test-SECRET",
                },
                "models": {"mock-model": {"name": "Mock"}, "other-model": {"name": "Other"}},
            }
        },
    }


def generated_policy(
    tmp_path: Path, config: dict[str, Any], models: list[str] | None = None
) -> str:
    cfg = tmp_path / "opencode.json"
    cfg.write_text(json.dumps(config))
    out = tmp_path / "generated.yaml"
    res = subprocess.run(
        [EGRESS_GUARD, "policy", "from-opencode", str(cfg), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    policy = yaml.safe_load(out.read_text())
    names = {d.get("name") or d.get("use") for d in policy["destinations"]}
    assert "opencode-auth" in names
    hosts: set[str] = set()
    for d in policy["destinations"]:
        if "hosts" in d:
            hosts.update(d["hosts"])
            if models is not None and MOCK_HOST in d["hosts"]:
                d["models"] = models
    assert MOCK_HOST in hosts
    # Every allowed name resolves to loopback: the mock for its own name, a closed port for
    # the rest (api.opencode.ai from the auth entry), so no test traffic leaves the machine.
    policy["network"] = {
        "allow_cidrs": ["127.0.0.1/32"],
        "resolve": {MOCK_HOST: "127.0.0.1", "api.opencode.ai": "127.0.0.1"},
    }
    return yaml.safe_dump(policy, sort_keys=False)


def texts(events: list[dict[str, Any]]) -> str:
    return " ".join(e["part"].get("text", "") for e in events if e.get("type") == "text")
