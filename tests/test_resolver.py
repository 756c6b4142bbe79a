"""DNS lookups (egress_guard.addon.lookup): slow names cannot starve the others, and a
lookup whose caller gave up before it started never runs. On both event loops: uvloop's
own ``getaddrinfo`` has four shared threads and runs abandoned lookups anyway."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from egress_guard import addon

LOOPS = pytest.mark.parametrize("factory", [uvloop.new_event_loop, None], ids=["uvloop", "asyncio"])


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
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    f = FakeResolver()
    monkeypatch.setattr(socket, "getaddrinfo", f)
    monkeypatch.setattr(addon, "_dns_pool", None)  # a fresh pool for each test
    monkeypatch.setattr(addon, "DNS_TIMEOUT_S", 0.5)
    return f


def _run(factory: Callable[[], asyncio.AbstractEventLoop] | None, coro: Any) -> Any:
    return asyncio.run(coro, loop_factory=factory)


@LOOPS
def test_hung_lookups_do_not_starve_a_fast_one(
    fake: FakeResolver, factory: Callable[[], asyncio.AbstractEventLoop] | None
) -> None:
    async def scenario() -> list[Any]:
        slow = [asyncio.ensure_future(addon.lookup(f"slow{i}.test", 443)) for i in range(8)]
        await asyncio.sleep(0.05)
        fast = await addon.lookup("fast.test", 443)
        for t in slow:
            with pytest.raises(TimeoutError):
                await t
        return fast

    try:
        assert _run(factory, scenario())[0][4] == ("127.0.0.1", 443)
    finally:
        fake.release.set()


@LOOPS
def test_a_lookup_abandoned_before_it_started_never_runs(
    fake: FakeResolver,
    factory: Callable[[], asyncio.AbstractEventLoop] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(addon, "DNS_THREADS", 2)

    async def scenario() -> None:
        calls = [addon.lookup(f"slow{i}.test", 443) for i in range(2)]
        calls += [addon.lookup(f"queued{i}.test", 443) for i in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results

    _run(factory, scenario())
    fake.release.set()
    addon._resolver().shutdown(wait=True)
    assert sorted(fake.started) == ["slow0.test", "slow1.test"]
