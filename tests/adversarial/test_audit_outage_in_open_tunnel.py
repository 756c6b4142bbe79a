"""An audit log that stops taking records must stop the traffic it would record.

Threats (issue 17, item 3), each against the real proxy, real upstreams, real sockets:

- the audit disk fills while an inspected tunnel is open: the tunnel's next requests
  (HTTP/1.1 keep-alive, HTTP/2 streams, a model-checked body) used to be forwarded and
  their records lost; now each one is forwarded only once its line is written;
- the first connection after the disk fills used to be let in (the sink learnt of the
  failure only by failing to write that connection's record); now it is refused;
- a burst larger than the audit queue used to drop records (counted, and then every
  connection refused); now requests wait for room and no record is lost;
- SIGTERM with more records in flight than the queue holds, or while the disk is full,
  used to lose them ("shut down with N events not written"); now none is lost.

The audit file sits on a 64 kB tmpfs the test fills (tests run as root), or is capped with
``prlimit --fsize`` on the running proxy (Python ignores SIGXFSZ, so a write past the
limit fails with EFBIG): the byte-exact way to make the very next record unwritable.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from support.clients import RawResponse, read_response, send_raw
from support.policies import make_policy
from support.proxy import EGRESS_GUARD, ProxyFactory, ProxyProcess, guard_ca
from support.upstream import Upstream

RULES = """\
    methods: [GET, POST]
    paths: ["/v1/*"]
    models: [good-model]
"""


def inspect_policy(port: int) -> str:
    return make_policy(port).replace(
        f"    ports: [{port}]\n  - name: private-api",
        f"    ports: [{port}]\n{RULES}  - name: private-api",
        1,
    )


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(fs: Path) -> Path:
    """Fill the file system; returns the filler (unlink it to make room again)."""
    filler = fs / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
        for _ in range(10_000):  # bounded: 64 kB fill up long before
            f.write(b"\0" * 4096)
    return filler


def cap_file_size(p: ProxyProcess, limit: int | None) -> None:
    """RLIMIT_FSIZE of the running proxy: its next write past ``limit`` bytes fails."""
    assert p.proc is not None
    value = "unlimited:unlimited" if limit is None else f"{limit}:unlimited"  # soft limit
    subprocess.run(["prlimit", "--pid", str(p.proc.pid), f"--fsize={value}"], check=True)


def settled_size(path: Path) -> int:
    """The audit file's size once the writer has stopped appending."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < 0.5:
        size = path.stat().st_size
        if size != last:
            last, since = size, time.monotonic()
        time.sleep(0.05)
    return last


def on_disk(p: ProxyProcess, pred: Callable[[dict[str, Any]], bool]) -> bool:
    return any(pred(r) for r in p.audit(None))


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EGRESS_GUARD, "audit", "verify", str(path)], capture_output=True, text=True, timeout=60
    )


def finish(p: ProxyProcess) -> list[dict[str, Any]]:
    """Stop the proxy; the log must verify and hold no loss."""
    assert p.stop() == 0, p.log()[-3000:]
    v = verify(p.audit_path)
    assert v.returncode == 0, v.stdout + v.stderr
    records = p.audit(None)
    assert not [r for r in records if r.get("event") == "dropped"], p.log()[-3000:]
    assert "not written" not in p.log(), p.log()[-3000:]
    return records


def unrecorded(status: int, headers: Any) -> bool:
    return status == 503 and headers.get("x-egress-guard-reason") == "internal_error"


# -- (a) the disk fills while an inspected tunnel is open -----------------------------------


class Tunnel:
    """One inspected tunnel held open; ``request(tag)`` sends one request in it and
    returns (path, status, headers, body text)."""

    def __init__(self, p: ProxyProcess, port: int, kind: str) -> None:
        self.kind = kind
        self.authority = f"api.test:{port}"
        self.http: httpx.Client | None = None
        self.h2: h2.connection.H2Connection | None = None
        self.tls: ssl.SSLSocket | None = None
        if kind == "http2":
            sock, resp = send_raw(p.port, f"CONNECT {self.authority} HTTP/1.1\r\n\r\n".encode())
            assert resp.status == 200
            ctx = guard_ca(p)
            ctx.set_alpn_protocols(["h2"])
            self.tls = ctx.wrap_socket(sock, server_hostname="api.test")
            assert self.tls.selected_alpn_protocol() == "h2"
            self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            self.h2.initiate_connection()
            self.tls.sendall(self.h2.data_to_send())
        else:
            self.http = httpx.Client(proxy=p.url, verify=guard_ca(p), trust_env=False, timeout=20)

    def request(self, tag: str) -> tuple[str, int, dict[str, str], str]:
        if self.kind == "http1-model-body":  # its model is checked once the body is in
            path = f"/v1/{tag}/chat/completions"
            assert self.http is not None
            r = self.http.post(
                f"https://{self.authority}{path}", json={"model": "good-model", "messages": []}
            )
            return path, r.status_code, dict(r.headers), r.text
        path = f"/v1/{tag}"
        if self.http is not None:
            r = self.http.get(f"https://{self.authority}{path}")
            return path, r.status_code, dict(r.headers), r.text
        return (path, *self._h2_get(path))

    def _h2_get(self, path: str) -> tuple[int, dict[str, str], str]:
        c, tls = self.h2, self.tls
        assert c is not None and tls is not None
        sid = c.get_next_available_stream_id()
        c.send_headers(
            sid,
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", self.authority),
                (":path", path),
            ],
            end_stream=True,
        )
        tls.sendall(c.data_to_send())
        headers: dict[str, str] = {}
        body = b""
        tls.settimeout(20)
        while True:
            data = tls.recv(65536)
            assert data, "the proxy closed the HTTP/2 connection"
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    headers = {k.decode(): v.decode() for k, v in ev.headers}
                elif isinstance(ev, h2.events.DataReceived):
                    c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if ev.stream_id == sid:
                        body += ev.data
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    raise AssertionError(f"stream reset: {ev.error_code!r}")
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    tls.sendall(c.data_to_send())
                    return int(headers[":status"]), headers, body.decode()
            tls.sendall(c.data_to_send())

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
        if self.tls is not None:
            self.tls.close()


@pytest.mark.parametrize("kind", ["http1", "http1-model-body", "http2"])
def test_disk_full_mid_tunnel_refuses_the_next_request(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, small_fs: Path, kind: str
) -> None:
    audit_path = small_fs / "audit.log"
    p = proxy(
        inspect_policy(tls_upstream.port),
        "--inspect",
        "--upstream-ca",
        str(ca_file),
        "--audit-log",
        str(audit_path),
        "--audit-fsync",
        "always",
        audit=False,
    )
    p.audit_path = audit_path
    t = Tunnel(p, tls_upstream.port, kind)
    try:
        path, status, _, text = t.request("first")
        assert status == 200, text
        assert p.wait_audit(lambda r: r.get("path") == path)
        filler = fill(small_fs)
        # The tunnel is open and the disk is full. A request may still go through only
        # if its record fits in what the file's last page has left, and then its line is
        # on disk before it is forwarded. Within a few requests one must be refused.
        outcomes: list[tuple[str, int]] = []
        for i in range(20):
            path, status, headers, text = t.request(f"after-{i}")
            outcomes.append((path, status))
            if status != 200:
                assert unrecorded(status, headers), (status, headers, text)
                assert "audit log" in text
                break
            assert on_disk(p, lambda rec, path=path: rec.get("path") == path), (
                f"{path} was forwarded before its record was written"
            )
        refused = [path for path, status in outcomes if status != 200]
        assert refused, f"every request in the open tunnel was forwarded: {outcomes}"
        # ... and it never reached the upstream; nor does the next one while it lasts
        path, status, headers, _ = t.request("while-full")
        assert unrecorded(status, headers)
        seen = [q[1] for q in tls_upstream.seen.requests]
        assert refused[0] not in seen and path not in seen, seen
        # the same tunnel all along
        connects = [r for r in p.audit() if r.get("method") == "CONNECT"]
        assert len(connects) == 1, connects
        filler.unlink()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            _, status, _, text = t.request("recovered")
            if status == 200:
                break
            time.sleep(0.3)
        assert status == 200, text
    finally:
        t.close()
    records = finish(p)
    # the refused request's refusal is on record too
    assert any(r.get("path") == refused[0] and r.get("reason") == "internal_error" for r in records)


# -- (b) the first connection after the disk fills ------------------------------------------


def test_first_connect_after_disk_fills_is_refused(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(make_policy(tls_upstream.port))
    sock, resp = send_raw(p.port, f"CONNECT api.test:{tls_upstream.port} HTTP/1.1\r\n\r\n".encode())
    assert resp.status == 200
    sock.close()
    assert p.wait_audit(lambda r: True, event="close")
    cap_file_size(p, settled_size(p.audit_path))  # the next record cannot be written
    connections = tls_upstream.seen.connections
    sock, resp = send_raw(p.port, f"CONNECT api.test:{tls_upstream.port} HTTP/1.1\r\n\r\n".encode())
    if resp.status == 200:  # the old behaviour: let in; show where its bytes go
        ctx = ssl.create_default_context(cafile=str(ca_file))
        with contextlib.suppress(OSError), ctx.wrap_socket(sock, server_hostname="api.test") as t:
            t.sendall(b"GET /leak HTTP/1.1\r\nHost: api.test\r\n\r\n")
            read_response(t)  # type: ignore[arg-type]
    sock.close()
    assert unrecorded(resp.status, resp.headers), (resp.status, resp.headers, resp.body)
    assert b"audit log could not record" in resp.body
    assert tls_upstream.seen.connections == connections
    cap_file_size(p, None)
    assert p.wait_audit(lambda r: r.get("reason") == "internal_error")
    records = finish(p)
    # its allow was committed to the chain before the write failed; the refusal follows it
    mine = [r for r in records if r.get("event") == "decision"][-2:]
    assert [r["decision"] for r in mine] == ["allow", "block"]
    assert mine[0]["id"] == mine[1]["id"]
    assert not [r for r in records if r.get("event") == "close" and r["id"] == mine[0]["id"]]


def test_first_plain_http_request_after_disk_fills_is_refused(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    p = proxy(make_policy(http_upstream.port))
    url = f"http://api.test:{http_upstream.port}"
    req = f"GET {url}/first HTTP/1.1\r\nHost: api.test:{http_upstream.port}\r\n\r\n"
    sock = socket.create_connection((p.host, p.port), timeout=10)
    sock.sendall(req.encode())
    assert read_response(sock).status == 200
    assert p.wait_audit(lambda r: r.get("path") == "/first")
    cap_file_size(p, settled_size(p.audit_path))
    # the same keep-alive connection, its next request
    sock.sendall(req.replace("/first", "/second").encode())
    resp = read_response(sock)
    sock.close()
    assert unrecorded(resp.status, resp.headers), (resp.status, resp.headers, resp.body)
    assert [q[1] for q in http_upstream.seen.requests] == ["/first"]
    cap_file_size(p, None)
    assert p.wait_audit(lambda r: r.get("reason") == "internal_error")
    finish(p)


# -- (c) a burst larger than the queue ------------------------------------------------------


def _plain_get(port: int, target: str) -> int:
    host = target.split("/")[2]
    req = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(req)
        return read_response(s, timeout=20).status


def test_burst_past_a_tiny_queue_loses_no_record(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    p = proxy(make_policy(http_upstream.port), "--audit-queue-size", "2")
    n = 240
    targets = [
        (f"http://api.test:{http_upstream.port}/burst-{i}", 200)
        if i % 3
        else (f"http://other.test:{http_upstream.port}/refused-{i}", 403)
        for i in range(n)
    ]
    with ThreadPoolExecutor(24) as pool:
        got = list(pool.map(lambda t: _plain_get(p.port, t[0]), targets))
    assert got == [want for _, want in targets]
    allowed = {t.split(":", 2)[2].split("/", 1)[1] for t, want in targets if want == 200}
    assert {q[1].lstrip("/") for q in http_upstream.seen.requests} == allowed
    assert len(p.wait_audit(lambda r: True, event="close", count=len(allowed))) == len(allowed)
    records = finish(p)
    decisions = [r for r in records if r.get("event") == "decision"]
    assert len(decisions) == n
    assert {r["path"].lstrip("/") for r in decisions if r["decision"] == "allow"} == allowed


# -- (d) SIGTERM with records in flight -----------------------------------------------------


def _open_tunnels(p: ProxyProcess, port: int, n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s, resp = send_raw(
            p.port, f"CONNECT api.test:{port} HTTP/1.1\r\n\r\n".encode(), host="127.0.0.1"
        )
        assert resp.status == 200, (i, resp.status)
        socks.append(s)
        # one at a time, so that only the shutdown puts many records in flight at once
        assert len(p.wait_audit(lambda r: r.get("method") == "CONNECT", count=i + 1)) == i + 1
    return socks


def test_sigterm_with_more_close_records_than_the_queue_loses_none(
    proxy: ProxyFactory, tls_upstream: Upstream
) -> None:
    p = proxy(make_policy(tls_upstream.port), "--audit-queue-size", "2", "--drain-timeout", "0")
    socks = _open_tunnels(p, tls_upstream.port, 60)
    try:
        p.signal(signal.SIGTERM)  # 60 close records at once into a queue of 2
        assert p.proc is not None
        p.proc.wait(30)
    finally:
        for s in socks:
            s.close()
    records = finish(p)
    closes = [r for r in records if r.get("event") == "close"]
    assert len(closes) == 60 and all(r["error"] == "proxy shutting down" for r in closes)


def test_sigterm_while_the_disk_is_full_writes_everything_once_it_has_room(
    proxy: ProxyFactory, tls_upstream: Upstream
) -> None:
    p = proxy(make_policy(tls_upstream.port), "--drain-timeout", "0")
    socks = _open_tunnels(p, tls_upstream.port, 10)
    try:
        cap_file_size(p, settled_size(p.audit_path))
        p.signal(signal.SIGTERM)
        time.sleep(1.5)  # the close records cannot be written; the writer keeps trying
        assert p.proc is not None and p.proc.poll() is None
        cap_file_size(p, None)
        p.proc.wait(30)
    finally:
        for s in socks:
            s.close()
    records = finish(p)
    assert len([r for r in records if r.get("event") == "close"]) == 10


def test_refusal_is_a_json_body_naming_the_audit_log(
    proxy: ProxyFactory, tls_upstream: Upstream
) -> None:
    """What a client (and OpenCode's user) is told: 503, internal_error, and why."""
    p = proxy(make_policy(tls_upstream.port))
    cap_file_size(p, settled_size(p.audit_path))
    sock, resp = send_raw(p.port, f"CONNECT api.test:{tls_upstream.port} HTTP/1.1\r\n\r\n".encode())
    sock.close()
    assert isinstance(resp, RawResponse) and resp.status == 503
    body = json.loads(resp.body)
    assert body["reason"] == "internal_error" and "audit log" in body["detail"]
    cap_file_size(p, None)
    finish(p)


# -- audit mode: a sync hook that would let a tunnel's bytes through ------------------------


def test_audit_mode_would_block_on_first_bytes_is_refused_while_unhealthy(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """An open tunnel's first bytes are judged in a sync hook (it cannot wait for a
    write). In audit mode an SNI mismatch is only recorded (would_block) and let through;
    while the audit log cannot record, it must be refused instead."""
    p = proxy(make_policy(tls_upstream.port, mode="audit"))
    tunnel, resp = send_raw(
        p.port, f"CONNECT api.test:{tls_upstream.port} HTTP/1.1\r\n\r\n".encode()
    )
    assert resp.status == 200  # open, no bytes yet
    cap_file_size(p, settled_size(p.audit_path))
    other, resp = send_raw(
        p.port, f"CONNECT api.test:{tls_upstream.port} HTTP/1.1\r\n\r\n".encode()
    )
    other.close()
    assert unrecorded(resp.status, resp.headers)  # the sink knows now: unhealthy
    connections = tls_upstream.seen.connections
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False
    with pytest.raises(OSError), ctx.wrap_socket(tunnel, server_hostname="other.test") as t:
        t.sendall(b"GET /unrecorded HTTP/1.1\r\nHost: other.test\r\n\r\n")
        read_response(t)  # type: ignore[arg-type]
    tunnel.close()
    assert tls_upstream.seen.connections == connections
    cap_file_size(p, None)
    assert p.wait_audit(lambda r: r.get("detail", "") and "audit sink" in r["detail"], count=1)
    records = finish(p)
    assert not [r for r in records if r.get("decision") == "would_block"]
