"""``egress-guard doctor``: every problem found with its severity; a clean setup passes.

The checks run in-process on an explicit environment dict (no dependence on the test
runner's own environment); the command also runs as a real subprocess with ``env=``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from egress_guard.cli import app as cli
from egress_guard.opencode.config import OpenCodeConfig, load_config
from egress_guard.opencode.doctor import diagnose
from egress_guard.opencode.doctor_report import DoctorInput, Finding
from egress_guard.opencode.doctor_values import (
    classify_no_proxy,
    cors_problem,
    discover,
    parse_proxy_url,
    redact,
)
from egress_guard.opencode.policygen import generate
from egress_guard.policy import EffectivePolicy, load_catalog, load_policy_text, load_preset

BIN = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "egress-guard")
GUARD = "http://127.0.0.1:8080"
CLEAN_ENV = {
    "HTTPS_PROXY": GUARD,
    "HTTP_PROXY": GUARD,
    "NO_PROXY": "localhost,127.0.0.1,::1,.local",
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
}


def run(
    cfg: OpenCodeConfig | None,
    env: dict[str, str],
    policy: EffectivePolicy | None = None,
    inspect: bool = False,
) -> list[Finding]:
    return diagnose(
        DoctorInput(
            cfg=cfg,
            env=env,
            policy=policy or load_preset("minimal"),
            catalog=load_catalog(),
            proxy_url=GUARD,
            inspect=inspect,
        )
    )


def pairs(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(f.severity, f.check) for f in findings}


def find(findings: list[Finding], check: str, text: str) -> Finding:
    hits = [f for f in findings if f.check == check and text in f.message]
    assert hits, f"no {check} finding mentioning {text!r} in {[f.message for f in findings]}"
    return hits[0]


# -- a config and environment with every problem ------------------------------------------


@pytest.fixture
def bad_findings(fixtures: Path) -> list[Finding]:
    env = {
        "HTTPS_PROXY": "http://user:s3cret@proxy.corp.example:3128",
        "https_proxy": GUARD,
        # HTTP_PROXY unset
        "NO_PROXY": "localhost,127.0.0.1,*,.com,co.uk,.corp.example.com,10.0.0.0/8,.internal",
        "NODE_TLS_REJECT_UNAUTHORIZED": "0",
    }
    return run(load_config(fixtures / "doctor_bad.jsonc"), env, inspect=True)


def test_every_problem_is_found_with_its_severity(
    bad_findings: list[Finding], fixtures: Path
) -> None:
    f = bad_findings
    src = str(fixtures / "doctor_bad.jsonc")

    up = find(f, "autoupdate", '"notify"')
    assert up.severity == "error" and up.source == f"{src}:5"
    assert '"autoupdate": false' in up.fix

    mdns = find(f, "mdns", "UDP")
    assert mdns.severity == "error" and mdns.source == f"{src}:8"
    assert '"mdns": false' in mdns.fix

    for origin in ("'*'", "'https://*.example.com'", "'https://app.example.com/ui'"):
        assert find(f, "cors", origin).severity == "error"
    assert not [x for x in f if x.check == "cors" and "localhost:5173" in x.message]

    assert find(f, "proxy-env", "HTTP_PROXY is not set").severity == "error"
    elsewhere = find(f, "proxy-env", "does not point at the guard")
    assert elsewhere.severity == "error" and elsewhere.source == "env:HTTPS_PROXY"
    assert "s3cret" not in elsewhere.message  # the proxy password is never printed
    assert not [x for x in f if x.source == "env:https_proxy"]  # the lowercase one is right

    assert find(f, "no-proxy", "'*'").severity == "error"
    assert find(f, "no-proxy", "'.com'").severity == "error"
    assert find(f, "no-proxy", "'co.uk'").severity == "error"
    assert find(f, "no-proxy", "'.corp.example.com'").severity == "warning"
    assert find(f, "no-proxy", "'10.0.0.0/8'").severity == "warning"
    for local in ("'localhost'", "'127.0.0.1'", "'.internal'"):
        assert not [x for x in f if x.check == "no-proxy" and local in x.message]

    assert find(f, "ca", "NODE_EXTRA_CA_CERTS is not set").severity == "error"
    assert find(f, "tls", "NODE_TLS_REJECT_UNAUTHORIZED=0").severity == "error"

    share = find(f, "share", "share is auto")
    assert share.severity == "warning" and share.source == f"{src}:6"
    assert '"share": "disabled"' in share.fix

    openai = find(f, "provider", "provider openai")
    assert openai.severity == "error" and "api.openai.com:443" in openai.message
    assert openai.fix.startswith("add `- use: openai` to a policy of your own")  # not the preset
    ollama = find(f, "provider", "provider ollama (")
    assert ollama.severity == "error" and "localhost:11434" in ollama.message
    assert find(f, "provider", "ignored by OpenCode 1.18").severity == "warning"

    assert find(f, "mcp", "jira.example.com:443").severity == "warning"
    assert find(f, "plugins", "opencode-wakatime").severity == "warning"

    # errors first, then warnings, then info
    order = [x.severity for x in f]
    assert order == sorted(order, key=["error", "warning", "info"].index)


def test_exit_status_and_json_in_process(
    fixtures: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for k in list(os.environ):
        if k.upper() in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY") or k.startswith(
            ("OPENCODE_", "NODE_")
        ):
            monkeypatch.delenv(k)
    for k, v in CLEAN_ENV.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["doctor", str(fixtures / "doctor_clean.json"), "--json", "--no-probe"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli.main(["doctor", str(fixtures / "doctor_bad.jsonc"), "--json", "--no-probe"]) == 1
    findings = json.loads(capsys.readouterr().out)
    assert {"severity", "check", "message", "fix", "source"} == set(findings[0])
    assert ("error", "mdns") in {(x["severity"], x["check"]) for x in findings}
    monkeypatch.delenv("HTTP_PROXY")  # the clean config alone is not enough
    assert cli.main(["doctor", str(fixtures / "doctor_clean.json"), "--no-probe"]) == 1
    assert "HTTP_PROXY is not set" in capsys.readouterr().out


# -- a clean setup ----------------------------------------------------------------------


def test_clean_config_and_environment_pass(fixtures: Path) -> None:
    assert run(load_config(fixtures / "doctor_clean.json"), dict(CLEAN_ENV)) == []


@pytest.mark.parametrize(
    ("change", "check"),
    [
        ({"HTTPS_PROXY": ""}, "proxy-env"),
        ({"HTTP_PROXY": "http://127.0.0.1:9999"}, "proxy-env"),
        ({"HTTPS_PROXY": "https://127.0.0.1:8080"}, "proxy-env"),
        ({"NO_PROXY": "localhost,.amazonaws.com"}, "no-proxy"),
        ({"no_proxy": "*"}, "no-proxy"),
        ({"NODE_TLS_REJECT_UNAUTHORIZED": "0"}, "tls"),
    ],
)
def test_one_bad_variable_breaks_a_clean_setup(
    fixtures: Path, change: dict[str, str], check: str
) -> None:
    env = {**CLEAN_ENV, **change}
    findings = run(load_config(fixtures / "doctor_clean.json"), env)
    assert check in {f.check for f in findings}


def test_lowercase_proxy_variables_count(fixtures: Path) -> None:
    env = {k: v for k, v in CLEAN_ENV.items() if not k.endswith("_PROXY") or k == "NO_PROXY"}
    env |= {"https_proxy": GUARD, "http_proxy": "127.0.0.1:8080"}  # no scheme: http://
    assert run(load_config(fixtures / "doctor_clean.json"), env) == []


def test_inspect_needs_a_readable_pem_ca(fixtures: Path, tmp_path: Path) -> None:
    cfg = load_config(fixtures / "doctor_clean.json")
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert run(cfg, {**CLEAN_ENV, "NODE_EXTRA_CA_CERTS": str(pem)}, inspect=True) == []
    assert "ca" in {f.check for f in run(cfg, dict(CLEAN_ENV), inspect=True)}
    junk = tmp_path / "junk.txt"
    junk.write_text("not a cert")
    assert "ca" in {
        f.check for f in run(cfg, {**CLEAN_ENV, "NODE_EXTRA_CA_CERTS": str(junk)}, inspect=True)
    }
    assert "ca" not in {f.check for f in run(cfg, dict(CLEAN_ENV), inspect=False)}


def test_opencode_disable_autoupdate_env_counts(fixtures: Path) -> None:
    cfg = load_config(fixtures / "anthropic.json")  # autoupdate not set: on
    assert ("error", "autoupdate") in pairs(run(cfg, dict(CLEAN_ENV)))
    env = {**CLEAN_ENV, "OPENCODE_DISABLE_AUTOUPDATE": "1"}
    assert ("error", "autoupdate") not in pairs(run(cfg, env))


@pytest.mark.parametrize(
    "name",
    [
        "anthropic.json",
        "openai_corp.json",
        "ollama_offline.json",
        "mixed_mcp.json",
        "commented.jsonc",
    ],
)
def test_generated_policy_satisfies_doctor_for_its_config(fixtures: Path, name: str) -> None:
    """from-opencode and doctor agree: with the generated policy, no provider or
    auto-update errors remain (only environment and risky-setting findings can)."""
    cfg = load_config(fixtures / name)
    policy = load_policy_text(generate(cfg, load_catalog(), name).text, "gen.yaml")
    findings = run(cfg, dict(CLEAN_ENV), policy=policy)
    assert not [
        f
        for f in findings
        if f.check in ("provider", "autoupdate", "mcp", "plugins") and f.severity == "error"
    ]
    # and with the minimal preset instead, the non-anthropic configs do have provider errors
    if name != "anthropic.json":
        assert ("error", "provider") in pairs(run(cfg, dict(CLEAN_ENV)))


def test_discovery_merges_global_and_project_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config" / "opencode").mkdir(parents=True)
    (home / ".config" / "opencode" / "opencode.json").write_text(
        '{"model": "anthropic/x", "share": "auto", "autoupdate": false}'
    )
    project = tmp_path / "repo"
    (project / ".git").mkdir(parents=True)
    (project / "opencode.jsonc").write_text('{\n // project wins\n "share": "disabled"}')
    docs, _ = discover({"HOME": str(home)}, project)
    assert [Path(d.file).name for d in docs] == ["opencode.json", "opencode.jsonc"]
    cfg = OpenCodeConfig.merged(docs)
    assert cfg.get("share") == "disabled" and cfg.get("model") == "anthropic/x"
    assert cfg.where(("share",)) == f"{project / 'opencode.jsonc'}:3"
    findings = run(cfg, dict(CLEAN_ENV))
    assert "share" not in {f.check for f in findings}
    content = {"HOME": str(home), "OPENCODE_CONFIG_CONTENT": '{"share": "auto"}'}
    docs, _ = discover(content, project)
    assert OpenCodeConfig.merged(docs).get("share") == "auto"


# -- the building blocks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "severity"),
    [
        ("localhost", None),
        ("127.0.0.1", None),
        ("::1", None),
        ("[::1]:8080", None),
        (".local", None),
        ("*.internal", None),
        ("printer.lan", None),
        ("127.0.0.0/8", None),
        ("*", "error"),
        (".com", "error"),
        ("com", "error"),
        ("*.co.uk", "error"),
        ("github.io", "error"),
        ("0.0.0.0/0", "error"),
        ("api.github.com", "warning"),
        (".corp.example.com:443", "warning"),
        ("10.1.2.3", "warning"),
        ("192.168.0.0/16", "warning"),
        ("buildhost", "warning"),
        ("a*b.example", "warning"),
    ],
)
def test_no_proxy_classification(entry: str, severity: str | None) -> None:
    got = classify_no_proxy(entry)
    assert (got[0] if got else None) == severity


@pytest.mark.parametrize(
    ("origin", "bad"),
    [
        ("https://opencode.internal.example.com", False),
        ("http://localhost:5173", False),
        ("*", True),
        ("https://*.example.com", True),
        ("https://app.example.com/", True),
        ("https://app.example.com/ui", True),
        ("null", True),
        ("app.example.com", True),
        ("https://user@app.example.com", True),
        ("https://App.Example.com", True),
    ],
)
def test_cors_origins(origin: str, bad: bool) -> None:
    assert (cors_problem(origin) is not None) is bad


def test_proxy_url_parsing_and_redaction() -> None:
    assert parse_proxy_url("127.0.0.1:8080") == parse_proxy_url("http://127.0.0.1:8080/")
    p = parse_proxy_url("http://u:p@LOCALHOST:3128")
    assert p is not None and (p.host, p.port, p.loopback) == ("localhost", 3128, True)
    assert parse_proxy_url("http://") is None
    assert redact("http://alice:hunter2@proxy:3128") == "http://***@proxy:3128"
    assert redact(GUARD) == GUARD


# -- the real command -------------------------------------------------------------------


def _subprocess_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", **extra}


def test_cli_subprocess_bad_and_clean(fixtures: Path) -> None:
    bad = subprocess.run(
        [BIN, "doctor", str(fixtures / "doctor_bad.jsonc"), "--inspect", "--no-probe"],
        capture_output=True,
        text=True,
        env=_subprocess_env(HTTPS_PROXY="http://alice:hunter2@proxy.example:3128"),
        timeout=60,
    )
    assert bad.returncode == 1, bad.stderr
    assert "ERROR    [mdns]" in bad.stdout
    assert "ERROR    [ca]" in bad.stdout
    assert "hunter2" not in bad.stdout
    clean = subprocess.run(
        [BIN, "doctor", str(fixtures / "doctor_clean.json"), "--json", "--no-probe"],
        capture_output=True,
        text=True,
        env=_subprocess_env(**CLEAN_ENV),
        timeout=60,
    )
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout) == []


def test_cli_invalid_inputs_exit_2(
    fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "opencode.json"
    broken.write_text('{\n "server": {"mdns": true,}\n "x": 1}')
    assert cli.main(["doctor", str(broken)]) == 2
    assert f"{broken}:2: JSON syntax error" in capsys.readouterr().err
    assert cli.main(["doctor", str(fixtures / "doctor_clean.json"), "--proxy-url", "http://"]) == 2
    bad_policy = tmp_path / "p.yaml"
    bad_policy.write_text("version: 1\ndestinations:\n  - use: nope\n")
    assert (
        cli.main(["doctor", str(fixtures / "doctor_clean.json"), "--policy", str(bad_policy)]) == 2
    )
