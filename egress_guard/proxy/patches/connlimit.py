"""mitmproxy's per-address connection cap, counted per requested name for pinned connections.

mitmproxy lets one client connection hold at most five upstream connections per address
(``ConnectionHandler.max_conns``), and a connection holds its slot for its whole life.
The key is the address the connection is opened to, read right after the
``server_connect`` hook. The guard's hook pins a name to the address it checked, so the
key became the IP: on one keep-alive client connection, the sixth allowed name behind
one address (a CDN, a host serving several names) waited for a slot that only the
client's leaving would free. Plain mitmproxy counts those per name as requested.

So the cap is counted per requested name again: the hook records, for the task that is opening the
connection, what to count it under (``pinned``: the spelling the client asked for, as
mitmproxy would, and how many reloads have retired this client's upstreams, whose
connections stay open with their slots), and the handler's ``max_conns`` table answers
a lookup of that task's address with that key's semaphore. A context variable
carries the key: the hook runs in the task that opens the connection, and every opening
starts from "nothing pinned", so a key cannot leak into another opening. Connections the guard
does not pin (a parent proxy, ``mitmdump -s`` without a decision) are counted by address,
as mitmproxy does.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable
from contextvars import ContextVar
from typing import Any

from mitmproxy.proxy import commands
from mitmproxy.proxy.server import ConnectionHandler

Address = tuple[str, int]

#: (what the guard counts the connection under, the address it pinned it to), for the
#: connection this task is opening
_PINNED: ContextVar[tuple[Hashable, Address] | None] = ContextVar(
    "egress_guard_pinned", default=None
)
_installed = False


def pinned(key: Hashable, address: Address) -> None:
    """The server_connect hook pinned the connection the current task is opening to
    ``address``; count it under ``key``."""
    _PINNED.set((key, address))


class _PerName(collections.defaultdict[Any, asyncio.Semaphore]):
    """``max_conns`` that counts a pinned connection under its key, not its IP."""

    def __getitem__(self, address: Any) -> asyncio.Semaphore:
        p = _PINNED.get()
        if p is not None and p[1] == address:
            return super().__getitem__(("pinned", p[0]))
        return super().__getitem__(address)


def install() -> None:
    """Patch ConnectionHandler.open_connection once (idempotent)."""
    global _installed
    if _installed:
        return
    open_connection = ConnectionHandler.open_connection

    async def opening(self: ConnectionHandler, command: commands.OpenConnection) -> None:
        _PINNED.set(None)  # this task's own opening: nothing pinned yet
        table = self.max_conns
        if type(table) is not _PerName:
            per_name = _PerName(table.default_factory)
            per_name.update(table)
            self.max_conns = per_name
        await open_connection(self, command)

    ConnectionHandler.open_connection = opening  # type: ignore[method-assign]
    _installed = True
