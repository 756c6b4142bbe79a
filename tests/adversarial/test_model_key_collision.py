"""The model allowlist through a real ``egress-guard run``: bodies that a provider or
gateway reads as running another model than the guard reads (keys that collide under
case folding, duplicates, non-strict JSON) and fields that name other models (fallback
lists, routes, presets, model-running server tools), plus model-selecting headers and
query parameters, are refused as ``model_not_allowed`` before anything reaches the
upstream; what the guard lets through reaches it byte for byte.

The bodies are the corpus of tests/testdata/model_bodies (see tests/engine/
test_model_bodies.py for what the reader must make of each), sent over plain HTTP,
HTTP/1.1 in an inspected TLS tunnel, and HTTP/2 in one.
"""

from __future__ import annotations

import json
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from support.clients import connect
from support.policies import make_policy
from support.proxy import ProxyFactory, ProxyProcess, guard_ca
from support.upstream import Upstream

CORPUS = Path(__file__).parent.parent / "testdata" / "model_bodies"
CASES: dict[str, dict[str, object]] = json.loads((CORPUS / "cases.json").read_text())
ALLOWED = ("good-model", "gemini-ok")


def models_policy(port: int, mode: str = "enforce") -> str:
    text = make_policy(port, mode=mode)
    return text.replace(
        f"    ports: [{port}]\n  - name: private-api",
        f"    ports: [{port}]\n    models: [{', '.join(ALLOWED)}]\n  - name: private-api",
        1,
    )


def allowed(case: dict[str, object]) -> bool:
    expect = case["expect"]
    return isinstance(expect, list) and all(m in ALLOWED for m in expect)


def send_corpus(c: httpx.Client, base: str, upstream: Upstream) -> None:
    """Every corpus body once; collects every disagreement before failing."""
    wrong: list[str] = []
    passed: list[bytes] = []
    for name, case in sorted(CASES.items()):
        body = (CORPUS / name).read_bytes()
        seen = len(upstream.seen.bodies)
        try:
            r = c.post(
                f"{base}{case['path']}",
                content=body,
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as e:
            wrong.append(f"{name}: {e!r}")
            continue
        if allowed(case):
            passed.append(body)
            if r.status_code != 200:
                wrong.append(f"{name}: allowed, but {r.status_code} {r.text[:200]}")
        elif r.status_code != 403 or r.headers.get("x-egress-guard-reason") != "model_not_allowed":
            wrong.append(f"{name}: got {r.status_code} {r.headers.get('x-egress-guard-reason')}")
        if len(upstream.seen.bodies) != seen + allowed(case):
            wrong.append(f"{name}: the upstream saw {len(upstream.seen.bodies) - seen} requests")
    assert not wrong, "\n".join(wrong)
    assert upstream.seen.bodies == passed  # byte for byte, nothing else


def test_corpus_over_plain_http(proxy: ProxyFactory, http_upstream: Upstream) -> None:
    p = proxy(models_policy(http_upstream.port))
    with httpx.Client(proxy=p.url, trust_env=False, timeout=20) as c:
        send_corpus(c, f"http://api.test:{http_upstream.port}", http_upstream)


@pytest.fixture
def inspecting(proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path) -> ProxyProcess:
    return proxy(models_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))


def test_corpus_in_an_inspected_tunnel(inspecting: ProxyProcess, tls_upstream: Upstream) -> None:
    with httpx.Client(
        proxy=inspecting.url, verify=guard_ca(inspecting), trust_env=False, timeout=20
    ) as c:
        send_corpus(c, f"https://api.test:{tls_upstream.port}", tls_upstream)


class H2Client:
    """One HTTP/2 connection in an inspected tunnel (ALPN h2 only, so the guard speaks
    HTTP/2 to the client whatever the upstream speaks); one stream per request."""

    def __init__(self, p: ProxyProcess, authority: str) -> None:
        sock, resp = connect(p.port, authority)
        assert resp.status == 200
        ctx = guard_ca(p)
        ctx.set_alpn_protocols(["h2"])
        self.tls = ctx.wrap_socket(sock, server_hostname="api.test")
        assert self.tls.selected_alpn_protocol() == "h2"
        self.tls.settimeout(20)
        self.authority = authority
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.tls.sendall(self.conn.data_to_send())

    def post(self, path: str, body: bytes) -> tuple[int, dict[str, str]]:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", self.authority),
                (":path", path),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
            ],
            end_stream=not body,
        )
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self.tls.sendall(self.conn.data_to_send())
        headers: dict[str, str] = {}
        while True:
            data = self.tls.recv(65536)
            assert data, "the proxy closed the connection"
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    headers = {k.decode(): v.decode() for k, v in ev.headers}  # type: ignore[union-attr]
                elif isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif (
                    isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset)
                    and ev.stream_id == sid
                ):
                    self.tls.sendall(self.conn.data_to_send())
                    return int(headers.get(":status", "0")), headers
            self.tls.sendall(self.conn.data_to_send())

    def close(self) -> None:
        self.tls.close()


def test_corpus_over_http2_in_an_inspected_tunnel(
    inspecting: ProxyProcess, tls_upstream: Upstream
) -> None:
    c = H2Client(inspecting, f"api.test:{tls_upstream.port}")
    wrong: list[str] = []
    passed: list[bytes] = []
    try:
        for name, case in sorted(CASES.items()):
            body = (CORPUS / name).read_bytes()
            status, headers = c.post(str(case["path"]), body)
            if allowed(case):
                passed.append(body)
                if status != 200:
                    wrong.append(f"{name}: allowed, but {status}")
            elif status != 403 or headers.get("x-egress-guard-reason") != "model_not_allowed":
                wrong.append(f"{name}: got {status} {headers.get('x-egress-guard-reason')}")
    finally:
        c.close()
    assert not wrong, "\n".join(wrong)
    assert tls_upstream.seen.bodies == passed


def test_refusal_is_recorded_with_what_collided(
    inspecting: ProxyProcess, tls_upstream: Upstream
) -> None:
    url = f"https://api.test:{tls_upstream.port}/v1/chat/completions"
    with httpx.Client(
        proxy=inspecting.url, verify=guard_ca(inspecting), trust_env=False, timeout=20
    ) as c:
        r1 = c.post(url, content=b'{"model":"good-model","Model":"gpt-evil"}')
        r2 = c.post(url, json={"model": "good-model", "models": ["good-model", "gpt-evil"]})
    assert [r1.status_code, r2.status_code] == [403, 403]
    assert r1.json()["error"]["code"] == "model_not_allowed"  # the provider's error format
    recs = inspecting.wait_audit(lambda r: r["reason"] == "model_not_allowed", count=2)
    assert [r["decision"] for r in recs] == ["block", "block"]
    assert "'Model' can be read as 'model'" in recs[0]["detail"]
    assert recs[1]["detail"] == "model 'gpt-evil' (named in models[1])"
    assert tls_upstream.seen.requests == []


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({"X-Portkey-Config": '{"targets":[{"override_params":{"model":"gpt-evil"}}]}'}, ""),
        ({"x-portkey-config": "pc-stored-config"}, ""),
        ({"X-Model-Override": "gpt-evil"}, ""),
        ({}, "?model=gpt-evil"),
        ({}, "?Fallbacks=gpt-evil"),
    ],
)
def test_model_selecting_headers_and_query_parameters_are_refused(
    inspecting: ProxyProcess, tls_upstream: Upstream, headers: dict[str, str], query: str
) -> None:
    base = f"https://api.test:{tls_upstream.port}"
    with httpx.Client(
        proxy=inspecting.url, verify=guard_ca(inspecting), trust_env=False, timeout=20
    ) as c:
        for path, body in [
            ("/v1/chat/completions", {"model": "good-model", "messages": []}),
            ("/v1beta/models/gemini-ok:generateContent", {"contents": []}),
        ]:
            r = c.post(f"{base}{path}{query}", json=body, headers=headers)
            assert r.status_code == 403, r.text
            assert r.headers["x-egress-guard-reason"] == "model_not_allowed"
        ok = c.post(f"{base}/v1/chat/completions", json={"model": "good-model"})
    assert ok.status_code == 200
    assert len(tls_upstream.seen.requests) == 1


def test_audit_mode_records_a_collision_as_would_block(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    p = proxy(models_policy(http_upstream.port, mode="audit"))
    r = httpx.post(
        f"http://api.test:{http_upstream.port}/v1/chat/completions",
        content=b'{"model":"good-model","MODEL":"gpt-evil"}',
        proxy=p.url,
        trust_env=False,
    )
    assert r.status_code == 200  # audit mode lets it through, and says so
    recs = p.wait_audit(lambda r: r["reason"] == "model_not_allowed")
    assert recs and recs[0]["decision"] == "would_block"
    assert "'MODEL' can be read as 'model'" in recs[0]["detail"]
