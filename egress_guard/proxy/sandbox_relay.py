"""The relay between ``egress-guard sandbox``'s network namespace and the guard.

The sandboxed command's namespace has only loopback. The guard process owns listening
sockets inside it (made by cli/sandbox.py while a thread was in the namespace): the
proxy port its HTTPS_PROXY names, and the "direct" port every other TCP connection is
redirected to by nftables. This relay accepts on them and opens a connection to the
guard's own listener on the host's loopback, which the sandbox cannot reach:

- proxy port: bytes relayed as they are (the guard sees an ordinary proxy client);
- direct port: the connection ignored the proxy. Its original destination
  (SO_ORIGINAL_DST) and first bytes (TLS SNI, or an HTTP Host header) are read, and it
  is handed to the guard as ``CONNECT name:port`` (the address itself when no name can
  be read), with the original address registered under the relay's own socket address
  in ``GuardState.direct_origins``: the engine requires it to be one of the name's
  checked addresses (engine/rules/direct.py). The guard decides, records, pins and
  relays as for any tunnel; a refused one is closed (a plain-HTTP one after the
  guard's refusal, which says why).

Nothing a sandboxed client sends is trusted: the name it gives is normalised (anything
else falls back to the address), the guard still checks the SNI against it, and the
original address comes from the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence

from egress_guard.normalize import (
    IPAddress,
    NormalizationError,
    join_hostport,
    normalize_host,
    socket_ip,
)
from egress_guard.proxy.state import GuardState
from egress_guard.proxy.tunnel import read_plain_client_hello

log = logging.getLogger("egress_guard")

#: netfilter's SO_ORIGINAL_DST (SOL_IP) and IP6T_SO_ORIGINAL_DST (SOL_IPV6)
SO_ORIGINAL_DST = 80
#: how long a caught connection may stay silent before it is decided on its address
#: (a protocol where the server speaks first sends nothing)
FIRST_BYTES_TIMEOUT = 2.0
FIRST_BYTES_MAX = 16 * 1024
_HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"PATCH ", b"OPTIONS ")


def original_destination(sock: socket.socket) -> tuple[IPAddress, int]:
    """Where a redirected connection was sent (netfilter's record of it)."""
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket_ip(socket.inet_ntop(socket.AF_INET, raw[4:8])), int.from_bytes(raw[2:4])
    raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    return socket_ip(socket.inet_ntop(socket.AF_INET6, raw[8:24])), int.from_bytes(raw[2:4])


def _http_host(first: bytes) -> str | None:
    head = first.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            text = value.strip().decode("ascii", "replace")
            if text.startswith("["):
                return text[1 : text.find("]")] if "]" in text else None
            return text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return None


def name_in(first: bytes) -> str | None:
    """The name a connection's first bytes carry (SNI, Host), normalised, or None."""
    raw: str | None = None
    hello = read_plain_client_hello(first)
    if hello is not None:
        raw = hello.sni
    elif first.startswith(_HTTP_METHODS):
        raw = _http_host(first)
    if not raw:
        return None
    try:
        host = normalize_host(raw)
    except NormalizationError:
        return None
    return host.value


def _complete(first: bytes) -> bool:
    if first[:1] == b"\x16":
        return read_plain_client_hello(first) is not None
    return b"\r\n\r\n" in first or not first.startswith(_HTTP_METHODS)


async def _read_first(reader: asyncio.StreamReader) -> bytes:
    first = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FIRST_BYTES_TIMEOUT
    while len(first) < FIRST_BYTES_MAX:
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            chunk = await asyncio.wait_for(reader.read(FIRST_BYTES_MAX - len(first)), left)
        except TimeoutError:
            break
        if not chunk:
            break
        first += chunk
        if _complete(first):
            break
    return first


async def _body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """The body of the guard's refusal (it always sends Content-Length), bounded."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            with contextlib.suppress(asyncio.IncompleteReadError):
                return await reader.readexactly(min(int(value), 64 * 1024))
    return b""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    try:
        await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
    finally:
        for w in (a[1], b[1]):
            w.close()


class SandboxRelay:
    """Accepts inside the sandbox, connects to the guard at ``guard`` (host loopback)."""

    def __init__(self, state: GuardState, guard: tuple[str, int]) -> None:
        self.state = state
        self.guard = guard
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(
        self, proxy_socks: Sequence[socket.socket], direct_socks: Sequence[socket.socket]
    ) -> None:
        """Serve until cancelled."""
        servers = [await asyncio.start_server(self._on_proxy, sock=s) for s in proxy_socks] + [
            await asyncio.start_server(self._on_direct, sock=s) for s in direct_socks
        ]
        try:
            await asyncio.Event().wait()
        finally:
            for srv in servers:
                srv.close()

    async def _on_proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.open_connection(*self.guard)
        except OSError as e:
            log.warning("egress-guard sandbox: cannot reach the guard: %s", e)
            writer.close()
            return
        await _splice((reader, writer), upstream)

    async def _on_direct(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._direct(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            log.debug("egress-guard sandbox: direct connection: %s", e)
        finally:
            writer.close()

    async def _direct(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ts = writer.get_extra_info("socket")
        with socket.socket(fileno=os.dup(ts.fileno())) as sock:
            origin, port = original_destination(sock)
        first = await _read_first(reader)
        name = name_in(first) or str(origin)
        authority = join_hostport(name, port)
        up_r, up_w = await asyncio.open_connection(*self.guard)
        local = up_w.get_extra_info("sockname")
        key = (str(local[0]), int(local[1]))
        self.state.direct_origins[key] = origin
        try:
            up_w.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            await up_w.drain()
            head = await up_r.readuntil(b"\r\n\r\n")
        finally:
            self.state.direct_origins.pop(key, None)
        status = head.split(b" ", 2)[1:2]
        if status != [b"200"]:
            if first.startswith(_HTTP_METHODS):
                # a plain-HTTP client gets the guard's refusal (status, reason, hint)
                writer.write(head + await _body(up_r, head))
                await writer.drain()
            up_w.close()
            with contextlib.suppress(OSError):
                await up_w.wait_closed()
            return
        up_w.write(first)
        await _splice((reader, writer), (up_r, up_w))
