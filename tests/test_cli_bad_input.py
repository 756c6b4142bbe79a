"""Every ``egress-guard`` subcommand, given bad input: one line saying what is wrong,
a non-zero exit, and never a traceback (issue 19, item 7).

Each case runs the installed console script, all of them at once (each starts a Python
interpreter). ``test_every_subcommand_has_a_case`` walks the real parser, so a new
subcommand without a bad-input case here fails the suite.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from support.ports import free_port

from egress_guard.cli.parser import build_parser
from egress_guard.cli.run import listen_address

SCRIPT = str(Path(sys.executable).parent / "egress-guard")
REPO = Path(__file__).resolve().parents[1]


class Case(NamedTuple):
    argv: list[str]
    #: what the one line must say
    says: str
    rc: int = 2


def _audit_record() -> str:
    return json.dumps(
        {"ts": "2026-01-01T00:00:00.000Z", "seq": 1, "event": "startup", "prev": "0" * 64}
    )


@pytest.fixture(scope="module")
def busy() -> Iterator[int]:
    """A port something already listens on (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
        s.listen(1)
        yield int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory, busy: int) -> dict[str, Case]:
    d = tmp_path_factory.mktemp("bad")
    (d / "broken.yaml").write_text(
        "version: 1\ndestinations:\n  - name: a\n    hosts: [a.test]\n    portz: [443]\n"
    )
    (d / "not-audit.log").write_text('{"name": "a config, not an audit log"}\nhello\n')
    (d / "audit.log").write_text(_audit_record() + "\n")
    (d / "opencode.json").write_text("{bad")
    (d / "file").write_text("")
    missing = str(d / "missing" / "dir" / "x")
    under_file = str(d / "file" / "confdir")
    conf = ["--confdir", str(d / "conf"), "--audit-log", str(d / "run-audit.log")]
    listen = ["--listen", f"127.0.0.1:{free_port()}"]
    return {
        "validate": Case(["validate", missing], "cannot read policy"),
        "check": Case(["check", "host:99999"], "outside 1-65535"),
        "check-policy": Case(["check", "--policy", missing, "a.test"], "cannot read policy"),
        "explain": Case(["explain", "--policy", str(d / "broken.yaml"), "a.test"], "portz"),
        "run-policy": Case(["run", "--policy", str(d / "broken.yaml"), *listen, *conf], "portz"),
        "run-listen": Case(
            ["run", "--listen", f"127.0.0.1:{busy}", *conf], f"127.0.0.1:{busy}: cannot listen"
        ),
        "run-metrics": Case(
            ["run", *listen, "--metrics", str(busy), *conf],
            f"--metrics 127.0.0.1:{busy}: cannot listen",
        ),
        "run-confdir": Case(["run", *listen, "--confdir", under_file], "--confdir"),
        "sandbox": Case(["sandbox", *conf], "no command"),
        "sandbox-policy": Case(
            ["sandbox", "--policy", str(d / "broken.yaml"), *conf, "--", "true"], "portz"
        ),
        "run-transparent": Case(
            ["run", *listen, *conf, "--transparent", "--upstream-proxy", "http://127.0.0.1:9"],
            "--transparent cannot be combined with --upstream-proxy",
        ),
        "ca": Case(["ca", "export", "--confdir", str(d / "ca"), "-o", missing], "cannot write"),
        "ca-confdir": Case(["ca", "export", "--confdir", under_file], "cannot use confdir"),
        "audit-verify": Case(["audit", "verify", missing], "No such file"),
        "audit-summary": Case(
            ["audit", "summary", str(d / "not-audit.log")], "not an egress-guard audit log"
        ),
        "audit-learn": Case(
            ["audit", "learn", str(d / "not-audit.log")], "not an egress-guard audit log"
        ),
        "audit-learn-out": Case(
            ["audit", "learn", str(d / "audit.log"), "-o", missing], f"cannot write {missing}"
        ),
        "tail": Case(["tail", missing], "cannot read"),
        "policy": Case(["policy", "show", "--policy", missing], "cannot read policy"),
        "doctor": Case(["doctor", str(d / "opencode.json")], "JSON syntax error"),
        "doctor-url": Case(["doctor", "--proxy-url", "ftp://x y"], "not a proxy URL"),
    }


@pytest.fixture(scope="module")
def results(cases: dict[str, Case]) -> dict[str, subprocess.CompletedProcess[str]]:
    running = {
        key: subprocess.Popen(
            [SCRIPT, *case.argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        for key, case in cases.items()
    }
    done = {}
    for key, p in running.items():
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        done[key] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


def _message_lines(stderr: str) -> list[str]:
    """The lines of a message; a policy error's ``  hint:`` line belongs to its message."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("  ")]


@pytest.mark.parametrize(
    "key",
    [
        "validate", "check", "check-policy", "explain", "run-policy", "run-listen",
        "run-metrics", "run-confdir", "sandbox", "sandbox-policy", "run-transparent", "ca", "ca-confdir", "audit-verify", "audit-summary",
        "audit-learn", "audit-learn-out", "tail", "policy", "doctor", "doctor-url",
    ],
)  # fmt: skip
def test_bad_input_is_one_line(
    key: str, cases: dict[str, Case], results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    case, res = cases[key], results[key]
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == case.rc, (res.returncode, res.stdout, res.stderr)
    lines = _message_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert case.says in lines[0], res.stderr


def test_every_subcommand_has_a_case(cases: dict[str, Case]) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    covered = {c.argv[0] for c in cases.values()}
    assert set(sub.choices) <= covered, set(sub.choices) - covered


def test_run_with_a_broken_policy_starts_nothing(
    cases: dict[str, Case], results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    """No "policy loaded" (of the built-in preset, after the rollback) is logged, and
    no start-up is audited: nothing started."""
    res = results["run-policy"]
    assert "loaded" not in res.stderr and "listening" not in res.stderr, res.stderr
    audit = Path(cases["run-policy"].argv[cases["run-policy"].argv.index("--audit-log") + 1])
    assert not audit.exists() or "policy_loaded" not in audit.read_text()


def test_a_busy_port_is_refused_before_anything_starts(
    results: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    """Not "listening" and then a mitmproxy error naming a flag egress-guard lacks."""
    for key in ("run-listen", "run-metrics"):
        err = results[key].stderr
        assert "listening" not in err and "--mode" not in err and "loaded" not in err, err


def test_a_bare_port_is_on_loopback() -> None:
    assert listen_address("9090") == ("127.0.0.1", 9090)
    assert listen_address("0.0.0.0:9090") == ("0.0.0.0", 9090)
    with pytest.raises(argparse.ArgumentTypeError):
        listen_address("99999")


def test_the_proxy_itself_never_loads_the_preset_after_a_broken_policy(tmp_path: Path) -> None:
    """The proxy's own start-up path (``serve``; ``mitmdump -s addon.py`` loads the same
    addon): a policy that does not load is audited as an error and the proxy does not
    start; mitmproxy's option rollback must not then load, log and audit the built-in
    preset as "policy loaded" (run.py's early check hides this path from ``run``)."""
    import asyncio

    from egress_guard.proxy.master import serve
    from egress_guard.proxy.settings import RunSettings
    from egress_guard.sinks.audit import AuditLog

    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\ndestinations:\n  - name: a\n    hostz: [x]\n")
    log_path = tmp_path / "audit.log"
    audit = AuditLog(str(log_path))
    settings = RunSettings(
        listen=("127.0.0.1", free_port()),
        confdir=str(tmp_path / "conf"),
        idle_timeout=60,
        drain_timeout=1,
        max_model_body=1 << 20,
        max_held_bodies=1 << 24,
        held_body_min_rate=0,
        policy=str(broken),
    )
    try:
        assert asyncio.run(serve(settings, [audit])) == 2
    finally:
        assert audit.shutdown(5)
    loads = [
        r
        for r in map(json.loads, log_path.read_text().splitlines())
        if r["event"] == "policy_loaded"
    ]
    assert [r["result"] for r in loads] == ["error"], loads
