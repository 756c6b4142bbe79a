"""``egress-guard sandbox -- COMMAND``: the command's only way out is the guard.

Each test runs the real command line as root: a network namespace with loopback alone,
the guard's proxy and its catch-all listener inside it, upstreams on the host. A
connection that ignores the proxy (a raw socket, ``curl --noproxy '*'``) is caught by
the sandbox's redirect, decided and recorded; it never reaches the host's listener.
Nothing leaves the machine: the upstreams are on the host's loopback, and the host's
outward address is only ever the destination of connections the sandbox catches.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.policies import make_policy
from support.prereq import missing
from support.proxy import EGRESS_GUARD
from support.upstream import Upstream

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        missing("egress-guard sandbox needs root")
    for tool in ("ip", "nft", "curl"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (scripts/install-test-peers.sh)")


def outward_address() -> str:
    """An address of this host that is not loopback (where a route out would start)."""
    r = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    )
    for line in r.stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    missing("this host has no non-loopback IPv4 address")


class Listener:
    """A TCP (or UDP) listener on the host that counts what reaches it."""

    def __init__(self, host: str, kind: socket.SocketKind = socket.SOCK_STREAM) -> None:
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.arrived = 0
        self.kind = kind
        if kind == socket.SOCK_STREAM:
            self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                if self.kind == socket.SOCK_STREAM:
                    conn, _ = self.sock.accept()
                    conn.close()
                else:
                    self.sock.recvfrom(4096)
            except OSError:
                continue
            self.arrived += 1

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def sandbox(
    tmp_path: Path,
    policy: str,
    *command: str,
    options: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    pol = tmp_path / "policy.yaml"
    pol.write_text(policy)
    audit = tmp_path / "audit.jsonl"
    audit.unlink(missing_ok=True)
    confdir = os.environ.get("EG_TEST_CONFDIR") or str(tmp_path / "confdir")
    res = subprocess.run(
        [
            EGRESS_GUARD,
            "sandbox",
            "--policy",
            str(pol),
            "--audit-log",
            str(audit),
            "--confdir",
            confdir,
            *options,
            "--",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    records = (
        [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    )
    return res, [r for r in records if r.get("event") == "decision"]


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream(None) as up:
        yield up


def test_exit_status_output_and_cwd_pass_through(tmp_path: Path) -> None:
    res, _ = sandbox(tmp_path, make_policy(80), "sh", "-c", "pwd; echo out; echo err >&2; exit 7")
    assert res.returncode == 7, res.stderr
    assert res.stdout.splitlines() == [os.getcwd(), "out"]
    assert "err" in res.stderr


def test_only_loopback_inside_and_the_proxy_variables_point_at_the_guard(tmp_path: Path) -> None:
    script = "ip -o link; env | grep -i _proxy | sort"
    res, _ = sandbox(tmp_path, make_policy(80), "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    links = [line for line in res.stdout.splitlines() if ": " in line and "link/" in line]
    assert len(links) == 1 and " lo:" in links[0], res.stdout
    assert "HTTPS_PROXY=http://127.0.0.1:8080" in res.stdout
    assert "https_proxy=http://127.0.0.1:8080" in res.stdout
    assert "NO_PROXY=localhost,127.0.0.1,::1" in res.stdout


def test_a_proxied_request_to_an_allowed_upstream_succeeds(
    tmp_path: Path, upstream: Upstream
) -> None:
    res, decisions = sandbox(
        tmp_path,
        make_policy(upstream.port),
        "curl",
        "-sS",
        f"http://api.test:{upstream.port}/hello",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "upstream-ok GET /hello\n"
    assert any(d["host"] == "api.test" and d["decision"] == "allow" for d in decisions), decisions


def test_an_unlisted_host_is_refused(tmp_path: Path, upstream: Upstream) -> None:
    url = f"http://other.test:{upstream.port}/"
    res, decisions = sandbox(
        tmp_path,
        make_policy(upstream.port),
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        url,
    )
    assert res.stdout == "403", res.stderr
    assert upstream.seen.connections == 0
    assert [d["reason"] for d in decisions if d["host"] == "other.test"] == ["not_allowlisted"]


RAW = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"hello, is anybody there?\\n")
s.settimeout(10)
print(repr(s.recv(100)))
"""


def test_direct_connections_never_arrive_and_are_recorded_with_their_destination(
    tmp_path: Path, upstream: Upstream
) -> None:
    out = outward_address()
    there = Listener("0.0.0.0")
    try:
        script = (
            f"{sys.executable} -c '{RAW}' {out} {there.port}; "
            f"curl -sS --max-time 10 --noproxy '*' http://{out}:{there.port}/ ; echo; "
            f"curl -sS --max-time 10 --noproxy '*' --resolve api.test:{there.port}:{out} "
            f"http://api.test:{there.port}/ ; echo; "
            "exit 0"
        )
        res, decisions = sandbox(
            tmp_path, make_policy(upstream.port, there.port), "sh", "-c", script
        )
    finally:
        there.close()
    assert res.returncode == 0, res.stderr
    assert there.arrived == 0, "a connection around the proxy reached the host"
    # refused: closed at once (not left hanging); curl gets the guard's 403 and why
    assert res.stdout.splitlines()[0] == "b''", res.stdout
    refusals = [line for line in res.stdout.splitlines()[1:] if line]
    assert len(refusals) == 2 and all("egress-guard" in r for r in refusals), res.stdout
    direct = [
        d
        for d in decisions
        if f"direct connection to {out}:{there.port}" in (d.get("detail") or "")
    ]
    assert len(direct) == 3, decisions
    assert all(d["decision"] == "block" for d in direct)
    raw_and_curl = [d for d in direct if d["host"] == out]
    assert len(raw_and_curl) == 2 and all(d["port"] == there.port for d in raw_and_curl)
    named = [d for d in direct if d["host"] == "api.test"]
    assert [d["reason"] for d in named] == ["direct_connection"]


def test_a_direct_connection_to_an_allowed_name_at_its_address_goes_through_the_guard(
    tmp_path: Path, upstream: Upstream
) -> None:
    """``curl --noproxy`` to api.test at its checked address (127.0.0.1, which inside the
    sandbox is the sandbox's own loopback): caught, allowed, and relayed by the guard to
    the host's loopback service (as Ollama on the host's localhost would be)."""
    url = f"http://api.test:{upstream.port}/direct"
    res, decisions = sandbox(
        tmp_path,
        make_policy(upstream.port),
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "--resolve",
        f"api.test:{upstream.port}:127.0.0.1",
        url,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "upstream-ok GET /direct\n"
    allowed = [d for d in decisions if d["decision"] == "allow"]
    assert allowed and "direct connection to 127.0.0.1" in allowed[0]["detail"]


DNS = r"""
import socket, sys
try:
    print(socket.getaddrinfo("unlisted.example.com", 443))
except OSError as e:
    print("no answer:", e)
q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
try:
    s.sendto(q, (sys.argv[1], int(sys.argv[2])))
    print("answer:", s.recvfrom(512))
except OSError as e:
    print("no answer:", e)
"""


def test_dns_and_udp_get_no_answer_and_reach_nothing(tmp_path: Path) -> None:
    out = outward_address()
    resolver = Listener("0.0.0.0", socket.SOCK_DGRAM)
    try:
        res, _ = sandbox(
            tmp_path, make_policy(80), sys.executable, "-c", DNS, out, str(resolver.port)
        )
    finally:
        resolver.close()
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("no answer:") for line in lines), res.stdout
    assert resolver.arrived == 0


def _netns_holders(inode: str) -> list[str]:
    holders = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/ns/net") == inode:
                    holders.append(pid)
            except OSError:
                continue
    return holders


def _start(tmp_path: Path, *command: str) -> subprocess.Popen[str]:
    pol = tmp_path / "policy.yaml"
    pol.write_text(make_policy(80))
    confdir = os.environ.get("EG_TEST_CONFDIR") or str(tmp_path / "confdir")
    argv = [EGRESS_GUARD, "sandbox", "--policy", str(pol), "--audit-log", str(tmp_path / "a.jsonl")]
    return subprocess.Popen(
        [*argv, "--confdir", confdir, "--", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def test_sigterm_reaches_the_command_and_everything_is_torn_down(tmp_path: Path) -> None:
    script = 'trap "echo got-term; exit 3" TERM; readlink /proc/self/ns/net; sleep 30 >/dev/null 2>&1 & wait'
    p = _start(tmp_path, "sh", "-c", script)
    try:
        assert p.stdout is not None
        inode = p.stdout.readline().strip()
        assert inode.startswith("net:[") and inode != os.readlink("/proc/self/ns/net")
        assert _netns_holders(inode)
        p.send_signal(15)
        out, err = p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode == 3, err
    assert "got-term" in out
    # the sleep was left behind by sh: it still holds the namespace (with no way out);
    # the guard's own sockets there are closed
    for pid in _netns_holders(inode):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[0] == b"sleep", pid
        os.kill(int(pid), 9)


def test_the_command_dies_with_a_killed_guard(tmp_path: Path) -> None:
    p = _start(
        tmp_path,
        sys.executable,
        "-c",
        "import os, time; print(os.getpid(), flush=True); time.sleep(60)",
    )
    try:
        assert p.stdout is not None
        child = int(p.stdout.readline())
        p.kill()
        p.wait(timeout=10)
        for _ in range(100):
            if (
                not os.path.exists(f"/proc/{child}")
                or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"
            ):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the command outlived the killed guard")
    finally:
        p.kill()


def test_inspect_gives_the_command_the_guards_ca(tmp_path: Path) -> None:
    script = 'echo "$NODE_EXTRA_CA_CERTS"; echo "$SSL_CERT_FILE"; echo "$REQUESTS_CA_BUNDLE"'
    res, _ = sandbox(tmp_path, make_policy(80), "sh", "-c", script, options=("--inspect",))
    assert res.returncode == 0, res.stderr
    ca, bundle, requests_bundle = res.stdout.splitlines()
    assert bundle == requests_bundle
    ca_pem = Path(ca).read_text()
    assert "BEGIN CERTIFICATE" in ca_pem
    text = Path(bundle).read_text()
    assert text.endswith(ca_pem) and text.count("BEGIN CERTIFICATE") > 1


def test_standard_output_is_the_commands_and_the_audit_log_goes_to_the_confdir(
    tmp_path: Path, upstream: Upstream
) -> None:
    pol = tmp_path / "policy.yaml"
    pol.write_text(make_policy(upstream.port))
    confdir = tmp_path / "conf"
    url = f"http://api.test:{upstream.port}/x"
    guard = [EGRESS_GUARD, "sandbox", "--policy", str(pol), "--confdir", str(confdir)]
    res = subprocess.run(
        [*guard, "--", "curl", "-sS", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "upstream-ok GET /x\n"
    records = [
        json.loads(line) for line in (confdir / "sandbox-audit.jsonl").read_text().splitlines()
    ]
    assert any(r.get("event") == "decision" and r["host"] == "api.test" for r in records)


def test_the_same_inside_a_user_namespace(tmp_path: Path, upstream: Upstream) -> None:
    """The path taken without root (forced here as root): the namespace is made inside a
    user namespace of its own; the proxy works, a direct connection is caught."""
    out = outward_address()
    there = Listener("0.0.0.0")
    script = (
        "cat /proc/self/uid_map; "
        f"curl -sS http://api.test:{upstream.port}/userns; "
        f"curl -sS --max-time 10 --noproxy '*' http://{out}:{there.port}/; exit 5"
    )
    env = {**os.environ, "EGRESS_GUARD_SANDBOX_USERNS": "1"}
    try:
        res, decisions = sandbox(tmp_path, make_policy(upstream.port), "sh", "-c", script, env=env)
    finally:
        there.close()
    assert res.returncode == 5, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["0", "0", "1"], res.stdout  # a user namespace: one uid
    assert lines[1] == "upstream-ok GET /userns", res.stdout
    assert there.arrived == 0
    assert any(
        f"direct connection to {out}:{there.port}" in (d.get("detail") or "") for d in decisions
    )
