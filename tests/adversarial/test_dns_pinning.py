"""DNS pinning: the guard connects to the address it checked, and only to that one.

A keep-alive connection cannot switch to another address (the pinned one spelled as an
IP literal is a new decision); a reload that re-pins a name moves the next request, and
an open tunnel whose name was re-pinned refuses its next request instead of following it.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from support.adv_lab import Lab
from support.adv_wire import exchange, read_outcome
from support.policies import inspect_policy, make_policy
from support.proxy import ProxyFactory, ProxyProcess, inspect_client
from support.upstream import Upstream


def test_reload_repinning_the_name_refuses_the_open_tunnels_next_request(
    proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path
) -> None:
    """The open upstream cannot follow a network.resolve change: the next request in the
    tunnel is refused (the client reconnects and gets the new address checked)."""
    p = proxy(inspect_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))
    url = f"https://api.test:{tls_upstream.port}/v1/chat/completions"
    with inspect_client(p) as c:
        assert c.post(url, json={"model": "good-model"}).status_code == 200
        p.replace_policy(
            inspect_policy(tls_upstream.port).replace("api.test: 127.0.0.1", "api.test: 127.0.0.2")
        )
        again = c.post(url, json={"model": "good-model"})
    assert again.status_code == 403
    assert len(tls_upstream.seen.requests) == 1


def test_keep_alive_after_reload_goes_to_the_newly_pinned_address(proxy: ProxyFactory) -> None:
    """A reload that pins the name elsewhere (and no longer allows the old address) moves
    the next request on an open client connection; the old upstream socket is not reused."""
    with (
        Upstream(None, host="127.0.0.2") as new,
        Upstream(None, host="127.0.0.1", port=new.port) as old,
    ):
        p = proxy(make_policy(old.port))
        moved = make_policy(old.port, allow="127.0.0.2/32").replace(
            "api.test: 127.0.0.1", "api.test: 127.0.0.2"
        )
        with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
            assert c.get(f"http://api.test:{old.port}/one").status_code == 200
            p.replace_policy(moved)
            assert c.get(f"http://api.test:{old.port}/two").status_code == 200
        assert [q[1] for q in old.seen.requests] == ["/one"]
        assert [q[1] for q in new.seen.requests] == ["/two"]
        assert old.seen.connections == 1 and new.seen.connections == 1


def test_keep_alive_cannot_switch_to_the_pinned_address(
    lab: Lab, bypass_guard: ProxyProcess
) -> None:
    """After an allowed request, the same client connection asks for the address the
    allowed name was pinned to (an IP literal): a new decision, refused."""
    ph = lab.ports["PH"]
    sock, first = exchange(
        bypass_guard.port,
        f"GET http://front.test:{ph}/a HTTP/1.1\r\nHost: front.test:{ph}\r\n\r\n".encode(),
        src="127.67.0.4",
    )
    assert sock is not None and first.status == 200
    n = len(lab.front_http.seen.requests)
    sock.sendall(
        f"GET http://10.200.0.12:{ph}/b HTTP/1.1\r\nHost: 10.200.0.12:{ph}\r\n\r\n".encode()
    )
    second = read_outcome(sock, 5)
    sock.close()
    assert second.status == 403, second.short()
    assert len(lab.front_http.seen.requests) == n
