"""docker/Dockerfile and .dockerignore, checked without a Docker engine: the shape of the
image (multi-stage, non-root, read-only-root friendly, health check) and that its command
line is one the real CLI accepts."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest
from deploy.manifests import (
    DOCKER,
    ROOT,
    Dockerfile,
    DockerIgnore,
    build_context,
    flag_value,
    hostport,
    url_hostport,
)
from deploy.running import RunningGuard

from egress_guard.cli.parser import build_parser
from egress_guard.policy import load_policy


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.load()


def parse_run(argv: list[str]) -> argparse.Namespace:
    """Parse ``egress-guard run ARGV`` with the real parser; a bad flag or value fails."""
    try:
        return build_parser().parse_args(["run", *argv])
    except SystemExit as e:  # argparse exits on errors
        raise AssertionError(f"egress-guard run rejects {argv}") from e


def test_multi_stage_slim_python_312(dockerfile: Dockerfile) -> None:
    froms = [i for i in dockerfile.instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "builder and runtime stages"
    args = {
        i.args.split("=")[0]: i.args.split("=", 1)[1]
        for i in dockerfile.instructions
        if i.keyword == "ARG" and "=" in i.args and i.stage == -1
    }
    base = froms[-1].args.split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    m = re.fullmatch(r"python:(\d+)\.(\d+)-slim(?:-\w+)?(?:@sha256:[0-9a-f]{64})?", base)
    assert m, f"runtime base {base!r} is not a slim Python image"
    assert (int(m.group(1)), int(m.group(2))) >= (3, 12)
    assert "AS builder" in froms[0].args and froms[-1].stage == dockerfile.final_stage
    assert any("--from=builder" in i.args for i in dockerfile.final("COPY"))


def test_runs_as_non_root(dockerfile: Dockerfile) -> None:
    user = dockerfile.last("USER").args
    uid = user.split(":")[0]
    assert uid.isdigit(), "numeric uid, so runAsNonRoot can verify it"
    assert int(uid) != 0
    assert dockerfile.final("USER")[-1].line > max(i.line for i in dockerfile.final("RUN"))


def test_entrypoint_and_cmd_exec_form(dockerfile: Dockerfile) -> None:
    assert dockerfile.entrypoint == ["egress-guard", "run"]
    cmd = dockerfile.cmd
    assert hostport(flag_value(cmd, "--listen")) == ("0.0.0.0", 8080)
    assert hostport(flag_value(cmd, "--metrics")) == ("0.0.0.0", 9090)
    assert flag_value(cmd, "--audit-log") == "-"


def test_cmd_flags_exist_in_run_help(dockerfile: Dockerfile, run_help_flags: set[str]) -> None:
    flags = {a.split("=")[0] for a in dockerfile.cmd if a.startswith("--")}
    assert flags, "CMD passes no flags"
    assert flags <= run_help_flags, f"unknown to egress-guard run: {flags - run_help_flags}"
    args = parse_run(dockerfile.cmd)
    assert args.listen == ("0.0.0.0", 8080)
    assert args.metrics == ("0.0.0.0", 9090)


def test_exposed_ports_match_cmd(dockerfile: Dockerfile) -> None:
    cmd = dockerfile.cmd
    listen = hostport(flag_value(cmd, "--listen"))[1]
    metrics = hostport(flag_value(cmd, "--metrics"))[1]
    assert dockerfile.exposed == {listen, metrics}


def test_healthcheck_targets_metrics_port(dockerfile: Dockerfile) -> None:
    opts, cmd = dockerfile.healthcheck
    assert cmd[0] == "python" and "urllib.request" in cmd[-1], "no curl in a slim image"
    url = dockerfile.env["EGRESS_GUARD_HEALTH_URL"]
    assert url.endswith("/healthz")
    host, port = url_hostport(url)
    assert host == "127.0.0.1"
    assert port == hostport(flag_value(dockerfile.cmd, "--metrics"))[1]
    assert {"interval", "timeout", "retries"} <= set(opts)


def test_writable_paths_are_volumes(dockerfile: Dockerfile) -> None:
    """Read-only root: everything the proxy writes is a volume; the policy is read from
    the path the image ships it at."""
    cmd = dockerfile.cmd
    volumes = dockerfile.volumes
    assert flag_value(cmd, "--confdir") in volumes
    assert "/var/log/egress-guard" in volumes
    policy = flag_value(cmd, "--policy")
    assert os.path.dirname(policy) not in volumes, "an anonymous volume would pin old policies"
    shipped = [
        dst for srcs, dst, inst in dockerfile.copies() if inst.stage == dockerfile.final_stage
    ]
    assert policy in shipped
    assert dockerfile.env["HOME"] == flag_value(cmd, "--confdir")


def test_shipped_policy_validates_and_admits_private_clients() -> None:
    pol = load_policy(DOCKER / "policy.yaml")
    assert pol.mode == "enforce"
    assert {"anthropic", "opencode-auth"} <= {d.name for d in pol.destinations}
    assert set(pol.clients.allow_cidrs) == {
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
        "127.0.0.0/8",
        "::1/128",
    }
    assert pol.network.block_private


def test_copy_sources_are_in_build_context(dockerfile: Dockerfile) -> None:
    ignore = DockerIgnore((ROOT / ".dockerignore").read_text())
    for sources, _dst, inst in dockerfile.copies():
        for src in sources:
            assert (ROOT / src).exists(), f"line {inst.line}: {src} does not exist"
            assert not ignore.excluded(src), f"line {inst.line}: .dockerignore excludes {src}"


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    context = {p.relative_to(ROOT).as_posix() for p in build_context()}
    assert "pyproject.toml" in context and "egress_guard/cli/app.py" in context
    assert "policies/catalog.yaml" in context
    for prefix in (".git/", ".venv/", "tests/", "docs/", ".mypy_cache/"):
        assert not any(p.startswith(prefix) for p in context), prefix
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in context)
    assert not any(p.startswith("docker/") and p != "docker/policy.yaml" for p in context)


def test_dockerignore_matcher() -> None:
    """The matcher the tests above rely on follows Docker's rules."""
    ig = DockerIgnore("*\n!egress_guard/\n**/__pycache__\n!docker/policy.yaml\n")
    assert ig.excluded("tests/test_x.py")
    assert ig.excluded(".git/config")
    assert not ig.excluded("egress_guard/cli/app.py")
    assert ig.excluded("egress_guard/__pycache__/cli.cpython-312.pyc")
    assert not ig.excluded("docker/policy.yaml")
    assert ig.excluded("docker/compose.yaml")


def test_healthcheck_command_probes_a_running_guard(
    dockerfile: Dockerfile, running_guard: RunningGuard
) -> None:
    """The HEALTHCHECK's own command: 0 against a healthy proxy, non-zero when nothing
    answers (a dead proxy must turn the container unhealthy)."""
    _opts, cmd = dockerfile.healthcheck
    argv = [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]
    ok = subprocess.run(
        argv,
        env={**os.environ, "EGRESS_GUARD_HEALTH_URL": running_guard.health_url},
        capture_output=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    closed = subprocess.run(
        argv,
        env={**os.environ, "EGRESS_GUARD_HEALTH_URL": "http://127.0.0.1:1/healthz"},
        capture_output=True,
        timeout=30,
    )
    assert closed.returncode != 0
