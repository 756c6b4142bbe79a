"""DNS lookups (egress_guard.proxy.resolver): slow names cannot starve the others, callers of
one name share one lookup, and a lookup nobody waits for any more never starts. On both
event loops: uvloop's own ``getaddrinfo`` has four shared threads and runs abandoned
lookups anyway."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from support.loops import EACH_LOOP, Factory

from egress_guard.proxy import resolver


class FakeResolver:
    """getaddrinfo stand-in: names starting with ``slow`` hang until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started: list[str] = []

    def __call__(self, host: str, port: int, *args: Any, **kw: Any) -> list[Any]:
        self.started.append(host)
        if host.startswith("slow"):
            self.release.wait(10)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeResolver]:
    f = FakeResolver()
    monkeypatch.setattr(socket, "getaddrinfo", f)
    monkeypatch.setattr(resolver, "_pool", None)  # a fresh pool for each test
    monkeypatch.setattr(resolver, "_pending", {})
    monkeypatch.setattr(resolver, "DNS_TIMEOUT_S", 0.5)
    yield f
    f.release.set()


def _run(factory: Factory, coro: Any) -> Any:
    return asyncio.run(coro, loop_factory=factory)


@EACH_LOOP
def test_hung_lookups_do_not_starve_a_fast_one(fake: FakeResolver, factory: Factory) -> None:
    async def scenario() -> list[Any]:
        slow = [asyncio.ensure_future(resolver.lookup(f"slow{i}.test", 443)) for i in range(8)]
        await asyncio.sleep(0.05)
        fast = await resolver.lookup("fast.test", 443)
        for t in slow:
            with pytest.raises(TimeoutError):
                await t
        return fast

    assert _run(factory, scenario())[0][4] == ("127.0.0.1", 443)


@EACH_LOOP
def test_callers_of_one_hung_name_share_one_lookup(
    fake: FakeResolver, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 CONNECTs to a name whose DNS hangs hold one thread, not 40; those that come
    after the first callers gave up join the lookup still running. Once it answers,
    the next caller gets a fresh lookup (answers are not cached)."""
    monkeypatch.setattr(resolver, "DNS_THREADS", 4)

    async def scenario() -> list[Any]:
        calls = [resolver.lookup("slow.test", 443) for _ in range(40)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results
        again = asyncio.ensure_future(resolver.lookup("slow.test", 443))
        other = await resolver.lookup("fast.test", 443)  # 3 threads are still free
        fake.release.set()
        return [await again, other]

    again, other = _run(factory, scenario())
    assert again[0][4] == other[0][4] == ("127.0.0.1", 443)
    assert fake.started == ["slow.test", "fast.test"]
    _run(factory, resolver.lookup("slow.test", 443))
    assert fake.started == ["slow.test", "fast.test", "slow.test"]


@EACH_LOOP
def test_a_lookup_abandoned_before_it_started_never_runs(
    fake: FakeResolver, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolver, "DNS_THREADS", 2)

    async def scenario() -> None:
        calls = [resolver.lookup(f"slow{i}.test", 443) for i in range(2)]
        calls += [resolver.lookup(f"queued{i}.test", 443) for i in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results

    _run(factory, scenario())
    fake.release.set()
    resolver._threads().shutdown(wait=True)
    assert sorted(fake.started) == ["slow0.test", "slow1.test"]
