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
import os
import select
import socket

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


async def _handle(client: socket.socket) -> None:
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
    _pump(loop, client, upstream, ended)
    _pump(loop, upstream, client, ended)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    srv = socket.create_server(("127.0.0.1", port), backlog=1024)
    srv.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()
    while True:
        client, _ = await loop.sock_accept(srv)
        client.setblocking(False)
        task = loop.create_task(_handle(client))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    asyncio.run(serve(ap.parse_args().port))


if __name__ == "__main__":
    main()
