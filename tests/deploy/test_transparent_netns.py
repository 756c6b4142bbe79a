"""``egress-guard run --transparent`` for real, in network namespaces the test makes.

A sidecar's shape: one namespace whose outbound TCP is redirected (nftables, or
iptables) to the guard, which runs there as another user, excluded by its UID.

    namespace: lo (127.0.0.1, and the upstreams' UPSTREAM/32, OTHER/32)
      nat output: tcp to anything but 127.0.0.0/8, from any UID but the guard's
                  -> redirect to 127.0.0.1:GUARD
      egress-guard run --transparent --listen 127.0.0.1:GUARD (UID 65534)
      TLS upstream UPSTREAM:P (api.test), plain upstream UPSTREAM:Q, TLS upstream OTHER:R

Connections that never mention a proxy: an allowed name reaches its upstream; an
unlisted name, a connection that names no server, and a connection whose SNI names an
allowed host but goes to another address are refused and recorded with their
destination, and never arrive.

(A gateway's shape, three namespaces: test_gateway_host.py.)

Needs root, iproute2, setpriv and nft/iptables.
"""

from __future__ import annotations

import json
import os
import re
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
from typing import Any

import pytest
import trustme
from deploy.test_netns import in_netns, ip
from support.prereq import missing
from support.procfs import terminate
from support.proxy import EGRESS_GUARD, whole_lines
from support.upstream import Upstream

pytestmark = pytest.mark.netns

UPSTREAM = "203.0.113.7"
OTHER = "203.0.113.8"
GUARD_PORT = 15001
GUARD_UID = 65534  # nobody


@dataclass
class Gateway:
    ns: str
    tls: Upstream
    plain: Upstream
    other: Upstream
    audit: Path
    log: Path
    confdir: Path


def _run(*argv: str) -> None:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")


def _redirect(ns: str, tool: str) -> None:
    """The sidecar recipe of docs/operators-guide.md, in ``ns``."""
    if tool == "nft":
        rules = (
            "table ip egress_guard {\n"
            "  chain output {\n"
            "    type nat hook output priority -100; policy accept;\n"
            f"    ip daddr != 127.0.0.0/8 meta l4proto tcp meta skuid != {GUARD_UID} "
            f"redirect to :{GUARD_PORT}\n"
            "  }\n"
            "}\n"
        )
        r = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"],
            input=rules,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode != 0:
            raise RuntimeError(f"nft: {r.stderr.strip()}")
    else:
        _run(
            "ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
            "!", "-d", "127.0.0.0/8", "-m", "owner", "!", "--uid-owner", str(GUARD_UID),
            "-j", "REDIRECT", "--to-ports", str(GUARD_PORT),
        )  # fmt: skip


@pytest.fixture(params=["nft", "iptables"])
def gateway(request: pytest.FixtureRequest, ca: trustme.CA, ca_file: Path) -> Iterator[Gateway]:
    """The sidecar shape; ``TOOL-VARIANT`` (indirect) runs the guard with ``--inspect``
    (the destination has paths) or in audit mode."""
    tool, _, variant = str(request.param).partition("-")
    if os.geteuid() != 0:
        missing("transparent mode test: needs root to create namespaces")
    for prog in ("ip", "ss", "setpriv", tool):
        if shutil.which(prog) is None:
            missing(f"transparent mode test: {prog} is not installed")
    ns = f"eg-gw-{secrets.token_hex(4)}"
    work = Path(tempfile.mkdtemp(prefix="eg-gw-"))
    os.chmod(work, 0o755)
    owned = work / "guard"  # the guard's own files: it runs as GUARD_UID
    owned.mkdir()
    os.chown(owned, GUARD_UID, GUARD_UID)
    guard: subprocess.Popen[bytes] | None = None
    ups: list[Upstream] = []
    created = False
    try:
        try:
            ip("netns", "add", ns)
        except RuntimeError as e:
            missing(f"transparent mode test: 'ip netns add' is unavailable ({e})")
        created = True
        ip("-n", ns, "link", "set", "lo", "up")
        for addr in (UPSTREAM, OTHER):
            ip("-n", ns, "addr", "add", f"{addr}/32", "dev", "lo")
        _redirect(ns, tool)
        cert = ca.issue_cert("api.test", "other.test")

        def tls_ctx() -> ssl.SSLContext:
            c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            cert.configure_cert(c)
            return c

        tls = in_netns(ns, lambda: Upstream(tls_ctx(), host=UPSTREAM))
        ups.append(tls)
        plain = in_netns(ns, lambda: Upstream(None, host=UPSTREAM))
        ups.append(plain)
        other = in_netns(ns, lambda: Upstream(tls_ctx(), host=OTHER))
        ups.append(other)
        policy = work / "policy.yaml"
        policy.write_text(
            "version: 1\n"
            f"mode: {'audit' if variant == 'audit' else 'enforce'}\n"
            "destinations:\n"
            "  - name: api\n"
            "    hosts: [api.test]\n"
            f"    ports: [{tls.port}, {plain.port}, {other.port}]\n"
            + ("    paths: [/direct]\n" if variant == "inspect" else "")
            + "network:\n"
            f"  allow_cidrs: [{UPSTREAM}/32, {OTHER}/32]\n"
            f"  resolve: {{api.test: {UPSTREAM}, other.test: {UPSTREAM}}}\n"
            # a connection to an address of this host comes from that address
            "clients:\n"
            "  allow_cidrs: [127.0.0.0/8, 203.0.113.0/24]\n"
        )
        audit = owned / "audit.log"
        log = work / "guard.log"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["HOME"] = str(owned)
        with log.open("wb") as out:
            guard = subprocess.Popen(
                [
                    "ip", "netns", "exec", ns,
                    "setpriv", f"--reuid={GUARD_UID}", f"--regid={GUARD_UID}", "--clear-groups",
                    # only to read an interpreter installed under /root (pyenv, 0700)
                    "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
                    EGRESS_GUARD, "run", "--transparent",
                    "--listen", f"127.0.0.1:{GUARD_PORT}",
                    "--policy", str(policy),
                    "--confdir", str(owned / "conf"),
                    "--audit-log", str(audit),
                    "--audit-fsync", "always",
                    *(["--inspect", "--upstream-ca", str(ca_file)] if variant == "inspect" else []),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )  # fmt: skip
        _wait_listening(ns, guard, log)
        yield Gateway(ns, tls, plain, other, audit, log, owned / "conf")
    finally:
        terminate(guard)
        for up in ups:
            up.close()
        if created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        if not os.environ.get("EG_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


def _wait_listening(ns: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"egress-guard exited with {proc.returncode}:\n{log.read_text()}")
        listening = subprocess.run(
            ["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{GUARD_PORT}"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        if listening.strip():
            return
        time.sleep(0.1)
    raise RuntimeError(f"egress-guard did not start:\n{log.read_text()}")


def _https_get(ns: str, ca_file: Path, addr: str, port: int, sni: str) -> bytes | str:
    """GET / over TLS to ``addr:port`` naming ``sni``, straight to the address (no
    proxy anywhere): the answer's bytes, or the error's text."""

    def go() -> bytes | str:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        try:
            with (
                socket.create_connection((addr, port), timeout=10) as raw,
                ctx.wrap_socket(raw, server_hostname=sni) as s,
            ):
                s.sendall(f"GET /direct HTTP/1.1\r\nHost: {sni}:{port}\r\n\r\n".encode())
                return _read_answer(s)
        except OSError as e:
            return f"{type(e).__name__}: {e}"

    return in_netns(ns, go)


def _plain(ns: str, addr: str, port: int, data: bytes) -> bytes | str:
    def go() -> bytes | str:
        try:
            with socket.create_connection((addr, port), timeout=10) as s:
                s.sendall(data)
                return _read_answer(s)
        except OSError as e:
            return f"{type(e).__name__}: {e}"

    return in_netns(ns, go)


def _read_answer(s: socket.socket) -> bytes:
    """One HTTP/1.1 answer: its head and a Content-Length body (or up to the close)."""
    got = b""
    while True:
        head, sep, body = got.partition(b"\r\n\r\n")
        if sep:
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length is not None and len(body) >= int(length.group(1)):
                return got
        chunk = s.recv(65536)
        if not chunk:
            return got
        got += chunk


def _decisions(gw: Gateway, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        found = [json.loads(line) for line in whole_lines(gw.audit) if '"event":"decision"' in line]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_redirected_connections_are_decided_by_name_and_address(
    gateway: Gateway, ca_file: Path
) -> None:
    gw = gateway
    ok = _https_get(gw.ns, ca_file, UPSTREAM, gw.tls.port, "api.test")
    assert isinstance(ok, bytes) and ok.startswith(b"HTTP/1.1 200"), (ok, gw.log.read_text())
    assert b"upstream-ok GET /direct" in ok
    assert gw.tls.seen.snis == ["api.test"] and gw.tls.seen.connections == 1

    plain = _plain(
        gw.ns,
        UPSTREAM,
        gw.plain.port,
        f"GET /plain HTTP/1.1\r\nHost: api.test:{gw.plain.port}\r\n\r\n".encode(),
    )
    assert isinstance(plain, bytes) and b"upstream-ok GET /plain" in plain, plain
    assert gw.plain.seen.requests == [("GET", "/plain", f"api.test:{gw.plain.port}")]

    # an unlisted name, on the same address and port: refused, never arrives
    unlisted = _https_get(gw.ns, ca_file, UPSTREAM, gw.tls.port, "other.test")
    assert isinstance(unlisted, str), unlisted
    # an allowed name on a connection to another address (fronting): refused
    fronted = _https_get(gw.ns, ca_file, OTHER, gw.other.port, "api.test")
    assert isinstance(fronted, str), fronted
    # bytes that name no server at all
    nameless = _plain(gw.ns, UPSTREAM, gw.plain.port, b"\x00\x01 not a protocol\r\n\r\n")
    assert not isinstance(nameless, bytes) or b"upstream-ok" not in nameless, nameless
    assert gw.tls.seen.connections == 1
    assert gw.other.seen.connections == 0
    assert len(gw.plain.seen.requests) == 1

    got = _decisions(gw, 6)
    rows = [(d["host"], d["port"], d["method"], d["decision"], d["reason"]) for d in got]
    assert rows == [
        ("api.test", gw.tls.port, None, "allow", "allowlisted"),
        # plain HTTP: the connection, then each request (its Host checked) as in a tunnel
        ("api.test", gw.plain.port, None, "allow", "allowlisted"),
        ("api.test", gw.plain.port, "GET", "allow", "allowlisted"),
        ("other.test", gw.tls.port, None, "block", "not_allowlisted"),
        ("api.test", gw.other.port, None, "block", "sni_mismatch"),
        (UPSTREAM, gw.plain.port, None, "block", "direct_connection"),
    ], got
    assert got[0]["sni"] == "api.test" and got[0]["client"] == UPSTREAM
    assert f"{OTHER}:{gw.other.port}" in got[4]["detail"]
    assert f"{UPSTREAM}:{gw.plain.port}" in got[5]["detail"]


@pytest.mark.parametrize("gateway", ["nft-inspect"], indirect=True)
def test_with_inspect_a_redirected_tunnel_gets_its_request_rules(gateway: Gateway) -> None:
    gw = gateway
    guard_ca = gw.confdir / "mitmproxy-ca-cert.pem"
    ok = _https_get(gw.ns, guard_ca, UPSTREAM, gw.tls.port, "api.test")
    assert isinstance(ok, bytes) and b"upstream-ok GET /direct" in ok, (ok, gw.log.read_text())

    def get_other() -> bytes | str:
        ctx = ssl.create_default_context(cafile=str(guard_ca))
        with (
            socket.create_connection((UPSTREAM, gw.tls.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="api.test") as s,
        ):
            s.sendall(f"GET /other HTTP/1.1\r\nHost: api.test:{gw.tls.port}\r\n\r\n".encode())
            return _read_answer(s)

    refused = in_netns(gw.ns, get_other)
    assert isinstance(refused, bytes) and refused.startswith(b"HTTP/1.1 403"), refused
    assert [r[1] for r in gw.tls.seen.requests] == ["/direct"]
    got = _decisions(gw, 4)
    rows = [(d["method"], d["path"], d["decision"], d["reason"]) for d in got]
    assert rows == [
        (None, None, "allow", "allowlisted"),
        ("GET", "/direct", "allow", "allowlisted"),
        (None, None, "allow", "allowlisted"),
        ("GET", "/other", "block", "path_not_allowed"),
    ], got


@pytest.mark.parametrize("gateway", ["nft-audit"], indirect=True)
def test_audit_mode_never_connects_to_an_unchecked_address(gateway: Gateway, ca_file: Path) -> None:
    gw = gateway
    # an unlisted name: let through as would_block, to the address checked for it
    unlisted = _https_get(gw.ns, ca_file, UPSTREAM, gw.tls.port, "other.test")
    assert isinstance(unlisted, bytes) and b"upstream-ok" in unlisted, unlisted
    # fronting: recorded, and sent to api.test's own address, never to OTHER
    _https_get(gw.ns, ca_file, OTHER, gw.other.port, "api.test")
    # no name: refused in audit mode too
    nameless = _plain(gw.ns, UPSTREAM, gw.plain.port, b"\x00\x01 not a protocol\r\n\r\n")
    assert not isinstance(nameless, bytes) or b"upstream-ok" not in nameless, nameless
    assert gw.other.seen.connections == 0
    assert gw.plain.seen.connections == 0
    got = _decisions(gw, 3)
    rows = [(d["host"], d["decision"], d["reason"]) for d in got]
    assert rows == [
        ("other.test", "would_block", "not_allowlisted"),
        ("api.test", "would_block", "sni_mismatch"),
        (UPSTREAM, "block", "direct_connection"),
    ], got
