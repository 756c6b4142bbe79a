"""Inspect mode: TLS interception for destinations with request rules; model allowlist;
provider-format errors; streaming passes through unbuffered.

Attacks on it are in ``tests/adversarial/``: model-allowlist bypass, request smuggling,
DNS pinning, secret redaction."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.clients import (
    connect_plain,
    post_model,
)
from support.policies import inspect_policy, make_policy
from support.proxy import ProxyFactory, ProxyProcess, inspect_client
from support.upstream import Upstream

from egress_guard.policy import load_policy_text


def test_policy_text_validates(tls_upstream: Upstream) -> None:
    pol = load_policy_text(inspect_policy(tls_upstream.port), "inspect.yaml")
    assert pol.destinations[0].models == ["good-model", "gemini-ok"]


def test_allowed_model_passes_and_upstream_cert_is_verified(
    inspect_guard: ProxyProcess, tls_upstream: Upstream
) -> None:
    url = f"https://api.test:{tls_upstream.port}/v1/chat/completions"
    with inspect_client(inspect_guard) as c:
        r = c.post(url, json={"model": "good-model", "messages": []})
    assert r.status_code == 200, r.text
    assert tls_upstream.seen.requests[0][:2] == ("POST", "/v1/chat/completions")
    assert json.loads(tls_upstream.seen.bodies[0])["model"] == "good-model"
    recs = inspect_guard.wait_audit(lambda r: r.get("path") == "/v1/chat/completions")
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
    inspect_guard: ProxyProcess,
    tls_upstream: Upstream,
    path: str,
    body: dict[str, object],
    shape: str,
) -> None:
    with inspect_client(inspect_guard) as c:
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
    recs = inspect_guard.wait_audit(lambda r: r["reason"] == "model_not_allowed")
    assert recs and recs[0]["decision"] == "block" and recs[0]["path"] == path


def test_gemini_model_in_path_allowed(inspect_guard: ProxyProcess, tls_upstream: Upstream) -> None:
    with inspect_client(inspect_guard) as c:
        r = c.post(
            f"https://api.test:{tls_upstream.port}/v1beta/models/gemini-ok:generateContent", json={}
        )
    assert r.status_code == 200


def test_method_and_path_rules(inspect_guard: ProxyProcess, tls_upstream: Upstream) -> None:
    with inspect_client(inspect_guard) as c:
        r1 = c.delete(f"https://api.test:{tls_upstream.port}/v1/models/x")
        r2 = c.get(f"https://api.test:{tls_upstream.port}/admin/keys")
        r3 = c.get(f"https://api.test:{tls_upstream.port}/v1/models")
    assert r1.status_code == 403 and r1.headers["x-egress-guard-reason"] == "method_not_allowed"
    assert r2.status_code == 403 and r2.headers["x-egress-guard-reason"] == "path_not_allowed"
    assert r3.status_code == 200
    assert [q[1] for q in tls_upstream.seen.requests] == ["/v1/models"]


def test_sse_response_streams_unbuffered(
    inspect_guard: ProxyProcess, tls_upstream: Upstream
) -> None:
    """The upstream sends its second event only after the client has seen the first."""
    received = b""
    with (
        inspect_client(inspect_guard) as c,
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
    with inspect_client(p) as c:
        r = c.post(
            f"https://api.test:{tls_upstream.port}/v1/chat/completions",
            json={"model": "good-model"},
        )
    assert r.status_code == 502
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


def test_reload_renaming_the_destination_keeps_rules_on_open_tunnels(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(inspect_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    url = f"https://api.test:{tls_upstream.port}/v1/chat/completions"
    with inspect_client(p) as c:
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


def test_reload_before_a_tunnels_first_bytes_applies_the_new_rules(
    proxy: ProxyFactory, http_upstream: Upstream, ca_file: Path
) -> None:
    """A tunnel opened under one policy and first used after a reload (here renaming its
    destination) is judged by the new policy: still intercepted, rules still applied."""
    p = proxy(inspect_policy(http_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    target = f"api.test:{http_upstream.port}"
    sock = connect_plain(p.port, target)
    p.replace_policy(inspect_policy(http_upstream.port).replace("test-api", "test-api-v2"))
    status = post_model(sock, target, "/admin/v1/chat/completions", "gpt-evil")
    sock.close()
    assert status == 403
    assert http_upstream.seen.requests == []


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
    inspect_guard = _small_body_guard(proxy, tls_upstream, ca_file, "enforce")
    url = f"https://api.test:{tls_upstream.port}/v1/chat/completions"
    fits = {"model": "good-model", "messages": [], "pad": "x" * 500}
    too_big = {"model": "good-model", "messages": [], "pad": "x" * 2000}

    def chunks() -> Iterator[bytes]:
        yield json.dumps(fits).encode()  # small, but its length is not declared

    with inspect_client(inspect_guard) as c:
        ok = c.post(url, json=fits)
        big = c.post(url, json=too_big)
        chunked = c.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert ok.status_code == 200
    for r in (big, chunked):
        assert r.status_code == 403
        assert r.headers["x-egress-guard-reason"] == "model_not_allowed"
    assert len(tls_upstream.seen.requests) == 1  # only the one that fits
    recs = inspect_guard.wait_audit(lambda r: r["reason"] == "model_not_allowed", count=2)
    details = sorted(r["detail"] for r in recs)
    assert "larger than --max-model-body (1000)" in details[0]
    assert "unknown length" in details[1]


def test_audit_mode_lets_an_oversized_model_body_through_unbuffered(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    inspect_guard = _small_body_guard(proxy, tls_upstream, ca_file, "audit")
    body = {"model": "gpt-evil", "messages": [], "pad": "x" * 2000}
    with inspect_client(inspect_guard) as c:
        r = c.post(f"https://api.test:{tls_upstream.port}/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert json.loads(tls_upstream.seen.bodies[0]) == body
    recs = inspect_guard.wait_audit(lambda r: r["reason"] == "model_not_allowed")
    assert recs[0]["decision"] == "would_block"
    assert "--max-model-body" in recs[0]["detail"]
