"""Helpers for the log/audit hygiene tests: exact bytes inside an inspected tunnel."""

from __future__ import annotations

import socket
from pathlib import Path

from support.clients import RawResponse, read_response
from support.policies import with_rules
from support.proxy import ProxyProcess, guard_ca

#: request rules that make api.test an inspected destination
INSPECTED_RULES = """\
    methods: [GET, POST]
    paths: ["/v1/*"]
"""


def inspect_policy(port: int, mode: str = "enforce") -> str:
    return with_rules(port, INSPECTED_RULES, mode)


def tunnel_exchange(
    p: ProxyProcess, host: str, port: int, request: bytes, connect_headers: str = ""
) -> RawResponse:
    """CONNECT host:port, TLS with the guard (SNI host), send ``request`` as is, read one
    response."""
    sock = socket.create_connection((p.host, p.port), timeout=10)
    try:
        sock.sendall(
            f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n{connect_headers}\r\n".encode()
        )
        answer = read_response(sock)
        if answer.status != 200:
            return answer
        tls = guard_ca(p).wrap_socket(sock, server_hostname=host)
        tls.sendall(request)
        return read_response(tls)  # type: ignore[arg-type]
    finally:
        sock.close()


def plain_exchange(p: ProxyProcess, request: bytes) -> RawResponse:
    with socket.create_connection((p.host, p.port), timeout=10) as sock:
        sock.sendall(request)
        try:
            return read_response(sock, more=True)
        except ConnectionError:
            return RawResponse(0, "closed")


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "surrogateescape") if path.exists() else ""
