"""egress-guard as an addon of an existing mitmproxy: ``mitmdump -s egress_guard/addon.py``."""

from __future__ import annotations

from pathlib import Path

from support.clients import connect, tls_get
from support.policies import make_policy
from support.proxy import BIN_DIR, ProxyFactory, free_port
from support.upstream import Upstream

import egress_guard.addon


def test_mitmdump_with_addon_blocks_and_allows(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(make_policy(tls_upstream.port))
    argv = [
        str(BIN_DIR / "mitmdump"),
        "-q",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"confdir={tmp_path / 'conf'}",
        "-s",
        egress_guard.addon.__file__,
        "--set",
        f"egress_guard_policy={policy}",
    ]
    proxy(None, argv=argv, port=port)
    sock, resp = connect(port, f"other.test:{tls_upstream.port}")
    sock.close()
    assert resp.status == 403
    assert resp.headers["x-egress-guard-reason"] == "not_allowlisted"
    sock, resp = connect(port, f"api.test:{tls_upstream.port}")
    assert resp.status == 200
    assert tls_get(sock, ca_file, "api.test", "/through-mitmdump").status == 200
    sock.close()
    assert tls_upstream.seen.connections == 1
    assert tls_upstream.seen.requests[0][1] == "/through-mitmdump"
