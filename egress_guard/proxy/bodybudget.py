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

Reserving the declared length keeps memory strictly bounded, but a head costs a client a
few hundred bytes while it reserves up to its share: a client that sends heads and then
no body (or trickles it) held the budget for as long as its connections stayed open.
So each reservation records when it was made and how many body bytes have arrived since
(``progress``, fed from mitmproxy's body buffering by egress_guard/proxy/patches/heldprogress.py).
Before a body is refused for capacity, reservations that are *stalled* give way
(``evict_stalled``): older than ``grace`` seconds (``HELD_BODY_GRACE``) and with fewer
bytes received than ``min_rate`` bytes a second (``--held-body-min-rate``, default
``DEFAULT_HELD_BODY_MIN_RATE``) over their whole age. The caller closes their
connections. A body that keeps arriving at least at that rate is never evicted: real
clients upload a JSON body in one go, at loopback or LAN speed, orders of magnitude
faster than the floor.

Pure bookkeeping, no mitmproxy: keys are opaque (the addon uses (connection id, flow
id)), every method is O(1) but ``release_connection``, and release is idempotent, so each
path that ends a body may release it without knowing whether another one did.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: default for --max-held-bodies
DEFAULT_MAX_HELD_BODIES = 256 * MiB
#: one client address may hold this fraction of the budget (1/4)
CLIENT_SHARE_DIVISOR = 4
#: a reservation younger than this (seconds) is never evicted: its body may not have
#: started yet (the head is decided first; the client may still be writing)
HELD_BODY_GRACE = 2.0
#: default for --held-body-min-rate (bytes a second, averaged over a reservation's age):
#: a held body slower than this is stalled and may be evicted for another one. 64 KiB/s
#: is a 16 MiB body in over four minutes; loopback and LAN clients send it in well under
#: a second.
DEFAULT_HELD_BODY_MIN_RATE = 64 * 1024


def client_share(limit: int, max_body: int) -> int:
    """The per-client share for a budget of ``limit`` bytes: a quarter of it, at least one
    body of ``max_body`` bytes, at most ``limit``."""
    return max(0, min(limit, max(limit // CLIENT_SHARE_DIVISOR, max_body)))


@dataclass(slots=True, eq=False)
class Held:
    """One reservation; ``received`` and ``last`` change as its body arrives."""

    conn: Hashable
    client: str
    size: int
    #: time.monotonic() when it was made
    since: float
    #: what the caller wants back on eviction (the addon: the flow)
    tag: object = None
    #: body bytes arrived so far
    received: int = 0
    #: time.monotonic() of the last body bytes (``since`` until some arrive)
    last: float = field(default=0.0)

    def stalled(self, now: float, grace: float, min_rate: float) -> bool:
        """Older than ``grace`` and slower than ``min_rate`` bytes/s over its whole age."""
        age = now - self.since
        return age > grace and self.received < min_rate * age


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
        #: stalled reservations evicted for other bodies since start
        self.evicted = 0
        self._held: dict[Hashable, Held] = {}
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

    def get(self, key: Hashable) -> Held | None:
        return self._held.get(key)

    def fits(self, client: str, size: int) -> bool:
        """Would ``size`` more bytes of ``client`` fit now (share and limit)?"""
        return self.held_by(client) + size <= self.per_client and self.held + size <= self.limit

    def reserve(
        self,
        key: Hashable,
        conn: Hashable,
        client: str,
        size: int,
        *,
        tag: object = None,
        now: float | None = None,
    ) -> str | None:
        """Reserve ``size`` bytes for the body ``key`` on connection ``conn`` of ``client``.

        Returns None when reserved (a size of 0 or less needs and takes nothing), else why
        not (for the record's detail). A key already reserved keeps its reservation and is
        not reserved twice. ``tag`` comes back with the reservation if it is evicted.
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
        since = time.monotonic() if now is None else now
        self._held[key] = Held(conn, client, size, since, tag, last=since)
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

    def progress(self, key: Hashable, n: int, now: float) -> None:
        """``n`` more body bytes of reservation ``key`` arrived (none: nothing to do)."""
        entry = self._held.get(key)
        if entry is not None:
            entry.received += n
            entry.last = now

    def evict_stalled(
        self, client: str, size: int, now: float, grace: float, min_rate: float
    ) -> list[tuple[Hashable, Held]]:
        """Make room for ``size`` bytes of ``client`` by releasing stalled reservations
        (``Held.stalled``): the client's own if its share is what is short, every stalled
        one if the budget is (all of them: each is a client holding bytes it does not
        send, and the budget is wanted). Returns what was released, for the caller to
        close and record; nothing if the body fits already or ``min_rate`` is 0 (eviction
        off). O(reservations), and only when a body does not fit."""
        if min_rate <= 0 or size <= 0 or self.fits(client, size):
            return []
        short_share = self.held_by(client) + size > self.per_client
        short_all = self.held + size > self.limit
        out = [
            (key, entry)
            for key, entry in self._held.items()
            if (short_all or (short_share and entry.client == client))
            and entry.stalled(now, grace, min_rate)
        ]
        for key, _ in out:
            self.release(key)
        self.evicted += len(out)
        return out


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
