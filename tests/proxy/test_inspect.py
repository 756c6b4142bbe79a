"""Inspect mode: TLS interception for destinations with request rules; model allowlist;
provider-format errors; streaming passes through unbuffered; secrets never recorded."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.clients import read_response
from support.policies import make_policy
from support.proxy import ProxyFactory, ProxyProcess, guard_ca
from support.upstream import Upstream

RULES = """\
    methods: [GET, POST]
    paths: ["/v1/*", "/v1beta/*"]
    models: [good-model, gemini-ok]
"""


def inspect_policy(port: int, mode: str = "enforce") -> str:
    text = make_policy(port, mode=mode)
    return text.replace(
        f"    ports: [{port}]\n  - name: private-api",
        f"    ports: [{port}]\n{RULES}  - name: private-api",
        1,
    )


@pytest.fixture
def guard(proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path) -> ProxyProcess:
    return proxy(inspect_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))


def client(p: ProxyProcess) -> httpx.Client:
    return httpx.Client(proxy=p.url, verify=guard_ca(p), trust_env=False, timeout=20)


def test_policy_text_validates(tls_upstream: Upstream) -> None:
    from egress_guard.policy import load_policy_text

    pol = load_policy_text(inspect_policy(tls_upstream.port), "inspect.yaml")
    assert pol.destinations[0].models == ["good-model", "gemini-ok"]


def test_allowed_model_passes_and_upstream_cert_is_verified(
    guard: ProxyProcess, tls_upstream: Upstream
) -> None:
    url = f"https://api.test:{tls_upstream.port}/v1/chat/completions"
    with client(guard) as c:
        r = c.post(url, json={"model": "good-model", "messages": []})
    assert r.status_code == 200, r.text
    assert tls_upstream.seen.requests[0][:2] == ("POST", "/v1/chat/completions")
    assert json.loads(tls_upstream.seen.bodies[0])["model"] == "good-model"
    recs = guard.wait_audit(lambda r: r.get("path") == "/v1/chat/completions")
    assert recs[0]["decision"] == "allow"


@pytest.mark.parametrize(
    ("path", "body", "shape"),
    [
        ("/v1/chat/completions", {"model": "gpt-evil", "messages": []}, "openai"),
        ("/v1/responses", {"model": "gpt-evil", "input": "hi"}, "openai"),
        ("/v1/messages", {"model": "claude-evil", "max_tokens": 1, "messages": []}, "anthropic"),
        ("/v1beta/models/gemini-evil:generateContent", {"contents": []}, "gemini"),
    ],
)
def test_disallowed_model_refused_in_provider_format(
    guard: ProxyProcess, tls_upstream: Upstream, path: str, body: dict[str, object], shape: str
) -> None:
    with client(guard) as c:
        r = c.post(f"https://api.test:{tls_upstream.port}{path}", json=body)
    assert r.status_code == 403
    assert r.headers["x-egress-guard-reason"] == "model_not_allowed"
    err = r.json()
    if shape == "openai":
        assert err["error"]["code"] == "model_not_allowed" and "message" in err["error"]
    elif shape == "anthropic":
        assert err["type"] == "error" and err["error"]["type"] == "permission_error"
    else:
        assert err["error"]["status"] == "PERMISSION_DENIED" and err["error"]["code"] == 403
    assert tls_upstream.seen.requests == []
    recs = guard.wait_audit(lambda r: r["reason"] == "model_not_allowed")
    assert recs and recs[0]["decision"] == "block" and recs[0]["path"] == path


def test_unreadable_or_ambiguous_model_is_refused(
    guard: ProxyProcess, tls_upstream: Upstream
) -> None:
    url = f"https://api.test:{tls_upstream.port}/v1/chat/completions"
    with client(guard) as c:
        r1 = c.post(url, content=b"not json", headers={"content-type": "application/json"})
        r2 = c.post(url, content=b'{"model": "good-model", "model": "gpt-evil"}')
        r3 = c.post(url, json={"messages": []})
    assert [r1.status_code, r2.status_code, r3.status_code] == [403, 403, 403]
    assert tls_upstream.seen.requests == []


def test_gemini_model_in_path_allowed(guard: ProxyProcess, tls_upstream: Upstream) -> None:
    with client(guard) as c:
        r = c.post(
            f"https://api.test:{tls_upstream.port}/v1beta/models/gemini-ok:generateContent", json={}
        )
    assert r.status_code == 200


def test_method_and_path_rules(guard: ProxyProcess, tls_upstream: Upstream) -> None:
    with client(guard) as c:
        r1 = c.delete(f"https://api.test:{tls_upstream.port}/v1/models/x")
        r2 = c.get(f"https://api.test:{tls_upstream.port}/admin/keys")
        r3 = c.get(f"https://api.test:{tls_upstream.port}/v1/models")
    assert r1.status_code == 403 and r1.headers["x-egress-guard-reason"] == "method_not_allowed"
    assert r2.status_code == 403 and r2.headers["x-egress-guard-reason"] == "path_not_allowed"
    assert r3.status_code == 200
    assert [q[1] for q in tls_upstream.seen.requests] == ["/v1/models"]


def test_sse_response_streams_unbuffered(guard: ProxyProcess, tls_upstream: Upstream) -> None:
    """The upstream sends its second event only after the client has seen the first."""
    received = b""
    with (
        client(guard) as c,
        c.stream(
            "POST",
            f"https://api.test:{tls_upstream.port}/v1/chat/completions",
            json={"model": "good-model", "stream": True},
        ) as r,
    ):
        assert r.status_code == 200
        for chunk in r.iter_bytes():
            received += chunk
            if b"data: first" in received:
                tls_upstream.gate.set()
            if b"data: second" in received:
                break
    assert b"data: first" in received and b"data: second" in received


def test_not_inspected_destination_stays_a_tunnel(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """Without request rules the tunnel is not intercepted: the client sees the real cert."""
    p = proxy(make_policy(tls_upstream.port), "--inspect")
    ctx = ssl.create_default_context(cafile=str(ca_file))  # the upstream's CA, not the guard's
    with httpx.Client(proxy=p.url, verify=ctx, trust_env=False) as c:
        r = c.get(f"https://api.test:{tls_upstream.port}/plain")
    assert r.status_code == 200


def test_upstream_cert_not_trusted_without_upstream_ca(
    proxy: ProxyFactory, tls_upstream: Upstream
) -> None:
    p = proxy(inspect_policy(tls_upstream.port), "--inspect")
    with client(p) as c:
        r = c.post(
            f"https://api.test:{tls_upstream.port}/v1/chat/completions",
            json={"model": "good-model"},
        )
    assert r.status_code == 502
    assert tls_upstream.seen.requests == []


def test_no_secrets_recorded_in_inspect_mode(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    from support.proxy import free_port

    mport = free_port()
    p = proxy(
        inspect_policy(tls_upstream.port),
        "--inspect",
        "--upstream-ca",
        str(ca_file),
        "--metrics",
        f"127.0.0.1:{mport}",
        "--audit-log",
        "-",
        audit=False,
    )
    headers = {
        "Authorization": "Bearer sk-SECRET1",
        "x-api-key": "SECRET2",
        "api-key": "SECRET6",
        "Cookie": "session=SECRET3",
    }
    with client(p) as c:
        ok = c.post(
            f"https://api.test:{tls_upstream.port}/v1/chat/completions?key=SECRET4",
            json={"model": "good-model", "prompt": "SECRET7"},
            headers=headers,
        )
        bad = c.post(
            f"https://api.test:{tls_upstream.port}/v1/chat/completions?key=SECRET4",
            json={"model": "gpt-evil", "prompt": "SECRET7"},
            headers=headers,
        )
    assert ok.status_code == 200 and bad.status_code == 403
    metrics_text = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
    p.stop()
    out = p.log()
    assert "/v1/chat/completions" in out
    for secret in ("SECRET1", "SECRET2", "SECRET3", "SECRET4", "SECRET6", "SECRET7"):
        assert secret not in out, secret
        assert secret not in metrics_text, secret


def test_request_split_inside_intercepted_tunnel_is_still_checked(
    guard: ProxyProcess, tls_upstream: Upstream
) -> None:
    """Bytes that do not (yet) look like HTTP are parsed as HTTP, never relayed raw."""
    import socket
    import time

    from support.clients import read_response

    sock = socket.create_connection(("127.0.0.1", guard.port), timeout=10)
    sock.sendall(f"CONNECT api.test:{tls_upstream.port} HTTP/1.1\r\n\r\n".encode())
    assert read_response(sock).status == 200
    tls = guard_ca(guard).wrap_socket(sock, server_hostname="api.test")
    body = b'{"model": "gpt-evil"}'
    tls.sendall(b"PO")
    time.sleep(0.5)
    tls.sendall(
        b"ST /v1/chat/completions HTTP/1.1\r\n"
        + f"Host: api.test:{tls_upstream.port}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    resp = read_response(tls)  # type: ignore[arg-type]
    tls.close()
    assert resp.status == 403 and resp.headers["x-egress-guard-reason"] == "model_not_allowed"
    assert tls_upstream.seen.requests == []


def test_plain_http_destination_rules_apply(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    p = proxy(inspect_policy(http_upstream.port))
    r1 = httpx.post(
        f"http://api.test:{http_upstream.port}/other", proxy=p.url, trust_env=False, json={}
    )
    r2 = httpx.post(
        f"http://api.test:{http_upstream.port}/v1/chat/completions",
        proxy=p.url,
        trust_env=False,
        json={"model": "gpt-evil"},
    )
    r3 = httpx.post(
        f"http://api.test:{http_upstream.port}/v1/chat/completions",
        proxy=p.url,
        trust_env=False,
        json={"model": "good-model"},
    )
    assert r1.status_code == 403 and r1.headers["x-egress-guard-reason"] == "path_not_allowed"
    assert r2.status_code == 403 and r2.headers["x-egress-guard-reason"] == "model_not_allowed"
    assert r3.status_code == 200
    assert [q[1] for q in http_upstream.seen.requests] == ["/v1/chat/completions"]


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
    from support.clients import send_raw

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
    from support.clients import send_raw

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
    import socket

    from support.clients import read_response

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


def test_reload_renaming_the_destination_keeps_rules_on_open_tunnels(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(inspect_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    url = f"https://api.test:{tls_upstream.port}/v1/chat/completions"
    with client(p) as c:
        assert c.post(url, json={"model": "good-model"}).status_code == 200
        p.replace_policy(inspect_policy(tls_upstream.port).replace("test-api", "test-api-v2"))
        evil = c.post(url, json={"model": "gpt-evil"})
        admin = c.post(f"https://api.test:{tls_upstream.port}/admin", json={})
        good = c.post(url, json={"model": "good-model"})
    assert evil.status_code == 403 and evil.headers["x-egress-guard-reason"] == "model_not_allowed"
    assert admin.status_code == 403
    assert good.status_code == 200
    assert [q[1] for q in tls_upstream.seen.requests] == ["/v1/chat/completions"] * 2
    recs = p.wait_audit(
        lambda r: r.get("destination") == "test-api-v2" and r["reason"] == "allowlisted"
    )
    assert [r["path"] for r in recs] == ["/v1/chat/completions"]


def _connect_plain(port: int, target: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    assert read_response(sock).status == 200
    return sock


def _post_model(sock: socket.socket, target: str, path: str, model: str) -> int:
    body = json.dumps({"model": model}).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {target}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return read_response(sock).status


def test_reload_before_a_tunnels_first_bytes_applies_the_new_rules(
    proxy: ProxyFactory, http_upstream: Upstream, ca_file: Path
) -> None:
    """A tunnel opened under one policy and first used after a reload (here renaming its
    destination) is judged by the new policy: still intercepted, rules still applied."""
    p = proxy(inspect_policy(http_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    target = f"api.test:{http_upstream.port}"
    sock = _connect_plain(p.port, target)
    p.replace_policy(inspect_policy(http_upstream.port).replace("test-api", "test-api-v2"))
    status = _post_model(sock, target, "/admin/v1/chat/completions", "gpt-evil")
    sock.close()
    assert status == 403
    assert http_upstream.seen.requests == []


def test_absolute_form_request_in_a_tunnel_must_name_the_tunnel_target(
    proxy: ProxyFactory, http_upstream: Upstream, ca_file: Path
) -> None:
    """A server routes an absolute-form request by its URI, not by Host: inside a tunnel,
    the URI must name the CONNECT target as the Host header must."""
    p = proxy(inspect_policy(http_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    target = f"api.test:{http_upstream.port}"
    sock = _connect_plain(p.port, target)
    sock.sendall(
        f"GET http://other.test:{http_upstream.port}/v1/models HTTP/1.1\r\n".encode()
        + f"Host: {target}\r\n\r\n".encode()
    )
    resp = read_response(sock)
    sock.close()
    assert resp.status == 403 and resp.headers["x-egress-guard-reason"] == "host_header_mismatch"
    assert http_upstream.seen.requests == []


def test_reload_repinning_the_name_refuses_the_open_tunnels_next_request(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """The open upstream cannot follow a network.resolve change: the next request in the
    tunnel is refused (the client reconnects and gets the new address checked)."""
    p = proxy(inspect_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    url = f"https://api.test:{tls_upstream.port}/v1/chat/completions"
    with client(p) as c:
        assert c.post(url, json={"model": "good-model"}).status_code == 200
        p.replace_policy(
            inspect_policy(tls_upstream.port).replace("api.test: 127.0.0.1", "api.test: 127.0.0.2")
        )
        again = c.post(url, json={"model": "good-model"})
    assert again.status_code == 403
    assert len(tls_upstream.seen.requests) == 1


def _small_body_guard(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, mode: str
) -> ProxyProcess:
    return proxy(
        inspect_policy(tls_upstream.port, mode=mode),
        "--inspect",
        "--upstream-ca",
        str(ca_file),
        "--max-model-body",
        "1000",
    )


def test_model_body_over_the_limit_or_of_unknown_length_is_refused_before_buffering(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """The model is in the body, so the guard holds the body whole before deciding:
    only up to --max-model-body, and only when its length is known up front (mitmproxy
    would buffer a chunked body without any bound)."""
    guard = _small_body_guard(proxy, tls_upstream, ca_file, "enforce")
    url = f"https://api.test:{tls_upstream.port}/v1/chat/completions"
    fits = {"model": "good-model", "messages": [], "pad": "x" * 500}
    too_big = {"model": "good-model", "messages": [], "pad": "x" * 2000}

    def chunks() -> Iterator[bytes]:
        yield json.dumps(fits).encode()  # small, but its length is not declared

    with client(guard) as c:
        ok = c.post(url, json=fits)
        big = c.post(url, json=too_big)
        chunked = c.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert ok.status_code == 200
    for r in (big, chunked):
        assert r.status_code == 403
        assert r.headers["x-egress-guard-reason"] == "model_not_allowed"
    assert len(tls_upstream.seen.requests) == 1  # only the one that fits
    recs = guard.wait_audit(lambda r: r["reason"] == "model_not_allowed", count=2)
    details = sorted(r["detail"] for r in recs)
    assert "larger than --max-model-body (1000)" in details[0]
    assert "unknown length" in details[1]


def test_audit_mode_lets_an_oversized_model_body_through_unbuffered(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    guard = _small_body_guard(proxy, tls_upstream, ca_file, "audit")
    body = {"model": "gpt-evil", "messages": [], "pad": "x" * 2000}
    with client(guard) as c:
        r = c.post(f"https://api.test:{tls_upstream.port}/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert json.loads(tls_upstream.seen.bodies[0]) == body
    recs = guard.wait_audit(lambda r: r["reason"] == "model_not_allowed")
    assert recs[0]["decision"] == "would_block"
    assert "--max-model-body" in recs[0]["detail"]
