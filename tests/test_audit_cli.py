"""``egress-guard audit verify|summary|learn`` on logs written by the real AuditLog.

The commands run as real subprocesses of the installed ``egress-guard`` and through
``cli.main`` in-process (same parser and code, fast). The tamper cases of ``verify`` are
in ``adversarial/test_audit_tampering.py``; the sample log is ``support.audit_sample``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.audit_sample import dec, lines_of, rewrite, write_sample
from support.rotated import rotated_set

from egress_guard.cli import app as cli
from egress_guard.engine import Decision, Engine, Match
from egress_guard.engine.rules.names import decide_target
from egress_guard.policy import load_catalog, load_policy_text
from egress_guard.sinks.audit import AuditLog
from egress_guard.sinks.audit.read import order_files

BIN = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "egress-guard")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str, Path]]:
    """Real ``egress-guard audit ...`` subprocesses, started together (each one pays
    for Python and mitmproxy imports), then checked by the tests below."""
    d = tmp_path_factory.mktemp("cli")
    intact = d / "intact.log"
    write_sample(intact)
    edited = d / "edited.log"
    write_sample(edited)
    lines = lines_of(edited)
    lines[3] = lines[3].replace(b'"bytes_up":100', b'"bytes_up":101')
    rewrite(edited, lines)
    rotated = d / "rot" / "audit.log"
    rotated.parent.mkdir()
    with AuditLog(rotated, max_bytes=1200, backups=20) as log:
        for i in range(20):
            log.decision(dec(i, "api.anthropic.com", 443, "allow", "allowlisted", "anthropic"))
    shell_glob = sorted(rotated_set(str(rotated)))  # audit.log audit.log.1 audit.log.10 ...
    jobs: dict[str, tuple[list[str], bytes | None, Path]] = {
        "verify_edited": (["verify", str(edited)], None, edited),
        "verify_stdin": (
            ["verify", "-"],
            intact.read_bytes().replace(b"github.com", b"gitlab.com"),
            intact,
        ),
        "verify_rotated": (["verify", "--require-start", *shell_glob], None, rotated),
        "summary": (["summary", "--json", str(intact)], None, intact),
        "learn": (["learn", str(intact), "-o", str(d / "learned.yaml")], None, intact),
    }
    procs = {
        name: subprocess.Popen(
            [BIN, "audit", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, (argv, _, _) in jobs.items()
    }
    out: dict[str, tuple[int, str, str, Path]] = {}
    for name, proc in procs.items():
        so, se = proc.communicate(jobs[name][1] or b"", timeout=60)
        out[name] = (proc.returncode, so.decode(), se.decode(), jobs[name][2])
    return out


Runs = dict[str, tuple[int, str, str, Path]]

# -- verify ------------------------------------------------------------------------------


def test_verify_edited_field_subprocess(runs: Runs) -> None:
    rc, out, _, path = runs["verify_edited"]
    assert rc == 1
    assert out.startswith(f"FAIL {path}:4: edited:"), out


def test_verify_reads_stdin(runs: Runs) -> None:
    rc, out, _, _ = runs["verify_stdin"]
    assert rc == 1 and out.startswith("FAIL <stdin>:8: edited:"), out


def test_verify_rotated_set_in_shell_order(runs: Runs) -> None:
    rc, out, err, path = runs["verify_rotated"]
    files = rotated_set(str(path))
    assert len(files) >= 5
    assert rc == 0, out + err
    assert out.startswith(f"OK: 21 lines in {len(files)} file(s), seq 1..21"), out
    assert "rotation order" in err


def test_order_files() -> None:
    assert order_files(["a.log", "a.log.2", "a.log.10", "a.log.1"]) == [
        "a.log.10",
        "a.log.2",
        "a.log.1",
        "a.log",
    ]
    assert order_files(["x.log", "y.log"]) == ["x.log", "y.log"]
    assert order_files(["y.log.1", "x.log"]) == ["y.log.1", "x.log"]


# -- summary -----------------------------------------------------------------------------


def test_summary_json(runs: Runs) -> None:
    rc, out, err, sample = runs["summary"]
    assert rc == 0, err
    s = json.loads(out)
    assert s["events"] == 14 and s["startups"] == 1 and s["dropped"] == 0
    assert s["policy_loads"] == {"ok": 1, "error": 0}
    strip = {
        k: {f: v for f, v in d.items() if f not in ("first_seen", "last_seen")}
        for k, d in s["destinations"].items()
    }
    assert strip == {
        "anthropic": {
            "allow": 2,
            "block": 0,
            "would_block": 0,
            "connections": 2,
            "bytes_up": 150,
            "bytes_down": 2500,
        },
        "corp": {
            "allow": 0,
            "block": 1,
            "would_block": 0,
            "connections": 0,
            "bytes_up": 0,
            "bytes_down": 0,
        },
        "unlisted": {
            "allow": 0,
            "block": 6,
            "would_block": 1,
            "connections": 0,
            "bytes_up": 0,
            "bytes_down": 0,
        },
    }
    ts = [json.loads(x)["ts"] for x in lines_of(sample)]
    assert s["destinations"]["anthropic"]["first_seen"] == ts[2]
    assert s["destinations"]["anthropic"]["last_seen"] == ts[5]
    blocked = [
        (b["host"], b["port"], b["block"], b["would_block"], b["reasons"])
        for b in s["blocked_hosts"]
    ]
    assert blocked[0] == ("example.org", 8443, 2, 0, {"not_allowlisted": 2})
    assert ("models.opencode.ai", 443, 0, 1, {"not_allowlisted": 1}) in blocked
    assert ("db.corp.example", 443, 1, 0, {"private_address": 1}) in blocked
    assert len(blocked) == 7


def test_summary_table(audit_sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["audit", "summary", str(audit_sample)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["DESTINATION"][:7] == [
        "DESTINATION",
        "ALLOW",
        "BLOCK",
        "WOULD_BLOCK",
        "CONNS",
        "BYTES_UP",
        "BYTES_DOWN",
    ]
    assert rows["anthropic"][1:7] == ["2", "0", "0", "2", "150", "2500"]
    assert rows["example.org:8443"][1:4] == ["2", "0", "not_allowlisted=2"]
    assert rows["models.opencode.ai:443"][1:3] == ["0", "1"]


# -- learn -------------------------------------------------------------------------------


def test_learn_policy(runs: Runs) -> None:
    rc, _, err, sample = runs["learn"]
    assert rc == 0, err
    text = (sample.parent / "learned.yaml").read_text()
    pol = load_policy_text(text, "learned.yaml")
    assert pol.mode == "enforce"
    uses = [line.strip() for line in text.splitlines() if line.strip().startswith("- use:")]
    assert uses == ["- use: anthropic", "- use: models-catalog", "- use: github-downloads"]
    names = [d.name for d in pol.destinations]
    assert names == [
        "anthropic",
        "models-catalog",
        "github-downloads",
        "example-org",
    ]
    ex = next(d for d in pol.destinations if d.name == "example-org")
    assert (ex.hosts, ex.ports) == (["example.org"], [8443])
    # provenance comments
    assert f"first at {sample}:3" in text  # api.anthropic.com
    assert f"first at {sample}:9" in text  # example.org:8443
    # named as left out (private_address is never learned: tests/adversarial/
    # test_learn_never_widens.py)
    assert "#   db.corp.example:443 - block private_address - 1" in text
    assert "self_connection" in text and "invalid_host" in text
    # the learned policy allows exactly the targets seen (names checked before DNS)
    engine = Engine(pol, load_catalog())
    for host, port in [
        ("api.anthropic.com", 443),
        ("models.opencode.ai", 443),
        ("github.com", 443),
        ("example.org", 8443),
    ]:
        assert isinstance(decide_target(engine.compiled, host, port), Match), (host, port)
    for host, port in [
        ("example.org", 443),
        ("evil.example", 443),
        ("api.openai.com", 443),
        ("db.corp.example", 443),
    ]:
        d = decide_target(engine.compiled, host, port)
        assert isinstance(d, Decision) and not d.allowed, (host, port)


def test_learn_nothing_seen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "audit.log"
    with AuditLog(p):
        pass
    assert cli.main(["audit", "learn", str(p)]) == 0
    text = capsys.readouterr().out
    pol = load_policy_text(text, "learned.yaml")
    assert pol.destinations == ()


def test_learn_catalog_choice_and_ip_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "audit.log"
    with AuditLog(p) as log:
        log.decision(dec(1, "github.com", 443, "would_block", "not_allowlisted"))
        log.decision(dec(2, "registry.npmjs.org", 443, "would_block", "not_allowlisted"))
        log.decision(dec(3, "127.0.0.1", 11434, "would_block", "private_address"))
        log.decision(dec(4, "2001:db8::5", 443, "would_block", "ip_literal_not_allowed"))
        log.decision(dec(5, "a.b.opncd.ai", 443, "would_block", "not_allowlisted"))
        log.decision(dec(6, "2606:4700::1111", 443, "would_block", "ip_literal_not_allowed"))
    assert cli.main(["audit", "learn", str(p)]) == 0
    text = capsys.readouterr().out
    pol = load_policy_text(text, "learned.yaml")
    names = [d.name for d in pol.destinations]
    # one entry covering both github.com and the npm registry beats two narrower ones;
    # a catalog wildcard (**.opncd.ai) covers a.b.opncd.ai; a public IP literal gets its
    # own; loopback and documentation addresses are never learned
    assert names == ["opencode-update", "opencode-share", "2606-4700-1111"]
    assert pol.destinations[2].hosts == ["2606:4700::1111"]
