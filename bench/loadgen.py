"""Asyncio load generator: one new CONNECT tunnel + TLS handshake + GET per request.

Loopback only, and bounded: every phase stops at a deadline and at a request cap.
``Target.proxy`` None means direct (TCP + TLS + GET straight to the upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import time
from dataclasses import dataclass, field

from bench.certs import SNI

LOOPBACK = ("127.0.0.1", "::1")
CLOSE_TIMEOUT_S = 2.0
STEP_TIMEOUT_S = 10.0


class BenchError(RuntimeError):
    pass


#: what one tunnel or download can fail with: counted as an error, the phase goes on
CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    BenchError,
    ssl.SSLError,
    asyncio.IncompleteReadError,
    TimeoutError,
)
#: the same for a request of the load phases, which also reads a response head
_REQUEST_ERRORS: tuple[type[BaseException], ...] = (*CLIENT_ERRORS, asyncio.LimitOverrunError)


@dataclass
class Target:
    upstream_port: int
    ssl: ssl.SSLContext
    #: (host, port) of the proxy; None: connect to the upstream directly
    proxy: tuple[str, int] | None = None
    #: the CONNECT authority's host: the test name for egress-guard, the address for
    #: proxies that would otherwise look it up in DNS
    connect_host: str = "127.0.0.1"
    #: PEM bundle of the CAs ``ssl`` trusts, for the curl bulk client
    cafile: str | None = None

    def __post_init__(self) -> None:
        if self.proxy is not None and self.proxy[0] not in LOOPBACK:
            raise BenchError("the bench only talks to loopback")


@dataclass
class Result:
    ok: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str | None = None

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def error(self, e: BaseException) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(e).__name__}: {e}"


def client_context(*cafiles: str) -> ssl.SSLContext:
    """Verifying client context trusting only the given CAs. (Not the system store: with
    OpenSSL 3.0 a full store makes every client handshake several times slower.)"""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for f in cafiles:
        ctx.load_verify_locations(cafile=f)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def _open(t: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TCP (+ CONNECT) + TLS handshake."""
    if t.proxy is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.upstream_port)
    else:
        reader, writer = await asyncio.open_connection(*t.proxy)
        auth = f"{t.connect_host}:{t.upstream_port}".encode()
        writer.write(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (auth, auth))
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 200" not in status:
            writer.close()
            raise BenchError(f"CONNECT refused: {status[:100]!r}")
    await writer.start_tls(t.ssl, server_hostname=SNI)
    return reader, writer


async def _get(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    t: Target,
    path: bytes,
    close: bool,
) -> int:
    conn = b"Connection: close\r\n" if close else b""
    host = b"%s:%d" % (SNI.encode(), t.upstream_port)
    writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path, host, conn))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError(f"unexpected response: {head[:100]!r}")
    length = -1
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length < 0:
        raise BenchError("response without Content-Length")
    got = 0
    while got < length:
        chunk = await reader.read(min(1 << 20, length - got))
        if not chunk:
            raise BenchError("short body")
        got += len(chunk)
    return got


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_S)


async def one_request(t: Target, path: bytes = b"/") -> float:
    """New tunnel, TLS, GET path, close. Returns the latency to the last body byte."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.wait_for(_open(t), STEP_TIMEOUT_S)
    try:
        await asyncio.wait_for(_get(reader, writer, t, path, close=True), STEP_TIMEOUT_S)
        return time.perf_counter() - t0
    finally:
        await _close(writer)


async def load(t: Target, concurrency: int, duration: float, max_requests: int) -> Result:
    """``concurrency`` workers, each opening tunnels back to back, until the deadline or
    the request cap."""
    res = Result()
    start = time.perf_counter()
    deadline = start + duration
    budget = [max_requests]

    async def worker() -> None:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            try:
                lat = await one_request(t)
            except _REQUEST_ERRORS as e:
                res.error(e)
                if res.errors > 50 and res.ok == 0:
                    return
                continue
            res.ok += 1
            res.latencies.append(lat)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.elapsed = time.perf_counter() - start
    return res


async def bulk(t: Target, downloads: int) -> list[float]:
    """Download /bulk ``downloads`` times, one tunnel each; MB/s from GET to last byte
    (the tunnel set-up is excluded: it is what the c=1 latency measures)."""
    rates = []
    for _ in range(downloads):
        reader, writer = await asyncio.wait_for(_open(t), STEP_TIMEOUT_S)
        try:
            t0 = time.perf_counter()
            n = await asyncio.wait_for(_get(reader, writer, t, b"/bulk", close=True), 60)
            rates.append(n / (time.perf_counter() - t0) / 1e6)
        finally:
            await _close(writer)
    return rates


def curl_path() -> str | None:
    return shutil.which("curl")


#: curl's environment: no proxy variables, so "direct" is direct and a proxied run goes
#: only through the proxy given with -x
_CURL_ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


async def bulk_curl(t: Target, downloads: int, expect: int) -> list[float]:
    """The same downloads with curl as the client (C, OpenSSL), one process per download.

    The asyncio client spends more CPU per MB than nginx and the proxy together, so on a
    small machine the Python bulk figure says as much about the client as about the
    relay. MB/s from just before the GET (curl's ``time_pretransfer``: TCP, CONNECT and
    TLS done) to the last byte, the same window as ``bulk``.
    """
    binary = curl_path()
    if binary is None or t.cafile is None:
        raise BenchError("curl not installed")
    url_host = f"{SNI}:{t.upstream_port}"
    argv = [binary, "-sS", "--http1.1", "-o", "/dev/null", "--cacert", t.cafile]
    argv += ["-w", "%{size_download} %{time_pretransfer} %{time_total}", "--max-time", "60"]
    if t.proxy is None:
        argv += ["--noproxy", "*", "--resolve", f"{url_host}:127.0.0.1"]
    else:
        argv += ["-x", f"http://{t.proxy[0]}:{t.proxy[1]}"]
        if t.connect_host != SNI:  # proxies that would otherwise look the name up in DNS
            argv += ["--connect-to", f"{url_host}:{t.connect_host}:{t.upstream_port}"]
    argv.append(f"https://{url_host}/bulk")
    rates = []
    for _ in range(downloads):
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_CURL_ENV,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 70)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise BenchError(f"curl exited {proc.returncode}: {err.decode(errors='replace')[:200]}")
        size, pre, total = out.split()
        if int(size) != expect:
            raise BenchError(f"curl got {int(size)} of {expect} bytes")
        rates.append(int(size) / (float(total) - float(pre)) / 1e6)
    return rates


class IdleTunnels:
    """Hold ``n`` established tunnels (CONNECT + TLS + one keep-alive GET), then idle."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.errors = 0

    async def open(self, t: Target, n: int, concurrency: int = 8) -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                try:
                    reader, writer = await asyncio.wait_for(_open(t), STEP_TIMEOUT_S)
                    self.writers.append(writer)
                    await asyncio.wait_for(
                        _get(reader, writer, t, b"/", close=False), STEP_TIMEOUT_S
                    )
                except CLIENT_ERRORS:
                    self.errors += 1

        await asyncio.gather(*(one() for _ in range(n)))

    async def close(self) -> None:
        for w in self.writers:
            w.transport.abort()  # 500 graceful TLS shutdowns would only slow the bench
        self.writers.clear()
        await asyncio.sleep(0.2)
