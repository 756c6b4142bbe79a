"""The deployment's network shape with real namespaces instead of Docker or Kubernetes:
an agent namespace whose only link is to the guard's namespace, and an upstream that only
the guard can reach. Through the guard the agent gets its allowed destination; around
the guard it gets nothing.

    client ns  10.200.X.Y+2/30 ──veth── 10.200.X.Y+1/30  guard ns
                                                           egress-guard on :8080
                                                           TLS upstream on UPSTREAM/32 (lo)

The client namespace has no route to UPSTREAM (only its /30), like a pod whose
NetworkPolicy allows the guard alone. Needs root and iproute2; skipped otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import random
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from support.prereq import missing
from support.procfs import terminate
from support.proxy import EGRESS_GUARD, whole_lines
from support.upstream import Upstream

pytestmark = pytest.mark.netns

PROXY_PORT = 8080


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def in_netns[T](name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that has entered network namespace ``name``: sockets it
    creates belong to that namespace (and stay there after the thread ends)."""
    box: dict[str, object] = {}

    def target() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            os.setns(fd, os.CLONE_NEWNET)
        finally:
            os.close(fd)
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, name=f"netns-{name}")
    t.start()
    t.join(60)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@dataclass
class Topology:
    client_ns: str
    guard_ns: str
    client_ip: str
    guard_ip: str
    upstream_ip: str


@pytest.fixture
def topology() -> Iterator[Topology]:
    if os.geteuid() != 0:
        missing("network namespace test: needs root to create namespaces")
    if shutil.which("ip") is None:
        missing("network namespace test: iproute2 ('ip') is not installed")
    if not hasattr(os, "setns"):
        missing("network namespace test: os.setns is unavailable")
    tag = secrets.token_hex(4)
    client_ns, guard_ns = f"eg-client-{tag}", f"eg-guard-{tag}"
    x, y = random.randrange(256), random.randrange(64) * 4
    topo = Topology(
        client_ns,
        guard_ns,
        client_ip=f"10.200.{x}.{y + 2}",
        guard_ip=f"10.200.{x}.{y + 1}",
        upstream_ip=f"10.200.{(x + 128) % 256}.{y + 1}",
    )
    created: list[str] = []
    try:
        try:
            ip("netns", "add", client_ns)
        except RuntimeError as e:
            missing(f"network namespace test: 'ip netns add' is unavailable ({e})")
        created.append(client_ns)
        ip("netns", "add", guard_ns)
        created.append(guard_ns)
        vc, vg = f"egc{tag}", f"egg{tag}"
        ip(
            "link",
            "add",
            vc,
            "netns",
            client_ns,
            "type",
            "veth",
            "peer",
            "name",
            vg,
            "netns",
            guard_ns,
        )
        ip("-n", client_ns, "addr", "add", f"{topo.client_ip}/30", "dev", vc)
        ip("-n", guard_ns, "addr", "add", f"{topo.guard_ip}/30", "dev", vg)
        ip("-n", guard_ns, "addr", "add", f"{topo.upstream_ip}/32", "dev", "lo")
        for ns, dev in ((client_ns, vc), (guard_ns, vg), (client_ns, "lo"), (guard_ns, "lo")):
            ip("-n", ns, "link", "set", dev, "up")
        yield topo
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def test_agent_reaches_upstream_only_through_guard(
    topology: Topology, ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    t = topology
    cert = ca.issue_cert("api.test", "other.test")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(tls)
    upstream = in_netns(t.guard_ns, lambda: Upstream(tls, host=t.upstream_ip))
    guard: subprocess.Popen[bytes] | None = None
    log = tmp_path / "guard.log"
    try:
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            "version: 1\n"
            "mode: enforce\n"
            "destinations:\n"
            "  - name: netns-upstream\n"
            "    hosts: [api.test]\n"
            f"    ports: [{upstream.port}]\n"
            "network:\n"
            "  block_private: true\n"
            f"  allow_cidrs: [{t.upstream_ip}/32]\n"
            f"  resolve: {{api.test: {t.upstream_ip}}}\n"
            "clients:\n"
            f"  allow_cidrs: [{t.client_ip}/32]\n"
        )
        audit = tmp_path / "audit.log"
        confdir = os.environ.get("EG_TEST_CONFDIR") or str(tmp_path / "conf")
        with log.open("wb") as out:
            guard = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    t.guard_ns,
                    EGRESS_GUARD,
                    "run",
                    "--policy",
                    str(policy),
                    "--listen",
                    f"{t.guard_ip}:{PROXY_PORT}",
                    "--confdir",
                    confdir,
                    "--audit-log",
                    str(audit),
                    "--audit-fsync",
                    "always",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=clean_env(),
            )
        wait_listening(t.client_ns, t.guard_ip, PROXY_PORT, guard, log)

        curl = [
            "ip",
            "netns",
            "exec",
            t.client_ns,
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(ca_file),
            "--proxy",
            f"http://{t.guard_ip}:{PROXY_PORT}",
        ]
        ok = subprocess.run(
            [*curl, "-w", "\n%{http_code}", f"https://api.test:{upstream.port}/via-guard"],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )
        assert ok.returncode == 0, ok.stderr + log.read_text()
        body, _, code = ok.stdout.rpartition("\n")
        assert code == "200" and body.startswith("upstream-ok GET /via-guard"), ok.stdout
        assert upstream.seen.snis == ["api.test"]

        blocked = subprocess.run(
            [
                *curl,
                "-o",
                "/dev/null",
                "-w",
                "%{http_connect}",
                f"https://other.test:{upstream.port}/",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )
        assert blocked.returncode != 0 and blocked.stdout == "403", blocked

        # Around the guard: no route to the upstream's address, nothing on the guard's.
        before = upstream.seen.connections
        for addr, expected in (
            (t.upstream_ip, {errno.ENETUNREACH, errno.EHOSTUNREACH}),
            (t.guard_ip, {errno.ECONNREFUSED}),
        ):
            err = in_netns(t.client_ns, lambda a=addr: direct_connect(a, upstream.port))
            assert err in expected, (addr, err and errno.errorcode.get(err))
        assert upstream.seen.connections == before == 1

        def read_decisions() -> list[dict[str, str]]:
            return [json.loads(line) for line in whole_lines(audit) if '"event":"decision"' in line]

        # the audit writer is asynchronous: give the last record a moment to land
        deadline = time.monotonic() + 10
        decisions = read_decisions()
        while len(decisions) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            decisions = read_decisions()
        assert [(d["host"], d["decision"], d["client"]) for d in decisions] == [
            ("api.test", "allow", t.client_ip),
            ("other.test", "block", t.client_ip),
        ]
    finally:
        terminate(guard)
        upstream.close()


def direct_connect(addr: str, port: int) -> int | None:
    """errno of a direct TCP connection attempt, or None if it connected."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        return s.connect_ex((addr, port)) or None
    finally:
        s.close()


def wait_listening(ns: str, host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"egress-guard exited with {proc.returncode}:\n{log.read_text()}")
        if in_netns(ns, lambda: direct_connect(host, port)) is None:
            return
        time.sleep(0.1)
    raise RuntimeError(f"egress-guard did not listen on {host}:{port}:\n{log.read_text()}")
