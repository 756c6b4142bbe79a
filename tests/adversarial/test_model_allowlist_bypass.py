"""Model-allowlist bypass: a request that reaches a listed destination with a model the
policy does not list.

The model is read as the provider would read it, so a body it cannot read or reads two
ways, a path spelled to dodge the model rules, a WebSocket upgrade, or plain HTTP sent
inside a CONNECT tunnel (instead of TLS the guard intercepts) is refused, never relayed.
See also test_model_key_collision.py and test_model_read_as_a_gateway_reads.py.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from support.clients import read_response, send_raw
from support.policies import inspect_policy
from support.proxy import ProxyFactory, ProxyProcess, inspect_client
from support.upstream import Upstream


def test_unreadable_or_ambiguous_model_is_refused(
    inspect_guard: ProxyProcess, tls_upstream: Upstream
) -> None:
    url = f"https://api.test:{tls_upstream.port}/v1/chat/completions"
    with inspect_client(inspect_guard) as c:
        r1 = c.post(url, content=b"not json", headers={"content-type": "application/json"})
        r2 = c.post(url, content=b'{"model": "good-model", "model": "gpt-evil"}')
        r3 = c.post(url, json={"messages": []})
    assert [r1.status_code, r2.status_code, r3.status_code] == [403, 403, 403]
    assert tls_upstream.seen.requests == []


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/v1/chat/%63ompletions", "model_not_allowed"),  # decoded, it is a model call
        ("/v1/chat//completions", "path_not_allowed"),  # servers that merge slashes
        ("/v1/x/../chat/completions", "path_not_allowed"),
        ("/v1/chat/completions;x", "path_not_allowed"),
        ("/v1/chat%2Fcompletions", "path_not_allowed"),
        # servers that route case-insensitively or ignore a trailing slash (Express)
        ("/v1/Chat/Completions", "model_not_allowed"),
        ("/v1/MESSAGES", "model_not_allowed"),
        ("/v1beta/models/gemini-evil:GenerateContent", "model_not_allowed"),
        ("/v1beta/models/gemini-evil:generateContent/", "model_not_allowed"),
        # a POST the guard cannot read a model from, on a destination that lists models
        ("/v1/messages/batches", "model_not_allowed"),
    ],
)
def test_path_spellings_cannot_skip_the_model_check(
    proxy: ProxyFactory, http_upstream: Upstream, path: str, reason: str
) -> None:
    p = proxy(inspect_policy(http_upstream.port))
    body = b'{"model": "gpt-evil"}'
    sock, resp = send_raw(
        p.port,
        f"POST http://api.test:{http_upstream.port}{path} HTTP/1.1\r\n".encode()
        + f"Host: api.test:{http_upstream.port}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    sock.close()
    assert resp.status == 403 and resp.headers["x-egress-guard-reason"] == reason
    assert http_upstream.seen.requests == []


def test_websocket_upgrade_refused_where_models_are_listed(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """Realtime APIs (OpenAI Realtime, Gemini Live) carry model work in WebSocket frames,
    where no request rule looks: a destination that lists models refuses the upgrade."""

    p = proxy(inspect_policy(http_upstream.port))
    sock, resp = send_raw(
        p.port,
        f"GET http://api.test:{http_upstream.port}/v1/realtime?model=gpt-evil HTTP/1.1\r\n".encode()
        + f"Host: api.test:{http_upstream.port}\r\nConnection: Upgrade\r\n".encode()
        + b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    sock.close()
    assert resp.status == 403 and resp.headers["x-egress-guard-reason"] == "model_not_allowed"
    assert http_upstream.seen.requests == []


def test_plain_http_inside_connect_is_read_as_http_and_checked(
    proxy: ProxyFactory, http_upstream: Upstream, ca_file: Path
) -> None:
    """A CONNECT tunnel to a destination with request rules that carries plain HTTP (no
    TLS) gets the same rules as an intercepted TLS tunnel, instead of raw relaying."""

    p = proxy(inspect_policy(http_upstream.port), "--inspect", "--upstream-ca", str(ca_file))

    def post(path: str, model: str) -> int:
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        sock.sendall(f"CONNECT api.test:{http_upstream.port} HTTP/1.1\r\n\r\n".encode())
        assert read_response(sock).status == 200
        body = json.dumps({"model": model}).encode()
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: api.test:{http_upstream.port}\r\n".encode()
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status = read_response(sock).status
        sock.close()
        return status

    assert post("/admin/chat/completions", "gpt-evil") == 403
    assert post("/v1/chat/completions", "gpt-evil") == 403
    assert post("/v1/chat/completions", "good-model") == 200
    assert [q[1] for q in http_upstream.seen.requests] == ["/v1/chat/completions"]
