"""Request rules without ``--inspect`` are never skipped silently.

Before: a destination with ``methods``, ``paths`` or ``models`` reached through a CONNECT
tunnel while the guard ran without ``--inspect`` was relayed as bytes, its rules not
checked at all, and nothing said so (the record was a plain ``allow``). An agent asking
an allowed provider host for a forbidden model, path or method walked past the rules.

Now such a tunnel is refused as ``inspection_required`` with a hint to run with
``--inspect``; audit mode lets it through as ``would_block inspection_required`` (it is
recorded, never silent). A reload that adds rules to the destination of a tunnel that
has not started yet refuses it the same way. ``run`` warns at start-up and on reload
which destinations are affected. Plain HTTP needs no interception: the rules apply.
"""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

import httpx
import pytest
from support.clients import connect, read_response, send_raw
from support.policies import make_policy
from support.proxy import ProxyFactory
from support.upstream import Upstream

from egress_guard.engine.rules.mode import apply_mode
from egress_guard.engine.rules.names import decide_target
from egress_guard.engine.rules.requests import check_inspection

RULES = {
    "models": "    models: [good-model]\n",
    "paths": '    paths: ["/v1/*"]\n',
    "methods": "    methods: [GET]\n",
    "all": '    methods: [GET, POST]\n    paths: ["/v1/*"]\n    models: [good-model]\n',
}


def rules_policy(port: int, rules: str, mode: str = "enforce") -> str:
    text = make_policy(port, mode=mode)
    return text.replace(
        f"    ports: [{port}]\n  - name: private-api",
        f"    ports: [{port}]\n{rules}  - name: private-api",
        1,
    )


def tls_through(sock: socket.socket, ca_file: Path, sni: str, path: str) -> int:
    """TLS to the upstream through an established tunnel, one POST; the status, or 0
    when the guard closed the tunnel."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    try:
        tls = ctx.wrap_socket(sock, server_hostname=sni)
        body = b'{"model": "evil-model"}'
        tls.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {sni}\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        return read_response(tls).status  # type: ignore[arg-type]
    except (OSError, ValueError):
        return 0


@pytest.mark.parametrize("kind", sorted(RULES))
@pytest.mark.parametrize("spelling", ["api.test", "API.Test."])
def test_tunnel_to_ruled_destination_refused_without_inspect(
    proxy: ProxyFactory, tls_upstream: Upstream, kind: str, spelling: str
) -> None:
    port = tls_upstream.port
    p = proxy(rules_policy(port, RULES[kind]))
    sock, resp = connect(p.port, f"{spelling}:{port}")
    sock.close()
    assert resp.status == 403
    assert resp.headers["x-egress-guard-reason"] == "inspection_required"
    body = json.loads(resp.body)
    assert "--inspect" in body["hint"] and "egress_guard_inspect" in body["hint"]
    assert kind in body["hint"] or kind == "all"
    assert tls_upstream.seen.requests == []
    (rec,) = p.wait_audit(lambda r: r["reason"] == "inspection_required")
    assert (rec["decision"], rec["destination"]) == ("block", "test-api")
    # start-up says so, naming the destination
    log = p.log()
    assert "inspection_required" in log and "'test-api'" in log and "--inspect" in log


def test_unruled_destination_still_tunnels(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """Only destinations with rules need interception; the others stay plain tunnels,
    and nothing is warned about them."""
    p = proxy(make_policy(tls_upstream.port))
    sock, resp = connect(p.port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    assert tls_through(sock, ca_file, "api.test", "/v1/chat/completions") == 200
    assert "inspection_required" not in p.log()


def test_audit_mode_records_would_block_and_relays(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """Audit mode observes, it does not refuse: the tunnel opens, unchecked, but the
    record says would_block inspection_required (and so does its close record)."""
    port = tls_upstream.port
    p = proxy(rules_policy(port, RULES["all"], mode="audit"))
    sock, resp = connect(p.port, f"api.test:{port}")
    assert resp.status == 200
    assert tls_through(sock, ca_file, "api.test", "/not-v1") == 200
    (rec,) = p.wait_audit(lambda r: r["reason"] == "inspection_required")
    assert rec["decision"] == "would_block" and rec["destination"] == "test-api"
    assert not [r for r in p.audit() if r["decision"] == "allow"]
    p.stop()
    (close,) = p.audit("close")
    assert close["decision"] == "would_block"
    assert "let through unchecked" in p.log()


def test_inspect_mode_is_unaffected(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    port = tls_upstream.port
    p = proxy(rules_policy(port, RULES["all"]), "--inspect", "--upstream-ca", str(ca_file))
    sock, resp = connect(p.port, f"api.test:{port}")
    sock.close()
    assert resp.status == 200
    assert "inspection_required" not in p.log()


def test_plain_http_applies_rules_without_inspect(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """Plain HTTP needs no interception: the rules apply as they are, no refusal."""
    port = http_upstream.port
    p = proxy(rules_policy(port, RULES["all"]))
    with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
        bad_path = c.post(f"http://api.test:{port}/other", json={"model": "good-model"})
        bad_model = c.post(f"http://api.test:{port}/v1/chat/completions", json={"model": "x"})
        bad_method = c.put(f"http://api.test:{port}/v1/chat/completions", json={})
        ok = c.post(f"http://api.test:{port}/v1/chat/completions", json={"model": "good-model"})
    assert bad_path.headers["x-egress-guard-reason"] == "path_not_allowed"
    assert bad_model.headers["x-egress-guard-reason"] == "model_not_allowed"
    assert bad_method.headers["x-egress-guard-reason"] == "method_not_allowed"
    assert ok.status_code == 200
    assert [q[1] for q in http_upstream.seen.requests] == ["/v1/chat/completions"]


def test_connect_to_plain_http_port_refused_too(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """A CONNECT tunnel carrying plain HTTP would be relayed as bytes just the same."""
    port = http_upstream.port
    p = proxy(rules_policy(port, RULES["models"]))
    sock, resp = connect(p.port, f"api.test:{port}")
    sock.close()
    assert resp.headers["x-egress-guard-reason"] == "inspection_required"
    assert http_upstream.seen.requests == []


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_reload_adding_rules_refuses_a_tunnel_not_started(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, mode: str
) -> None:
    """CONNECT accepted under a policy without rules; the rules arrive by reload before
    the tunnel's first bytes: the tunnel is decided again and refused (audit: recorded)."""
    port = tls_upstream.port
    p = proxy(make_policy(port, mode=mode))
    sock, resp = connect(p.port, f"api.test:{port}")
    assert resp.status == 200
    p.replace_policy(rules_policy(port, RULES["models"], mode=mode))
    status = tls_through(sock, ca_file, "api.test", "/v1/chat/completions")
    (rec,) = p.wait_audit(lambda r: r["reason"] == "inspection_required")
    if mode == "enforce":
        assert status == 0 and tls_upstream.seen.requests == []
        assert rec["decision"] == "block"
    else:
        assert status == 200
        assert rec["decision"] == "would_block"
    assert "are refused as inspection_required" in p.log() or mode == "audit"  # reload warned
    assert "inspection_required" in p.log()


def test_through_a_parent_proxy_refused_too(proxy: ProxyFactory, tls_upstream: Upstream) -> None:
    """Upstream-proxy mode decides on the name; the rule holds there as well."""
    port = tls_upstream.port
    parent = proxy(make_policy(port))
    child = proxy(rules_policy(port, RULES["paths"]), "--upstream-proxy", parent.url)
    sock, resp = connect(child.port, f"api.test:{port}")
    sock.close()
    assert resp.headers["x-egress-guard-reason"] == "inspection_required"
    assert parent.audit() == []


def test_pipelined_bytes_after_refused_connect_go_nowhere(
    proxy: ProxyFactory, tls_upstream: Upstream
) -> None:
    """A client that sends its tunnel bytes right behind the CONNECT gets the 403 and
    nothing reaches the upstream."""
    port = tls_upstream.port
    p = proxy(rules_policy(port, RULES["all"]))
    sock, resp = send_raw(
        p.port,
        f"CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n".encode()
        + b"\x16\x03\x01\x00\x05hello"
        + f"POST /x HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n".encode(),
    )
    sock.close()
    assert resp.headers["x-egress-guard-reason"] == "inspection_required"
    assert tls_upstream.seen.requests == []


# -- the engine and the offline commands --------------------------------------------------


def test_engine_check_inspection() -> None:
    from egress_guard.engine import Decision, Engine, Match
    from egress_guard.policy import load_policy_text

    for mode in ("enforce", "audit"):
        eng = Engine(load_policy_text(rules_policy(443, RULES["paths"], mode=mode), "p.yaml"))
        m = decide_target(eng.compiled, "api.test", 443)
        assert isinstance(m, Match)
        allow = Decision(True, "allow", "allowlisted", "test-api", "api.test", 443)
        assert check_inspection(m.destination, True, allow) is None
        gap = check_inspection(m.destination, False, allow)
        assert gap is not None and (gap.allowed, gap.reason) == (False, "inspection_required")
        assert gap.destination == "test-api" and "--inspect" in (gap.hint or "")
        final = apply_mode(eng.compiled, gap)
        assert final.action == ("would_block" if mode == "audit" else "block")
        # a target let through for another reason keeps that reason
        other = allow._replace(action="would_block", reason="private_address")
        assert check_inspection(m.destination, False, other) is None
        plain = decide_target(eng.compiled, "localhost", 443)
        assert isinstance(plain, Match)
        assert check_inspection(plain.destination, False, allow) is None


def test_validate_and_check_warn(tmp_path: Path) -> None:
    import subprocess

    from support.proxy import EGRESS_GUARD

    path = tmp_path / "p.yaml"
    path.write_text(rules_policy(443, RULES["models"]))
    v = subprocess.run(
        [EGRESS_GUARD, "validate", str(path)], capture_output=True, text=True, timeout=30
    )
    assert v.returncode == 0
    assert "warning" in v.stderr and "'test-api'" in v.stderr
    assert "inspection_required" in v.stderr and "--inspect" in v.stderr
    c = subprocess.run(
        [EGRESS_GUARD, "check", "--json", "--policy", str(path), "api.test", "localhost"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    ruled, plain = (json.loads(line) for line in c.stdout.splitlines())
    assert ruled["needs_inspection"] is True and "inspection_required" in ruled["warning"]
    assert plain["needs_inspection"] is False and plain["warning"] is None
    h = subprocess.run(
        [EGRESS_GUARD, "check", "--policy", str(path), "api.test"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "warning:" in h.stdout and "--inspect" in h.stdout
