"""Names that share a pinned address do not share mitmproxy's per-address connection cap.

mitmproxy lets one client connection hold at most five upstream connections per
address, and holds a slot for a connection's whole life. The guard connects to the
address it checked, so without care the cap is counted per IP: on one keep-alive client
connection, the sixth allowed name behind the same address (one CDN, one host with
virtual hosts) waited for a slot that only the client's leaving would free.
"""

from __future__ import annotations

import socket

from support.clients import read_response
from support.proxy import ProxyFactory
from support.upstream import Upstream

NAMES = [f"h{i}.test" for i in range(8)]


def _policy(port: int) -> str:
    resolve = "\n".join(f"    {n}: 127.0.0.1" for n in NAMES)
    return f"""\
version: 1
mode: enforce
destinations:
  - name: many-names
    purpose: eight virtual hosts on one address
    hosts: [{", ".join(NAMES)}]
    ports: [{port}]
network:
  allow_cidrs: [127.0.0.1/32]
  resolve:
{resolve}
"""


def _get(sock: socket.socket, authority: str, path: str) -> int:
    """One absolute-form GET on an open keep-alive connection; the status code."""
    sock.sendall(f"GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    return read_response(sock, timeout=8).status


def test_eight_names_on_one_address_over_one_client_connection(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    p = proxy(_policy(http_upstream.port))
    port = http_upstream.port
    with socket.create_connection((p.host, p.port), timeout=8) as s:
        codes = [_get(s, f"{n}:{port}", f"/{n}") for n in NAMES]
        # back to the first names: their connections are reused, not reopened
        codes += [_get(s, f"{n}:{port}", "/again") for n in NAMES[:2]]
    assert codes == [200] * (len(NAMES) + 2)
    assert [q[1] for q in http_upstream.seen.requests][: len(NAMES)] == [f"/{n}" for n in NAMES]
    assert http_upstream.seen.connections == len(NAMES)


def test_six_spellings_of_one_address_over_one_client_connection(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """mitmproxy reuses a connection only for the same spelling, so the cap must count
    spellings apart too (found by review: the sixth spelling hung)."""
    port = http_upstream.port
    p = proxy(
        f"""\
version: 1
mode: enforce
destinations:
  - name: by-address
    purpose: loopback by its address
    hosts: [127.0.0.1]
    ports: [{port}]
network:
  allow_cidrs: [127.0.0.1/32]
"""
    )
    spellings = ["127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0177.0.0.1"]
    with socket.create_connection((p.host, p.port), timeout=8) as s:
        codes = [_get(s, f"{h}:{port}", f"/{h}") for h in spellings]
    assert codes == [200] * len(spellings)


def test_reloads_do_not_use_up_the_cap_of_a_keep_alive_connection(
    proxy: ProxyFactory, http_upstream: Upstream
) -> None:
    """Each reload retires the client's open upstream (it stays open, holding its slot):
    the next request is counted afresh (found by review: the sixth reload hung)."""
    port = http_upstream.port
    p = proxy(_policy(port))
    with socket.create_connection((p.host, p.port), timeout=8) as s:
        codes = [_get(s, f"{NAMES[0]}:{port}", "/0")]
        for i in range(1, 7):
            p.replace_policy(_policy(port).replace("purpose: eight", f"purpose: reload {i}, eight"))
            codes.append(_get(s, f"{NAMES[0]}:{port}", f"/{i}"))
    assert codes == [200] * 7
    assert [q[1] for q in http_upstream.seen.requests] == [f"/{i}" for i in range(7)]
