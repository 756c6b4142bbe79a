"""``egress-guard check`` and ``egress-guard validate``, run as the installed console script.

Exit codes are the interface: check 0 all allowed / 1 any blocked / 2 errors;
validate 0 ok / 2 invalid, with ``file:line`` on stderr.

Each command starts a Python interpreter, so all of them are started at once by one
module fixture and the tests only read the results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MINIMAL = REPO / "policies" / "minimal.yaml"
PRESETS = sorted(p for p in (REPO / "policies").glob("*.yaml") if p.name != "catalog.yaml")
SCRIPT = Path(sys.executable).parent / "egress-guard"
KEYS = {"target", "host", "port", "decision", "destination", "reason"}

#: files written to a temporary directory; ``{name}`` in a command is replaced by its path
FILES = {
    "static": (
        "version: 1\ninclude: [minimal]\ndestinations:\n"
        "  - name: internal\n    hosts: [gw.example.com]\n"
        "network:\n  resolve:\n    gw.example.com: 10.0.0.7\n"
    ),
    "audit": "version: 1\nmode: audit\ninclude: [minimal]\n",
    "broken": (
        "version: 1\ndestinations:\n  - name: a\n    hosts: [a.example.com]\n"
        "  - name: a\n    hosts: [b.example.com]\n"
    ),
    "line7": (
        "# egress policy for the build agents\n"
        "version: 1\n"
        "mode: enforce\n"
        "destinations:\n"
        "  - name: anthropic\n"
        "    hosts: [api.anthropic.com]\n"
        "    ports: [443, 65536]\n"
    ),
    "dupkey": "version: 1\ndeny:\n  - hosts: [a.example.com]\ndeny: []\n",
    "webfetch": "version: 1\ndestinations:\n  - use: webfetch\n",
}

#: target -> (decision, host or None for "not checked", port, reason, destination)
MANY: dict[str, tuple[str, str | None, int | None, str, str | None]] = {
    "https://api.anthropic.com/v1/messages": ("allow", "api.anthropic.com", 443, "allowlisted", "anthropic"),
    "HTTPS://API.Anthropic.COM.:443/": ("allow", "api.anthropic.com", 443, "allowlisted", "anthropic"),
    "http://api.anthropic.com/": ("block", "api.anthropic.com", 80, "port_not_allowed", "anthropic"),
    "2130706433": ("block", "127.0.0.1", 443, "private_address", None),
    # the built-in presets deny cloud metadata outright (so audit mode cannot lift it)
    "[::ffff:169.254.169.254]:80": ("block", "169.254.169.254", 80, "denylisted", None),
    "[::ffff:10.1.2.3]:80": ("block", "10.1.2.3", 80, "private_address", None),
    "gw.example.com": ("block", "gw.example.com", 443, "private_address", "internal"),
    "exa mple.com": ("block", "exa mple.com", None, "invalid_host", None),
    "a\x01b.example.com": ("block", None, None, "invalid_host", None),
    "https://user@api.anthropic.com/": ("block", None, None, "invalid_host", None),
    "api.anthropic.com:0443": ("block", None, None, "invalid_host", None),
}  # fmt: skip

COMMANDS: dict[str, list[str]] = {
    "minimal": [
        "check", "--policy", "policies/minimal.yaml", "--json", "api.anthropic.com:443", "example.com",
    ],
    "many": ["check", "--policy", "{static}", "--json", *MANY],
    "url": ["check", "--json", "https://api.anthropic.com/v1/messages"],
    "audit": ["check", "--policy", "{audit}", "--json", "example.com", "api.anthropic.com"],
    "human": ["check", "api.anthropic.com", "example.com"],
    "unusable": ["check", "", "exa mple.com", "host:99999"],
    "unusable_one": ["check", "--json", "api.anthropic.com", "host:99999"],
    "broken": ["check", "--policy", "{broken}", "--json", "api.anthropic.com"],
    "line7": ["validate", "{line7}"],
    "presets": ["validate", *map(str, PRESETS)],
    "mixed": ["validate", str(MINIMAL), "{dupkey}", "{webfetch}", "{missing}"],
}  # fmt: skip


class Results:
    def __init__(
        self, procs: Mapping[str, subprocess.CompletedProcess[str]], paths: dict[str, Path]
    ):
        self.procs = procs
        self.paths = paths

    def __getitem__(self, key: str) -> subprocess.CompletedProcess[str]:
        return self.procs[key]


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Results:
    if not SCRIPT.exists():
        pytest.fail(f"console script {SCRIPT} is not installed (pip install -e .)")
    d = tmp_path_factory.mktemp("cli")
    paths = {name: d / f"{name}.yaml" for name in [*FILES, "missing"]}
    for name, text in FILES.items():
        paths[name].write_text(text, encoding="utf-8")
    fmt = {name: str(p) for name, p in paths.items()}
    running = {
        key: subprocess.Popen(
            [str(SCRIPT), *(a.format(**fmt) if a.startswith("{") else a for a in args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for key, args in COMMANDS.items()
    }
    done = {}
    for key, p in running.items():
        out, err = p.communicate(timeout=120)
        done[key] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return Results(done, paths)


def json_lines(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_check_minimal_json(cli: Results) -> None:
    r = cli["minimal"]
    assert r.returncode == 1, r.stderr
    out = json_lines(r.stdout)
    assert len(out) == 2 and len(r.stdout.strip().splitlines()) == 2
    allowed, blocked = out
    assert set(allowed) >= KEYS and set(blocked) >= KEYS
    assert allowed["target"] == "api.anthropic.com:443"
    assert (allowed["host"], allowed["port"]) == ("api.anthropic.com", 443)
    assert (allowed["decision"], allowed["destination"], allowed["reason"]) == (
        "allow",
        "anthropic",
        "allowlisted",
    )
    assert blocked["target"] == "example.com"
    assert (blocked["host"], blocked["port"]) == ("example.com", 443)
    assert (blocked["decision"], blocked["destination"], blocked["reason"]) == (
        "block",
        None,
        "not_allowlisted",
    )


def test_check_many_targets(cli: Results) -> None:
    """URLs, legacy IP spellings, static resolve entries and invalid targets in one run.

    An invalid target is still reported (block, invalid_host: the proxy would refuse it),
    and the run exits 2 as the README says: the question itself was unusable.
    """
    r = cli["many"]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    out = json_lines(r.stdout)
    assert [o["target"] for o in out] == list(MANY)
    for o in out:
        decision, host, port, reason, destination = MANY[str(o["target"])]
        assert (o["decision"], o["reason"], o["destination"]) == (decision, reason, destination), o
        if host is not None:
            assert o["host"] == host, o
        assert o["port"] == port, o


def test_check_url_target_alone_exits_0(cli: Results) -> None:
    r = cli["url"]
    assert r.returncode == 0, r.stderr
    (o,) = json_lines(r.stdout)
    assert (o["decision"], o["destination"], o["host"], o["port"]) == (
        "allow",
        "anthropic",
        "api.anthropic.com",
        443,
    )


def test_check_audit_mode_is_would_block(cli: Results) -> None:
    r = cli["audit"]
    assert r.returncode == 0, r.stderr  # would_block is not a block
    out = json_lines(r.stdout)
    assert [(o["decision"], o["reason"]) for o in out] == [
        ("would_block", "not_allowlisted"),
        ("allow", "allowlisted"),
    ]


def test_check_human_output(cli: Results) -> None:
    r = cli["human"]
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ALLOWED") and "api.anthropic.com:443 (anthropic)" in lines[0]
    blocked = next(line for line in lines if line.startswith("BLOCKED"))
    assert "example.com:443" in blocked and "not_allowlisted" in blocked


def test_check_broken_policy_exits_2(cli: Results) -> None:
    r = cli["broken"]
    assert r.returncode == 2
    assert r.stdout == ""
    broken = cli.paths["broken"]
    assert r.stderr.startswith(f"{broken}:5: duplicate destination name 'a'"), r.stderr
    assert "Traceback" not in r.stderr


def test_validate_line_7(cli: Results) -> None:
    r = cli["line7"]
    assert r.returncode == 2
    assert r.stderr.startswith(f"{cli.paths['line7']}:7:"), r.stderr
    assert "65535" in r.stderr


def test_validate_presets_ok(cli: Results) -> None:
    assert [p.stem for p in PRESETS] == ["minimal", "offline", "standard"]
    r = cli["presets"]
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    for p in PRESETS:
        assert f"{p}: ok" in r.stdout


def test_validate_reports_every_bad_file(cli: Results) -> None:
    r = cli["mixed"]
    assert r.returncode == 2
    assert f"{MINIMAL}: ok" in r.stdout
    assert f"{cli.paths['dupkey']}:4: duplicate key 'deny'" in r.stderr
    assert f"{cli.paths['webfetch']}:3: cannot use 'webfetch'" in r.stderr
    assert f"{cli.paths['missing']}: cannot read policy" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_unusable_targets_exit_2(cli: Results) -> None:
    """Issue 19 item 8: ``''``, ``exa mple.com`` and ``host:99999`` are not questions
    about a destination: each is still reported, and the exit code is 2 (README)."""
    r = cli["unusable"]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("BLOCKED")]
    assert len(lines) == 3 and all("invalid_host" in line for line in lines), r.stdout
    assert "outside 1-65535" in r.stdout
    r = cli["unusable_one"]
    assert r.returncode == 2, r.stderr  # one unusable target among allowed ones
    assert [o["decision"] for o in json_lines(r.stdout)] == ["allow", "block"]
