"""Real clients: raw sockets for exact bytes, curl and openssl as users run them."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


def read_response(sock: socket.socket, timeout: float = 10.0, *, more: bool = False) -> RawResponse:
    """One response. Bytes after it are an error (a pipelined next response would be
    lost with them: read those with ``read_responses``) unless ``more`` says the caller
    does not need what follows."""
    resp, extra = _read_one(sock, timeout, b"")
    if extra and not more:
        raise AssertionError(f"{len(extra)} bytes after the response; use read_responses")
    return resp


def read_responses(sock: socket.socket, count: int, timeout: float = 10.0) -> list[RawResponse]:
    """``count`` responses to pipelined requests, in order: bytes read past one response
    (two can arrive in one segment) are the start of the next."""
    out, pending = [], b""
    for _ in range(count):
        resp, pending = _read_one(sock, timeout, pending)
        out.append(resp)
    if pending:
        raise AssertionError(f"{len(pending)} bytes after response {count}")
    return out


def _read_one(sock: socket.socket, timeout: float, buf: bytes) -> tuple[RawResponse, bytes]:
    """A response with a Content-Length body (or none), and the bytes read past it."""
    sock.settimeout(timeout)
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head:
        raise ConnectionError("connection closed without a response")
    lines = head.decode("latin-1").split("\r\n")
    _version, status, *reason = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0") or 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    resp = RawResponse(int(status), reason[0] if reason else "", headers, rest[:length])
    return resp, rest[length:]


def send_raw(
    proxy_port: int, data: bytes, host: str = "127.0.0.1"
) -> tuple[socket.socket, RawResponse]:
    """Send bytes to the proxy and read one HTTP response. The socket stays open."""
    sock = socket.create_connection((host, proxy_port), timeout=10)
    sock.sendall(data)
    return sock, read_response(sock)


def connect(
    proxy_port: int, authority: str, headers: dict[str, str] | None = None
) -> tuple[socket.socket, RawResponse]:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    req = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode()
    return send_raw(proxy_port, req)


def tls_get(
    sock: socket.socket, ca_file: Path, sni: str, path: str = "/", host: str | None = None
) -> RawResponse:
    """TLS over an established tunnel, then one GET."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    tls = ctx.wrap_socket(sock, server_hostname=sni)
    tls.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host or sni}\r\nConnection: keep-alive\r\n\r\n".encode()
    )
    return read_response(tls)  # type: ignore[arg-type]


@dataclass
class CurlResult:
    code: int  # HTTP status of the final response (0 if none)
    exit: int
    stdout: str
    stderr: str


def curl(
    proxy_url: str, url: str, *args: str, ca_file: Path | None = None, timeout: int = 15
) -> CurlResult:
    cmd = [
        "curl",
        "-sS",
        "--max-time",
        str(timeout),
        "-x",
        proxy_url,
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ]
    if ca_file is not None:
        cmd += ["--cacert", str(ca_file)]
    cmd += [*args, url]
    env = {"PATH": "/usr/bin:/bin", "NO_PROXY": "", "no_proxy": ""}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5, env=env)
    out, _, code = p.stdout.rpartition("\n")
    return CurlResult(int(code) if code.isdigit() else 0, p.returncode, out, p.stderr)


def openssl_s_client(
    proxy_port: int, target: str, servername: str, ca_file: Path, send: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    cmd = [
        "openssl",
        "s_client",
        "-proxy",
        f"127.0.0.1:{proxy_port}",
        "-connect",
        target,
        "-servername",
        servername,
        "-CAfile",
        str(ca_file),
        "-verify_return_error",
        "-ign_eof",
    ]
    return subprocess.run(cmd, input=send, capture_output=True, timeout=20)


def tls_through(sock: socket.socket, sni: str, path: str = "/reached") -> bool:
    """A TLS handshake through an open tunnel with ``sni`` (any certificate accepted), then
    one GET; True when both completed, False when the guard (or anyone) cut it off."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        tls = ctx.wrap_socket(sock, server_hostname=sni)
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())
        read_response(tls)  # type: ignore[arg-type]
        return True
    except (OSError, ValueError, ssl.SSLError):
        return False
    finally:
        sock.close()


def assert_blocked_json(resp_headers: dict[str, str], body: dict[str, object], reason: str) -> None:
    """The documented shape of a guard refusal: decision and reason in headers and body."""
    assert resp_headers["x-egress-guard-decision"] == "block"
    assert resp_headers["x-egress-guard-reason"] == reason
    assert body["reason"] == reason
    assert set(body) >= {"error", "host", "port", "reason", "hint"}


def connect_plain(port: int, target: str) -> socket.socket:
    """A CONNECT tunnel through the guard on ``port``, left without TLS (plain HTTP in it)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    assert read_response(sock).status == 200
    return sock


def post_model(sock: socket.socket, target: str, path: str, model: str) -> int:
    """POST a JSON body naming ``model`` on ``sock``; the answer's status."""
    body = json.dumps({"model": model}).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {target}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return read_response(sock).status


def send_all_then_read(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data``, then read until the peer closes: the whole answer, interim ones too."""
    sock.sendall(data)
    sock.settimeout(10)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def refused_connect(port: int, target: str, reason: str) -> tuple[RawResponse, dict[str, Any]]:
    """CONNECT ``target`` through the guard on ``port``: it must be refused for ``reason``
    (``assert_blocked_json``). The answer and its JSON body, for the test's own checks."""
    sock, resp = connect(port, target)
    sock.close()
    body = resp.json()
    assert_blocked_json(resp.headers, body, reason)
    return resp, body
