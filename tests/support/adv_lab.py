"""The adversarial test lab: upstreams inside a private namespace, the policy naming them,
and a runner that sends one spelling through the proxy and judges what happened.

Destinations (all inside the namespace of ``adv_net``):

=================  ====================  ===================================================
name               address               role
=================  ====================  ===================================================
api.test           10.200.0.10           allowed control: must work (TLS ``AA``, HTTP ``AH``)
porthost.test      10.200.0.11           allowed on port ``PT`` only; odd port spellings name
                                         it: never contacted
front.test         10.200.0.12           allowed (TLS ``PA``, HTTP ``PH``); every SNI / Host /
                                         smuggling disagreement names it: never contacted
(denied address)   10.200.0.15           denied by address (``DENIED_ADDR``); the unlisted
                                         ``DENIED_ALIASES`` resolve to it: never contacted
                                         (the trap listens there)
everything else    any local address     the trap (wildcard listener on ``PF``, 443, 80):
                                         never contacted
=================  ====================  ===================================================
"""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from support.adv_net import FaultUpstream, NetNS, Trap
from support.adv_wire import Outcome, client_hello, exchange, read_outcome
from support.ports import free_port
from support.proxy import BIN_DIR, ProxyProcess
from support.upstream import Upstream

EGRESS_GUARD = str(BIN_DIR / "egress-guard")

#: names that resolve (statically) to a non-public address; allowed *by name*
PRIVATE_NAMES: dict[str, str | list[str]] = {
    "private.test": "127.0.0.2",
    "meta.test": "169.254.169.254",
    "ecs.test": "169.254.170.2",
    "alibaba.test": "100.100.100.200",
    "oracle.test": "192.0.0.192",
    "ten.test": "10.0.0.1",
    "rfc1918b.test": "172.16.0.1",
    "rfc1918c.test": "192.168.1.1",
    "cgnat.test": "100.64.0.1",
    "zero.test": "0.0.0.0",
    "v6loop.test": "::1",
    "mapped.test": "::ffff:127.0.0.1",
    "compat.test": "::7f00:1",
    "nat64.test": "64:ff9b::7f00:1",
    "nat64meta.test": "64:ff9b::a9fe:a9fe",
    "nat64local.test": "64:ff9b:1::a00:1",
    "sixtofour.test": "2002:7f00:1::1",
    "sixtofourmeta.test": "2002:a9fe:a9fe::1",
    "teredo.test": "2001:0:4136:e378:8000:63bf:80ff:fffe",
    "ula.test": "fd00:ec2::254",
    "ula2.test": "fc00::1",
    # every address must pass: a public-looking first answer does not launder the second
    "mixed.test": ["10.200.0.13", "127.0.0.1"],
    "mixed6.test": ["10.200.0.13", "::1"],
}


#: an address the lab policy denies by address; only the trap listens there
DENIED_ADDR = "10.200.0.15"

#: unlisted names (``network.resolve``) whose answers hold the denied address: an alias
#: must not reach it in any mode (audit mode lets an unlisted name through otherwise)
DENIED_ALIASES: dict[str, str | list[str]] = {
    "alias.test": DENIED_ADDR,
    "alias-mapped.test": "::ffff:" + DENIED_ADDR,
    "alias-second.test": ["10.200.0.13", DENIED_ADDR],
}


@dataclass
class Lab:
    ns: NetNS
    workdir: Path
    ca: trustme.CA
    ca_file: Path
    trap: Trap = field(init=False)
    api_tls: Upstream = field(init=False)
    api_http: Upstream = field(init=False)
    front_tls: Upstream = field(init=False)
    front_http: Upstream = field(init=False)
    port_tls: Upstream = field(init=False)
    faulty: FaultUpstream = field(init=False)
    proxies: list[ProxyProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        pf = free_port("0.0.0.0")
        self.trap = Trap((pf, 443, 80)).start()
        cert = self.ca.issue_cert("api.test", "front.test", "porthost.test", "other.test")

        def tls() -> ssl.SSLContext:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            cert.configure_cert(ctx)
            return ctx

        self.api_tls = Upstream(tls(), host="10.200.0.10")
        self.api_http = Upstream(None, host="10.200.0.10")
        self.port_tls = Upstream(tls(), host="10.200.0.11")
        self.front_tls = Upstream(tls(), host="10.200.0.12")
        self.front_http = Upstream(None, host="10.200.0.12")
        self.faulty = FaultUpstream("10.200.0.14")

    @property
    def ports(self) -> dict[str, int]:
        pt = self.port_tls.port
        return {
            "PF": self.trap.ports[0],
            "AA": self.api_tls.port,
            "AH": self.api_http.port,
            "PA": self.front_tls.port,
            "PH": self.front_http.port,
            "PT": pt,
            "PX": self.faulty.port,
            "PTW": pt + 65536,  # wraps to PT in 16 bits
            "PTX": pt + 2**32,  # wraps to PT in 32 bits
            "PTHEX": int(f"{pt:x}", 16),
        }

    def fill(self, template: str) -> str:
        """Fill ``{PF}``-style port tokens; ``{PT_FW}``, ``{PH_AR}``... spell a port in
        full-width, Arabic-Indic or Devanagari digits (``int()`` accepts them all)."""
        p = self.ports
        out = template.replace("{PTx}", f"{self.port_tls.port:x}")
        for k in sorted(p, key=len, reverse=True):
            for suffix, zero in (("_FW", 0xFF10), ("_AR", 0x0660), ("_DEV", 0x0966)):
                digits = "".join(chr(zero + int(d)) for d in str(p[k]))
                out = out.replace("{" + k + suffix + "}", digits)
            out = out.replace("{" + k + "}", str(p[k]))
        return out

    def policy(
        self, mode: str = "enforce", extra: str = "", destinations: str = "", deny: str = ""
    ) -> str:
        p = self.ports
        private_hosts = ", ".join([*PRIVATE_NAMES, "localhost", "x.denied.test"])
        resolve = "\n".join(
            f"    {name}: {json.dumps(addr)}"
            for name, addr in (PRIVATE_NAMES | DENIED_ALIASES).items()
        )
        return f"""\
version: 1
mode: {mode}
destinations:
  - name: api
    purpose: allowed control destination
    hosts: [api.test]
    ports: [{p["AA"]}, {p["AH"]}]
  - name: front
    purpose: allowed; every disagreement case names it and must never reach it
    hosts: [front.test]
    ports: [{p["PA"]}, {p["PH"]}]
  - name: porthost
    purpose: allowed on one port; odd port spellings name it
    hosts: [porthost.test]
    ports: [{p["PT"]}]
  - name: faulty
    purpose: an upstream that closes, resets and stalls on request
    hosts: [faulty.test]
    ports: [{p["PX"]}]
  - name: resolves-private
    purpose: allowed by name, but every name resolves to a non-public address
    hosts: [{private_hosts}]
    ports: [{p["PF"]}, 443, 80]
{destinations}deny:
  - hosts: ["**.denied.test"]
  - hosts: [{DENIED_ADDR}]
    comment: a denied address; only the trap listens there
{deny}network:
  block_private: true
  allow_cidrs: [10.200.0.0/24]
  resolve:
    api.test: 10.200.0.10
    porthost.test: 10.200.0.11
    front.test: 10.200.0.12
    faulty.test: 10.200.0.14
    other.test: 10.200.0.13
    evil.test: 10.200.0.13
    x.denied.test: 10.200.0.13
{resolve}
{extra}"""

    def proxy(self, name: str, *args: str, policy: str | None = None, **kw: Any) -> ProxyProcess:
        p = ProxyProcess(self.workdir / name, policy or self.policy(), list(args), **kw)
        self.proxies.append(p)
        return p.start()

    # -- the never-contact upstreams ---------------------------------------------------

    def never_contact(self) -> dict[str, int]:
        return {
            "trap": self.trap.count,
            "front_tls": self.front_tls.seen.connections,
            "front_http": self.front_http.seen.connections,
            "port_tls": self.port_tls.seen.connections,
        }

    def close(self) -> None:
        for p in self.proxies:
            with contextlib.suppress(Exception):
                p.stop()
        for up in (self.api_tls, self.api_http, self.port_tls, self.front_tls, self.front_http):
            with contextlib.suppress(Exception):
                up.close()
        self.faulty.close()
        self.trap.close()

    # -- allowed control ----------------------------------------------------------------

    def allowed_roundtrip(
        self, proxy: ProxyProcess, path: str = "/ok", src: str | None = None
    ) -> int:
        """CONNECT api.test + TLS GET through the proxy; returns the HTTP status (0 on error)."""
        from support.adv_wire import TLSTunnel

        try:
            sock, out = exchange(
                proxy.port,
                f"CONNECT api.test:{self.api_tls.port} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode(),
                src=src,
                timeout=10,
            )
        except OSError:
            return 0
        if sock is None or out.status != 200:
            if sock is not None:
                sock.close()
            return 0
        try:
            t = TLSTunnel(sock, "api.test", str(self.ca_file))
            t.handshake(timeout=10)
            r = t.request(f"GET {path} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode(), timeout=10)
            return r.status or 0
        except OSError:
            return 0
        finally:
            sock.close()


# -- running one spelling -------------------------------------------------------------------


@dataclass(frozen=True)
class Spelling:
    """One way of asking for a forbidden destination.

    kind ``connect``: ``data`` is sent as is; a 2xx answer is followed by a ClientHello
    without SNI (allowed by design) so a wrongly opened tunnel shows up at the upstream.
    kind ``http``: ``data`` is a plain-HTTP proxy request.
    kind ``tls``: ``CONNECT front.test:PA`` (which must be allowed; ``connect_to`` names
    another authority, e.g. an unlisted one audit mode lets through), then a ClientHello
    with ``sni`` (and ``extra_sni``), its first bytes cut into ``split``.
    kind ``tunnel-http``: ``CONNECT connect_to`` (which must be let through), then
    ``data`` (a plain-HTTP request) inside the tunnel; the outcome is its answer.
    """

    id: str
    cls: str
    kind: str
    data: str = ""
    sni: bytes | None = None
    extra_sni: bytes | None = None
    split: tuple[int, ...] = ()
    raw_tls: bytes | None = None
    note: str = ""
    connect_to: str = ""


@dataclass
class Verdict:
    spelling: Spelling
    src: str
    outcome: Outcome
    contacted: dict[str, int]
    tunnel: bool = False
    tls_answer: bytes = b""
    problems: list[str] = field(default_factory=list)

    @property
    def passed_through(self) -> bool:
        return (
            any(self.contacted.values())
            or bool(self.tls_answer)
            or (
                self.spelling.kind != "tls"
                and self.outcome.status is not None
                and 200 <= self.outcome.status < 300
            )
        )

    @property
    def guard_blocked(self) -> bool:
        if self.spelling.kind == "tls":
            return self.tunnel and not self.passed_through
        return self.outcome.guard_reason is not None

    def describe(self) -> str:
        c = {k: v for k, v in self.contacted.items() if v}
        return (
            f"{self.spelling.id} [{self.spelling.cls}] from {self.src}: {self.outcome.short()}"
            f"{' tunnel' if self.tunnel else ''}"
            f"{' contacted=' + str(c) if c else ''}"
            f"{' tls_answer=' + self.tls_answer[:8].hex() if self.tls_answer else ''}"
            f"{' problems=' + '; '.join(self.problems) if self.problems else ''}"
        )


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


def _provoke(sock: Any, hello: bytes, split: tuple[int, ...], pause: float = 0.25) -> bytes:
    """Send a ClientHello (cut as asked) over a tunnel; return any TLS bytes answered."""
    pos = 0
    try:
        for n in split:
            sock.sendall(hello[pos : pos + n])
            pos += n
            time.sleep(pause)
        sock.sendall(hello[pos:])
    except OSError:
        return b""
    sock.settimeout(2.0)
    try:
        data: bytes = sock.recv(4096)
    except OSError:
        return b""
    return data


def run_spelling(
    lab: Lab, proxy: ProxyProcess, sp: Spelling, src: str, timeout: float = 8.0
) -> Verdict:
    before = lab.never_contact()
    tunnel = False
    tls_answer = b""
    problems: list[str] = []
    if sp.kind in ("tls", "tunnel-http"):
        authority = lab.fill(sp.connect_to or "front.test:{PA}")
        sock, out = exchange(
            proxy.port,
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode(),
            src=src,
            timeout=timeout,
        )
        if sock is None or out.status != 200:
            problems.append(
                f"CONNECT {authority} was not let through ({out.short()}): case cannot run"
            )
            if sock is not None:
                sock.close()
        elif sp.kind == "tunnel-http":
            tunnel = True
            try:
                sock.sendall(lab.fill(sp.data).encode("utf-8", "surrogateescape"))
                out = read_outcome(sock, timeout)
            except OSError:
                out = Outcome(closed=True)
            sock.close()
            time.sleep(0.3)
            if out.timed_out:
                problems.append(f"no answer in the tunnel and no close within {timeout}s")
        else:
            tunnel = True
            hello = (
                sp.raw_tls
                if sp.raw_tls is not None
                else client_hello(sp.sni, extra_sni=sp.extra_sni)
            )
            answer = _provoke(sock, hello, sp.split)
            if answer[:1] == b"\x16":  # a ServerHello came back: the upstream answered
                tls_answer = answer
            sock.close()
            time.sleep(0.3)
    else:
        sock, out = exchange(
            proxy.port,
            lab.fill(sp.data).encode("utf-8", "surrogateescape"),
            src=src,
            timeout=timeout,
        )
        if sock is not None:
            if sp.kind == "connect" and out.status is not None and 200 <= out.status < 300:
                tunnel = True
                answer = _provoke(sock, client_hello(None), ())
                if answer[:1] == b"\x16":
                    tls_answer = answer
                time.sleep(0.3)
            sock.close()
        if out.timed_out:
            problems.append(f"no answer and no close within {timeout}s")
        elif out.status is not None:
            ok = (
                (out.status in (403, 407, 502) and out.guard_reason)
                or (400 <= out.status < 500 and out.status not in (403, 407))
                or (200 <= out.status < 300)
            )  # 2xx is judged as passed_through
            if not ok:
                problems.append(f"unexpected answer {out.status} {out.reason!r}")
    contacted = _delta(before, lab.never_contact())
    return Verdict(sp, src, out, contacted, tunnel, tls_answer, problems)


def src_for(index: int) -> str:
    """A distinct loopback source address per case: the audit join key."""
    return f"127.66.{index // 250}.{index % 250 + 1}"


# -- audit ------------------------------------------------------------------------------


def audit_records(proxy: ProxyProcess) -> list[dict[str, Any]]:
    return proxy.audit(None)


_BARRIERS = iter(range(10**9))


def audit_barrier(proxy: ProxyProcess, timeout: float = 10.0, denied: bool = False) -> bool:
    """Wait until every audit record the proxy emitted so far is in the file.

    The sink writes in order from one queue, so once a fresh block (an unlisted name
    nobody else uses) is in the file, so is everything emitted before it. ``denied``: use
    a name the lab's deny rules cover (refused in audit mode too)."""
    n = next(_BARRIERS)
    host = f"barrier{n}.denied.test" if denied else f"barrier{n}.test"
    sock, out = exchange(
        proxy.port, f"CONNECT {host}:1 HTTP/1.1\r\n\r\n".encode(), src="127.69.0.1", timeout=timeout
    )
    if sock is not None:
        sock.close()
    if out.status != 403:
        return False
    return bool(wait_for(lambda: proxy.wait_audit(lambda r: r.get("host") == host, 0), timeout))


def wait_for(pred: Any, timeout: float = 5.0, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def audit_verify(path: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EGRESS_GUARD, "audit", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
