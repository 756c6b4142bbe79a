"""DNS for the proxy: getaddrinfo on threads of its own, bounded, shared per name.

Not ``loop.getaddrinfo``: on uvloop that is libuv's pool of four threads, shared with
everything else, and a lookup whose caller gave up still holds a thread or its place in
the queue, so a few names with slow servers could make every CONNECT fail.

Here:

- lookups run on at most DNS_THREADS threads, the same on every event loop;
- callers asking for the same (name, port) while a lookup for it is still running wait
  for that one lookup, so a hung name holds one thread, not one per CONNECT (a client
  may pick the names: audit mode resolves what it would block, ``*.`` rules allow any
  subdomain);
- a lookup nobody waits for any more is cancelled if it has not started;
- each caller waits at most DNS_TIMEOUT_S.

Answers are not cached: every CONNECT that needs DNS gets a fresh answer (the pinning
rule in docs/decisions.md relies on that), unless it joins a lookup already running.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

DNS_TIMEOUT_S = 5.0
#: lookups that may run at once
DNS_THREADS = 32

_pool: ThreadPoolExecutor | None = None


@dataclass(slots=True, eq=False)
class _Pending:
    future: Future[list[Any]]
    waiters: int = 0


#: (name, port) -> the lookup running for it; touched only from the event loop's thread
_pending: dict[tuple[str, int], _Pending] = {}


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="egress-guard-dns")
    return _pool


async def lookup(name: str, port: int) -> list[Any]:
    """getaddrinfo(name, port) for a TCP connection.

    Raises OSError (the resolver's answer) or TimeoutError."""
    key = (name, port)
    p = _pending.get(key)
    if p is None:
        p = _Pending(_threads().submit(socket.getaddrinfo, name, port, type=socket.SOCK_STREAM))
        _pending[key] = p
        loop = asyncio.get_running_loop()
        p.future.add_done_callback(lambda _: _call_soon(loop, _forget, key, p))
    p.waiters += 1
    try:
        mine = asyncio.wrap_future(p.future)
        mine.add_done_callback(_retrieve)  # its result is read here, or not at all
        return await asyncio.wait_for(asyncio.shield(mine), DNS_TIMEOUT_S)
    finally:
        p.waiters -= 1
        if not p.waiters:
            p.future.cancel()  # nobody waits: dropped if not started, else runs out
            if p.future.done():
                _forget(key, p)


def _forget(key: tuple[str, int], p: _Pending) -> None:
    if _pending.get(key) is p:
        del _pending[key]


def _call_soon(loop: asyncio.AbstractEventLoop, *args: Any) -> None:
    """From a resolver thread: run on the loop, unless the loop is gone (shutting down)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(*args)


def _retrieve(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()  # a lookup that failed after its callers left is not an error
