"""The record a run leaves: audit lines per decision and per close, a chain that detects
tampering, no secrets anywhere, and Prometheus numbers that match the traffic."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support.clients import connect, curl, tls_get
from support.policies import make_policy
from support.proxy import EGRESS_GUARD, ProxyFactory, free_port
from support.upstream import Upstream


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def verify(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EGRESS_GUARD, "audit", "verify", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_run_records_every_decision_and_close_and_metrics_match(
    proxy: ProxyFactory, tls_upstream: Upstream, http_upstream: Upstream, ca_file: Path
) -> None:
    mport = free_port()
    p = proxy(make_policy(tls_upstream.port, http_upstream.port), "--metrics", f"127.0.0.1:{mport}")
    for _ in range(2):
        sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
        assert resp.status == 200
        r = tls_get(sock, ca_file, "api.test", "/bytes/5000")
        assert r.status == 200 and len(r.body) == 5000
        sock.close()
    r2 = curl(p.url, f"http://api.test:{http_upstream.port}/bytes/3000")
    assert r2.code == 200
    for _ in range(2):
        sock, resp = connect(p.port, f"other.test:{tls_upstream.port}")
        sock.close()
        assert resp.status == 403

    # closes are recorded when the client connection ends
    closes = p.wait_audit(lambda r: True, event="close")
    deadline = time.monotonic() + 10
    while len(closes) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
        closes = p.audit("close")
    samples = scrape(mport)
    assert (
        value(samples, "egress_guard_decisions_total", destination="test-api", decision="allow")
        == 3
    )
    assert (
        value(samples, "egress_guard_decisions_total", destination="unlisted", decision="block")
        == 2
    )
    assert (
        value(samples, "egress_guard_bytes_total", destination="test-api", direction="down") > 13000
    )
    assert value(samples, "egress_guard_bytes_total", destination="test-api", direction="up") > 500
    assert (
        value(samples, "egress_guard_connection_duration_seconds_count", destination="test-api")
        == 3
    )
    assert value(samples, "egress_guard_active_connections", destination="test-api") == 0
    assert value(samples, "egress_guard_policy_reloads_total", result="ok") == 1
    info = [k for k in samples if k[0] == "egress_guard_policy_info"]
    assert len(info) == 1
    health = httpx.get(f"http://127.0.0.1:{mport}/healthz", timeout=5)
    assert health.status_code == 200

    assert p.stop() == 0  # SIGTERM: graceful, audit flushed
    decisions = p.audit("decision")
    assert len(decisions) == 5
    assert sorted(d["decision"] for d in decisions) == ["allow"] * 3 + ["block"] * 2
    closes = p.audit("close")
    assert len(closes) == 3
    tunnel_closes = [c for c in closes if c["port"] == tls_upstream.port]
    assert len(tunnel_closes) == 2
    for c in tunnel_closes:
        assert c["destination"] == "test-api"
        assert 5000 < c["bytes_down"] < 20000  # the body plus TLS handshake and framing
        assert 200 < c["bytes_up"] < 5000  # ClientHello and one request
        assert c["duration_ms"] >= 0
    plain = next(c for c in closes if c["port"] == http_upstream.port)
    assert 3000 < plain["bytes_down"] < 3500
    ok = verify(p.audit_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # tampering with any one line is detected and named
    lines = p.audit_path.read_text().splitlines(keepends=True)
    edited = list(lines)
    rec = json.loads(edited[3])
    rec["decision"] = "allow" if rec.get("decision") != "allow" else "block"
    edited[3] = json.dumps(rec) + "\n"
    for variant, line_no in (
        (edited, 4),
        (lines[:2] + lines[3:], 3),  # a deletion
        ([*lines[:2], lines[3], lines[2], *lines[4:]], 3),  # a swap
    ):
        bad = p.workdir / "tampered.log"
        bad.write_text("".join(variant))
        res = verify(bad)
        assert res.returncode == 1
        assert f"tampered.log:{line_no}" in res.stdout + res.stderr


def test_audit_mode_run_records_would_block(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(make_policy(tls_upstream.port, mode="audit"))
    r = curl(p.url, f"https://other.test:{tls_upstream.port}/", ca_file=ca_file)
    assert r.code == 200
    p.stop()
    [d] = p.audit("decision")
    assert (
        d["decision"] == "would_block" and d["reason"] == "not_allowlisted" and d["mode"] == "audit"
    )
    [c] = p.audit("close")
    assert c["decision"] == "would_block" and c["bytes_down"] > 0
    assert verify(p.audit_path).returncode == 0


SECRETS = ["sk-SECRET1", "SECRET2", "SECRET3", "SECRET4", "SECRET5"]


def test_no_secrets_in_audit_log_stdout_or_metrics(
    proxy: ProxyFactory, tls_upstream: Upstream, http_upstream: Upstream, ca_file: Path
) -> None:
    mport = free_port()
    p = proxy(
        make_policy(tls_upstream.port, http_upstream.port),
        "--metrics",
        f"127.0.0.1:{mport}",
        "--audit-log",
        "-",
        audit=False,
    )
    headers = [
        "-H",
        "Authorization: Bearer sk-SECRET1",
        "-H",
        "x-api-key: SECRET2",
        "-H",
        "Cookie: session=SECRET3",
    ]
    for host in ("api.test", "other.test"):  # allowed and blocked, plain HTTP
        curl(p.url, f"http://{host}:{http_upstream.port}/v1/models?key=SECRET4&x=1", *headers)
    # tunnel mode: only the CONNECT is visible to the proxy; send a stray credential on it
    import base64

    cred = base64.b64encode(b"user:SECRET5").decode()
    for host in ("api.test", "other.test"):
        sock, _ = connect(
            p.port, f"{host}:{tls_upstream.port}", {"Proxy-Authorization": f"Basic {cred}"}
        )
        sock.close()
    r = curl(
        p.url,
        f"https://api.test:{tls_upstream.port}/v1beta/models/x:generateContent?key=SECRET4",
        *headers,
        ca_file=ca_file,
    )
    assert r.code == 200
    # the upstream did get the credentials: the proxy relays them, it just never records them
    assert any(h.get("authorization") == "Bearer sk-SECRET1" for h in http_upstream.seen.headers)
    # plain HTTP: the client's Proxy-Authorization is for the proxy, never forwarded
    assert all("proxy-authorization" not in h for h in http_upstream.seen.headers)
    metrics_text = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
    p.stop()
    out = p.log()  # stdout (the audit log) and stderr together
    assert '"event": "decision"' in out or '"event":"decision"' in out
    for secret in SECRETS:
        assert secret not in out, secret
        assert secret not in metrics_text, secret
    assert "/v1/models" in out  # the path is kept, its query is not


def test_ten_thousand_unlisted_hosts_one_label_set(
    proxy: ProxyFactory, tls_upstream: Upstream
) -> None:
    mport = free_port()
    p = proxy(
        make_policy(tls_upstream.port), "--metrics", f"127.0.0.1:{mport}", "--audit-fsync", "never"
    )
    n, workers = 10_000, 16

    async def worker(k: int) -> int:
        blocked = 0
        for i in range(k, n, workers):
            reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
            host = f"h{i}.unlisted.test:443"
            writer.write(f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            line = await reader.readline()
            blocked += b" 403 " in line
            writer.close()
        return blocked

    async def run_all() -> int:
        return sum(
            await asyncio.wait_for(asyncio.gather(*(worker(k) for k in range(workers))), 240)
        )

    assert asyncio.run(run_all()) == n
    samples = scrape(mport)
    label_sets = {k for k in samples if k[0] == "egress_guard_decisions_total"}
    assert label_sets == {
        ("egress_guard_decisions_total", (("decision", "block"), ("destination", "unlisted")))
    }
    assert (
        value(samples, "egress_guard_decisions_total", destination="unlisted", decision="block")
        == n
    )
    text = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
    assert "unlisted.test" not in text


def test_plain_http_model_checked_request_counts_as_open_and_refused_one_leaves_no_close(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """The first request of a model-checked plain-HTTP connection is recorded after its
    body is read; it must still open the active-connections gauge, and a refused one must
    not leave a close record for an upstream that was never opened."""
    from support.policies import inspect_policy

    mport = free_port()
    p = proxy(inspect_policy(http_upstream.port), "--metrics", f"127.0.0.1:{mport}")
    url = f"http://api.test:{http_upstream.port}/v1/chat/completions"
    with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
        assert c.post(url, json={"model": "gpt-evil"}).status_code == 403
        ok = c.post(url, json={"model": "good-model"})
        assert ok.status_code == 200
        active = value(scrape(mport), "egress_guard_active_connections", destination="test-api")
        assert active == 1
    closes = p.wait_audit(lambda r: True, event="close")
    deadline = time.monotonic() + 10
    while (
        value(scrape(mport), "egress_guard_active_connections", destination="test-api") != 0
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert value(scrape(mport), "egress_guard_active_connections", destination="test-api") == 0
    assert len(closes) == 1 and closes[0]["decision"] == "allow" and closes[0]["bytes_down"] > 0
    assert [q[1] for q in http_upstream.seen.requests] == ["/v1/chat/completions"]
