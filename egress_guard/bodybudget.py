"""How many request-body bytes the guard may hold at once, in all and per client.

A model call's body is held whole until its model has been read (``--max-model-body``
bounds one body). Many bodies held at once are bounded here: before the guard decides to
hold a body it reserves the body's declared length (``Content-Length``; a body of unknown
length is refused on such destinations anyway), and the reservation is released when the
body has been checked and forwarded, or refused, or its stream or connection ends.

Two limits apply:

* ``limit`` (``--max-held-bodies``, default 256 MiB): all held bodies together;
* ``per_client``: what one client address may hold, a quarter of ``limit`` but never less
  than one ``--max-model-body`` body (and never more than ``limit``), so one client
  opening many connections or HTTP/2 streams cannot take the whole budget from the
  others, and one body of the largest size allowed still fits.

A reservation that does not fit is refused (the caller answers 503 ``buffer_budget``):
nothing waits, so nothing can be held by waiting either.

Pure bookkeeping, no mitmproxy: keys are opaque (the addon uses (connection id, flow
id)), every method is O(1) but ``release_connection``, and release is idempotent, so each
path that ends a body may release it without knowing whether another one did.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: default for --max-held-bodies
DEFAULT_MAX_HELD_BODIES = 256 * MiB
#: one client address may hold this fraction of the budget (1/4)
CLIENT_SHARE_DIVISOR = 4


def client_share(limit: int, max_body: int) -> int:
    """The per-client share for a budget of ``limit`` bytes: a quarter of it, at least one
    body of ``max_body`` bytes, at most ``limit``."""
    return max(0, min(limit, max(limit // CLIENT_SHARE_DIVISOR, max_body)))


@dataclass(frozen=True, slots=True)
class _Held:
    conn: Hashable
    client: str
    size: int


class BodyBudget:
    """The reservations of held request bodies."""

    def __init__(self, limit: int, per_client: int) -> None:
        self.limit = limit
        self.per_client = per_client
        #: bytes reserved now, in all
        self.held = 0
        #: reservations refused for capacity since start
        self.refused = 0
        #: bytes released since start (the allocator is asked to return memory by this)
        self.released = 0
        self._held: dict[Hashable, _Held] = {}
        self._by_client: dict[str, int] = {}
        self._by_conn: dict[Hashable, set[Hashable]] = {}

    @classmethod
    def for_limits(cls, limit: int, max_body: int) -> BodyBudget:
        return cls(limit, client_share(limit, max_body))

    def resize(self, limit: int, per_client: int) -> None:
        """New limits (options changed); what is held stays held."""
        self.limit = limit
        self.per_client = per_client

    def held_by(self, client: str) -> int:
        return self._by_client.get(client, 0)

    def __len__(self) -> int:
        return len(self._held)

    def reserve(self, key: Hashable, conn: Hashable, client: str, size: int) -> str | None:
        """Reserve ``size`` bytes for the body ``key`` on connection ``conn`` of ``client``.

        Returns None when reserved (a size of 0 or less needs and takes nothing), else why
        not (for the record's detail). A key already reserved keeps its reservation and is
        not reserved twice.
        """
        if size <= 0 or key in self._held:
            return None
        mine = self.held_by(client)
        if mine + size > self.per_client:
            self.refused += 1
            return (
                f"this client holds {mine} bytes of request bodies; {size} more would pass "
                f"its share of {self.per_client}"
            )
        if self.held + size > self.limit:
            self.refused += 1
            return (
                f"the guard holds {self.held} bytes of request bodies; {size} more would pass "
                f"--max-held-bodies ({self.limit})"
            )
        self._held[key] = _Held(conn, client, size)
        self._by_client[client] = mine + size
        self._by_conn.setdefault(conn, set()).add(key)
        self.held += size
        return None

    def release(self, key: Hashable) -> int:
        """Release the reservation ``key``; the bytes it held (0 if none: idempotent)."""
        entry = self._held.pop(key, None)
        if entry is None:
            return 0
        self.held -= entry.size
        self.released += entry.size
        left = self._by_client[entry.client] - entry.size
        if left > 0:
            self._by_client[entry.client] = left
        else:
            del self._by_client[entry.client]
        keys = self._by_conn.get(entry.conn)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_conn[entry.conn]
        return entry.size

    def release_connection(self, conn: Hashable) -> int:
        """Release every reservation of connection ``conn`` (it closed); bytes released."""
        return sum(self.release(key) for key in list(self._by_conn.get(conn, ())))


#: give memory back to the system once this many bytes of held bodies were released
TRIM_AFTER = 16 * MiB


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (musl, macOS: nothing to call)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def return_memory() -> bool:
    """Free what released bodies still take, and ask the C allocator to give free memory
    back to the system; True if it did.

    A body that never completed (refused, its client gone, its HTTP/2 stream reset) is
    still in its mitmproxy stream's receive buffer, and a stream is a reference cycle
    (it is in its own context's layer list): only the cyclic collector frees it, and the
    embedded proxy runs that rarely (master._tune_gc). Hence a full collection first.

    A held body grows in mitmproxy's receive buffer (a ``bytearray`` extended chunk by
    chunk, often in place at the top of the heap) and is then copied into a ``bytes``.
    glibc returns freed memory of the heap only from its top, and raises its mmap
    threshold after a large free (up to 32 MiB), so freed bodies stayed resident: four
    released 15 MiB bodies left the proxy 60 MiB larger for good; trimmed, it is back
    to its size before them within a second. ``malloc_trim(0)`` releases every
    free page of every arena (madvise), a few milliseconds for a heap of hundreds of MiB.
    """
    gc.collect()
    if _TRIM is None:
        return False
    try:
        return bool(_TRIM(0))
    except Exception:  # never let housekeeping break a release
        log.debug("malloc_trim failed", exc_info=True)
        return False
