"""A gateway host for real, with the operators guide's gateway rules loaded as written
(nftables, or iptables): agent ns --(agents0)-- gateway ns --- upstream ns. The agent's
default route is the gateway, which runs ``egress-guard run --transparent``; what the
agent sends is decided by the guard, nothing else is forwarded. Needs root, iproute2
and nft/iptables.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from deploy.test_netns import in_netns, ip
from deploy.test_transparent_netns import GUARD_PORT, _https_get, _run, _wait_listening
from support.prereq import missing
from support.procfs import terminate
from support.proxy import EGRESS_GUARD, whole_lines
from support.upstream import Upstream

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]


def guide_block(marker: str) -> str:
    """The code block after ``<!-- marker`` in docs/operators-guide.md."""
    text = (ROOT / "docs" / "operators-guide.md").read_text(encoding="utf-8")
    after = text.split(f"<!-- {marker}", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


@dataclass
class Routed:
    agent_ns: str
    gateway_ns: str
    upstream_ns: str
    agent_ip: str
    upstream_ip: str
    tls: Upstream
    udp: socket.socket
    audit: Path
    log: Path


@pytest.fixture(params=["gateway-nft", "gateway-iptables"])
def routed(request: pytest.FixtureRequest, ca: trustme.CA) -> Iterator[Routed]:
    """agent ns --(agents0)-- gateway ns (egress-guard --transparent, the guide's
    rules) --- upstream ns. The agent's default route is the gateway."""
    marker: str = request.param
    tool = "nft" if marker == "gateway-nft" else "iptables"
    if os.geteuid() != 0:
        missing("gateway test: needs root to create namespaces")
    for prog in ("ip", "ss", tool):
        if shutil.which(prog) is None:
            missing(f"gateway test: {prog} is not installed")
    tag = secrets.token_hex(3)
    names = [f"eg-ag-{tag}", f"eg-gw-{tag}", f"eg-up-{tag}"]
    agent_ns, gw_ns, up_ns = names
    x = random.randrange(256)
    agent_ip, gw_a, gw_u, up_ip = (
        f"10.202.{x}.2", f"10.202.{x}.1", f"10.203.{x}.1", f"10.203.{x}.2"
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="eg-gw-"))
    created: list[str] = []
    guard: subprocess.Popen[bytes] | None = None
    ups: list[Upstream] = []
    socks: list[socket.socket] = []
    try:
        for ns in names:
            try:
                ip("netns", "add", ns)
            except RuntimeError as e:
                missing(f"gateway test: 'ip netns add' is unavailable ({e})")
            created.append(ns)
        ip("link", "add", f"ega{tag}", "netns", agent_ns, "type", "veth",
           "peer", "name", "agents0", "netns", gw_ns)  # fmt: skip
        ip("link", "add", f"egu{tag}", "netns", gw_ns, "type", "veth",
           "peer", "name", f"egv{tag}", "netns", up_ns)  # fmt: skip
        ip("-n", agent_ns, "addr", "add", f"{agent_ip}/30", "dev", f"ega{tag}")
        ip("-n", gw_ns, "addr", "add", f"{gw_a}/30", "dev", "agents0")
        ip("-n", gw_ns, "addr", "add", f"{gw_u}/30", "dev", f"egu{tag}")
        ip("-n", up_ns, "addr", "add", f"{up_ip}/30", "dev", f"egv{tag}")
        for ns, dev in (
            (agent_ns, f"ega{tag}"), (gw_ns, "agents0"), (gw_ns, f"egu{tag}"),
            (up_ns, f"egv{tag}"), (agent_ns, "lo"), (gw_ns, "lo"), (up_ns, "lo"),
        ):  # fmt: skip
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", agent_ns, "route", "add", "default", "via", gw_a)
        ip("-n", up_ns, "route", "add", "default", "via", gw_u)
        _run("ip", "netns", "exec", gw_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        block = guide_block(marker)
        if tool == "nft":
            r = subprocess.run(
                ["ip", "netns", "exec", gw_ns, "nft", "-f", "-"],
                input=block, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
        else:
            lines = [ln.split() for ln in block.splitlines() if ln.startswith("ip")]
            assert len(lines) == 3, block
            for argv in lines:
                _run("ip", "netns", "exec", gw_ns, *argv)
        cert = ca.issue_cert("api.test", "other.test")
        tls_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(tls_ctx)
        tls = in_netns(up_ns, lambda: Upstream(tls_ctx, host=up_ip))
        ups.append(tls)

        def udp_listener() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((up_ip, 0))
            s.settimeout(0.5)
            return s

        udp = in_netns(up_ns, udp_listener)
        socks.append(udp)
        policy = work / "policy.yaml"
        policy.write_text(
            "version: 1\n"
            "destinations:\n"
            "  - name: api\n"
            "    hosts: [api.test]\n"
            f"    ports: [{tls.port}]\n"
            "network:\n"
            f"  allow_cidrs: [{up_ip}/32]\n"
            f"  resolve: {{api.test: {up_ip}, other.test: {up_ip}}}\n"
            "clients:\n"
            f"  allow_cidrs: [{agent_ip}/32]\n"
        )
        audit, log = work / "audit.log", work / "guard.log"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        with log.open("wb") as out:
            guard = subprocess.Popen(
                [
                    "ip", "netns", "exec", gw_ns, EGRESS_GUARD, "run", "--transparent",
                    "--listen", f"0.0.0.0:{GUARD_PORT}", "--policy", str(policy),
                    "--confdir", str(work / "conf"), "--audit-log", str(audit),
                    "--audit-fsync", "always",
                ],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        _wait_listening(gw_ns, guard, log)
        yield Routed(agent_ns, gw_ns, up_ns, agent_ip, up_ip, tls, udp, audit, log)
    finally:
        terminate(guard)
        for up in ups:
            up.close()
        for s in socks:
            s.close()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        shutil.rmtree(work, ignore_errors=True)


def test_a_gateway_decides_what_its_agents_send_and_forwards_nothing_else(
    routed: Routed, ca_file: Path
) -> None:
    r = routed
    ok = _https_get(r.agent_ns, ca_file, r.upstream_ip, r.tls.port, "api.test")
    assert isinstance(ok, bytes) and b"upstream-ok GET /direct" in ok, (ok, r.log.read_text())
    refused = _https_get(r.agent_ns, ca_file, r.upstream_ip, r.tls.port, "other.test")
    assert isinstance(refused, str), refused
    assert r.tls.seen.connections == 1 and r.tls.seen.snis == ["api.test"]

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"data in a datagram", (r.upstream_ip, r.udp.getsockname()[1]))

    in_netns(r.agent_ns, send)
    with pytest.raises(TimeoutError):
        r.udp.recvfrom(64)  # not forwarded

    got = [json.loads(x) for x in whole_lines(r.audit) if '"event":"decision"' in x]
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        got = [json.loads(x) for x in whole_lines(r.audit) if '"event":"decision"' in x]
    rows = [(d["client"], d["host"], d["decision"], d["reason"]) for d in got]
    assert rows == [
        (r.agent_ip, "api.test", "allow", "allowlisted"),
        (r.agent_ip, "other.test", "block", "not_allowlisted"),
    ], got
