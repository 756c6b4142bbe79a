"""Secrets a client puts where a proxy sees them never reach what the guard writes.

Threat: an API key in a query string the audit log already drops, but spelled so the
old scrubber missed it: percent-encoded (``/x%3Fkey=...``, which a server decoding the
path reads as a query), as path parameters (``/x;jsessionid=...``), as userinfo in a Host
header (``Host: user:secret@api.test``), in a CONNECT target or in an absolute URI. None
of it may reach the audit log (path, host, sni, detail, hint), the metrics, a human log
line, or the guard's own 403 (body and headers). The rules are in docs/audit-log.md.

Inputs: tests/testdata/hygiene/secret_paths.txt and secret_hosts.txt.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import httpx
import pytest
from support.clients import RawResponse
from support.hygiene import inspect_policy, plain_exchange, read_text, tunnel_exchange
from support.policies import inspect_policy as model_policy
from support.policies import make_policy
from support.ports import free_port
from support.proxy import ProxyFactory, ProxyProcess, inspect_client
from support.upstream import Upstream

from egress_guard.sinks import audit

DATA = Path(__file__).parent.parent / "testdata" / "hygiene"
SECRET = "SECRET"


def _table(name: str) -> list[tuple[str, str]]:
    rows = []
    for line in (DATA / name).read_text().splitlines():
        if line and not line.startswith("#"):
            given, kept = line.split("\t")
            rows.append((given, kept))
    return rows


PATHS = _table("secret_paths.txt")
HOSTS = _table("secret_hosts.txt")


# -- the rules --------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "kept"), PATHS)
def test_path_rule(given: str, kept: str) -> None:
    assert audit.scrub_path(given) == kept
    assert audit.scrub_path(kept) == kept  # scrubbing twice changes nothing


@pytest.mark.parametrize(("given", "kept"), HOSTS)
def test_host_rule(given: str, kept: str) -> None:
    assert audit.scrub_host(given) == kept


@pytest.mark.parametrize(
    "text",
    [
        "invalid Host: forbidden character in host 'user:SECRET@api.test'",
        "Host 'tok-SECRET@api.test:443' does not match api.test:443",
        "Bad HTTP request line: b'GET http://user:SECRET@api.test/x HTTP/1.1'",
        "Bad HTTP request line: b'CONNECT user:SECRET@api.test:443 HTTP/1.1'",
        "path 'x%3Fkey=SECRET' does not start with '/'",
        "path 'x%253fkey=SECRET' does not start with '/'",
        "path 'http://h/x;jsessionid=SECRET' does not start with '/'",
        "see /x?SECRET and /y#SECRET and /z%23SECRET",
        "user:SECRET@[::1]:443 refused",
    ],
)
def test_text_rule(text: str) -> None:
    out = audit.scrub_text(text)
    assert out is not None and SECRET not in out
    assert audit.scrub_text(out) == out


@pytest.mark.parametrize(
    "text",
    [
        "did you mean 'deny'?",
        "model 'claude-3-5-sonnet@20240620' is not allowed",
        "path contains '\\' or ';', which servers read differently",
        "path encodes a delimiter (%2F)",
        "really? yes; no",
    ],
)
def test_text_rule_leaves_ordinary_text_alone(text: str) -> None:
    assert audit.scrub_text(text) == text


# -- through the real proxy -------------------------------------------------------------


def _everything_written(p: ProxyProcess, metrics_port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    return {
        "audit log": read_text(p.audit_path),
        "stderr": read_text(p.log_path),
        "metrics": metrics,
    }


def _guard_answer(resp: RawResponse) -> str:
    """The parts of a response the guard wrote (its 4xx), or "" for an upstream's."""
    if "x-egress-guard-decision" not in resp.headers:
        return ""
    return repr(resp.headers) + resp.body.decode("utf-8", "replace")


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_plain_http_secrets_never_written(
    proxy: ProxyFactory, http_upstream: Upstream, mode: str
) -> None:
    mport = free_port()
    p = proxy(make_policy(http_upstream.port, mode=mode), "-v", "--metrics", f"127.0.0.1:{mport}")
    up = http_upstream.port
    answers = []
    for target, _ in PATHS:
        if target.startswith("/"):
            for host in ("api.test", "other.test"):  # allowed, and refused (not listed)
                answers.append(
                    plain_exchange(
                        p,
                        f"GET http://{host}:{up}{target} HTTP/1.1\r\nHost: {host}:{up}\r\n\r\n".encode(),
                    )
                )
        else:  # an absolute URI with userinfo as the request target
            target = target.replace("api.test", f"api.test:{up}")
            answers.append(
                plain_exchange(p, f"GET {target} HTTP/1.1\r\nHost: api.test:{up}\r\n\r\n".encode())
            )
    for value, _ in HOSTS:  # Host header with userinfo (refused: it does not match)
        answers.append(
            plain_exchange(
                p, f"GET http://api.test:{up}/v1 HTTP/1.1\r\nHost: {value}\r\n\r\n".encode()
            )
        )
    for value, _ in HOSTS:  # CONNECT to an authority with userinfo
        target = value if value.rpartition(":")[2].isdigit() else f"{value}:{up}"
        answers.append(plain_exchange(p, f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
    # records are written in order: once this one is in, every earlier one is
    plain_exchange(
        p, f"GET http://api.test:{up}/sentinel HTTP/1.1\r\nHost: api.test:{up}\r\n\r\n".encode()
    )
    assert p.wait_audit(lambda r: r.get("path") == "/sentinel")
    written = _everything_written(p, mport)
    for where, text in written.items():
        assert SECRET not in text, f"{where}: " + text[text.find(SECRET) - 300 :][:600]
    for resp in answers:
        assert SECRET not in _guard_answer(resp)
    # and the records are there, with what may be kept
    paths = {r["path"] for r in p.audit() if r.get("path")}
    assert {kept for given, kept in PATHS if given.startswith("/")} <= paths
    if mode == "enforce":  # (audit mode records the Host mismatch without its detail)
        assert any("<userinfo removed>@" in (r.get("detail") or "") for r in p.audit())


def test_inspected_tunnel_secrets_never_written(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    mport = free_port()
    p = proxy(
        inspect_policy(tls_upstream.port),
        "--inspect",
        "--upstream-ca",
        str(ca_file),
        "-v",
        "--metrics",
        f"127.0.0.1:{mport}",
    )
    up = tls_upstream.port
    answers = []
    for target, _ in PATHS:
        if not target.startswith("/"):
            continue
        for method in ("GET", "DELETE"):  # allowed, and refused (method rule)
            req = f"{method} {target} HTTP/1.1\r\nHost: api.test:{up}\r\nConnection: close\r\n\r\n"
            answers.append(tunnel_exchange(p, "api.test", up, req.encode()))
    for value, _ in HOSTS:
        req = f"GET /v1/x HTTP/1.1\r\nHost: {value}\r\nConnection: close\r\n\r\n"
        answers.append(tunnel_exchange(p, "api.test", up, req.encode()))
    assert p.wait_audit(lambda r: r.get("reason") == "host_header_mismatch", count=len(HOSTS))
    written = _everything_written(p, mport)
    for where, text in written.items():
        assert SECRET not in text, f"{where}: " + text[text.find(SECRET) - 300 :][:600]
    for resp in answers:
        assert SECRET not in _guard_answer(resp)
    assert any(r.status == 403 for r in answers)


def test_no_secrets_recorded_in_inspect_mode(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    mport = free_port()
    p = proxy(
        model_policy(tls_upstream.port),
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
    with inspect_client(p) as c:
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
