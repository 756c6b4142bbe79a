"""A reference CONNECT relay, as small as Python allows: ``python -m bench.bare_relay``.

Not a proxy anyone should run: no policy, no audit, no timeouts, any CONNECT target on
loopback. It is in the bench to show what a Python process costs on this machine when
it does nothing but copy bytes between two sockets from event-loop callbacks (read,
send, no asyncio transports, no mitmproxy), so that the bulk row of egress-guard can be
read against the floor of its own language as well as against Squid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import select
import socket
from typing import Any

CHUNK = 256 * 1024


def _pump(
    loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket, ended: list[int]
) -> None:
    fd = src.fileno()

    def end() -> None:
        loop.remove_reader(fd)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        ended[0] += 1
        if ended[0] == 2:  # both directions done
            src.close()
            dst.close()

    def readable() -> None:
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            end()
            return
        view = memoryview(data)
        while view:
            try:
                view = view[dst.send(view) :]
            except BlockingIOError:
                select.select([], [dst], [], 5)  # the simplest back-pressure: wait here
            except OSError:
                end()
                return

    loop.add_reader(fd, readable)


def _splice_pump(
    loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket, ended: list[int]
) -> None:
    """The same pump with splice(2): socket -> pipe -> socket, no copy through Python."""
    fd, out = src.fileno(), dst.fileno()
    pr, pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(pw, 1031, CHUNK)  # F_SETPIPE_SZ: move up to CHUNK per call
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    held = [0]  # bytes in the pipe

    def end() -> None:
        loop.remove_reader(fd)
        loop.remove_writer(out)
        os.close(pr)
        os.close(pw)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        ended[0] += 1
        if ended[0] == 2:
            src.close()
            dst.close()

    def flush() -> bool:
        while held[0]:
            try:
                held[0] -= os.splice(pr, out, held[0], flags=flags)
            except BlockingIOError:
                return False
        return True

    def writable() -> None:
        try:
            if flush():
                loop.remove_writer(out)
                loop.add_reader(fd, readable)
        except OSError:
            end()

    def readable() -> None:
        try:
            n = os.splice(fd, pw, CHUNK, flags=flags)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if not n:
            end()
            return
        held[0] += n
        try:
            if not flush():
                loop.remove_reader(fd)
                loop.add_writer(out, writable)
        except OSError:
            end()

    loop.add_reader(fd, readable)


async def _handle(client: socket.socket, pump: Any) -> None:
    loop = asyncio.get_running_loop()
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 8192:
        chunk = await loop.sock_recv(client, 4096)
        if not chunk:
            client.close()
            return
        head += chunk
    try:
        _, port = head.split()[1].decode().rsplit(":", 1)
        upstream = socket.create_connection(("127.0.0.1", int(port)), timeout=5)
    except (OSError, ValueError, IndexError):
        await loop.sock_sendall(client, b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
        client.close()
        return
    upstream.setblocking(False)
    await loop.sock_sendall(client, b"HTTP/1.1 200 Connection established\r\n\r\n")
    ended = [0]
    pump(loop, client, upstream, ended)
    pump(loop, upstream, client, ended)


async def serve(port: int, splice: bool) -> None:
    pump = _splice_pump if splice else _pump
    loop = asyncio.get_running_loop()
    srv = socket.create_server(("127.0.0.1", port), backlog=1024)
    srv.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()
    while True:
        client, _ = await loop.sock_accept(srv)
        client.setblocking(False)
        task = loop.create_task(_handle(client, pump))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--splice", action="store_true", help="relay with splice(2)")
    args = ap.parse_args()
    asyncio.run(serve(args.port, args.splice))


if __name__ == "__main__":
    main()
