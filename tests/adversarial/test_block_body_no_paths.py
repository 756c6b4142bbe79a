"""The guard's refusals never tell a client where files are on the proxy's host.

Threat: a 403's hint said "... add a destination ... to /etc/egress-guard/policy.yaml" or
"denied by /home/ops/policy.yaml:13": the agent behind the proxy learns the layout of the
host (and where to write, if it ever can). The client is told "the policy" and may be
told the destination, the allowed models and the catalog entry to use; the file:line
stays in the audit log (``hint``), where it helps the operator.

Every kind of refusal whose hint names a file is tried: unlisted target (with and
without a catalog entry), port not allowed, deny rule by name and by address, and the
request rules of an inspected tunnel (answered in the provider's error format).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.clients import RawResponse
from support.hygiene import plain_exchange, tunnel_exchange
from support.policies import make_policy
from support.proxy import ProxyFactory, ProxyProcess
from support.upstream import Upstream

from egress_guard.policy import policies_dir

RULES = """\
    methods: [GET, POST]
    paths: ["/v1/*"]
    models: [good-model]
"""


def _policy(port: int, mode: str = "enforce") -> str:
    text = make_policy(port, mode=mode, allow="127.0.0.1/32")
    text = text.replace(
        f"    ports: [{port}]\n  - name: private-api",
        f"    ports: [{port}]\n{RULES}  - name: private-api",
        1,
    )
    # a deny rule by address, reached through an allowed name
    text = text.replace(
        '  - hosts: ["**.denied.test"]',
        '  - hosts: ["**.denied.test"]\n  - hosts: ["127.0.0.3/32"]',
    )
    text = text.replace(
        "    private.test: 127.0.0.2", "    private.test: 127.0.0.2\n    deny-ip.test: 127.0.0.3"
    )
    text = text.replace(
        "hosts: [private.test, localhost]", "hosts: [private.test, localhost, deny-ip.test]"
    )
    return text


def _assert_no_paths(p: ProxyProcess, resp: RawResponse) -> None:
    text = repr(resp.headers) + resp.body.decode("utf-8", "replace")
    for secret in (str(p.workdir), str(p.policy_path), str(policies_dir()), "policy.yaml", ".yaml"):
        assert secret not in text, text


@pytest.mark.parametrize(
    ("target", "reason", "says"),
    [
        ("other.test:{up}", "not_allowlisted", "to the policy"),
        ("api.openai.com:443", "not_allowlisted", "use: "),  # a catalog entry covers it
        ("api.test:1", "port_not_allowed", "destination 'test-api'"),
        ("x.denied.test:{up}", "denylisted", "denied by the policy"),
        ("deny-ip.test:{up}", "denylisted", "denied by the policy"),
    ],
)
def test_plain_and_connect_refusals_name_no_file(
    proxy: ProxyFactory, http_upstream: Upstream, target: str, reason: str, says: str
) -> None:
    p = proxy(_policy(http_upstream.port))
    target = target.format(up=http_upstream.port)
    for req in (
        f"GET http://{target}/v1/x HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n",
    ):
        resp = plain_exchange(p, req.encode())
        assert resp.status == 403, resp
        assert resp.headers["x-egress-guard-reason"] == reason
        assert says in resp.json()["hint"], resp.json()
        _assert_no_paths(p, resp)
    # the operator still has the file and line, in the audit log
    recs = p.wait_audit(lambda r: r.get("reason") == reason, count=2)
    assert recs and all(r["hint"] for r in recs)
    if reason != "port_not_allowed" and says != "use: ":
        assert any(str(p.policy_path) in r["hint"] for r in recs), recs


def test_inspected_refusals_name_no_file(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    p = proxy(_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    up = tls_upstream.port
    body = json.dumps({"model": "evil-model", "messages": []})
    for req in (
        f"DELETE /v1/x HTTP/1.1\r\nHost: api.test:{up}\r\n\r\n",
        f"GET /admin HTTP/1.1\r\nHost: api.test:{up}\r\n\r\n",
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: api.test:{up}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}",
        f"GET /v1/x HTTP/1.1\r\nHost: other.test:{up}\r\n\r\n",
    ):
        resp = tunnel_exchange(p, "api.test", up, req.encode())
        assert resp.status == 403, resp
        _assert_no_paths(p, resp)
    assert tls_upstream.seen.requests == []
