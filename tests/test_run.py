"""``egress-guard run --event-loop``: which loop the proxy gets, and a clear refusal when
the one asked for is missing. (The relay on each loop: tests/proxy/test_tunnel_relay.py.)"""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop
from support.loops import EACH_LOOP, Factory

from egress_guard.run import loop_factory


def test_auto_and_uvloop_choose_uvloop_when_installed() -> None:
    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop


def test_asyncio_chooses_pythons_own_loop() -> None:
    assert loop_factory("asyncio") is None


def test_without_uvloop_auto_falls_back_and_uvloop_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loop_factory("auto") is None
    with pytest.raises(SystemExit, match="uvloop is not installed"):
        loop_factory("uvloop")


@EACH_LOOP
def test_task_factory_runs_tasks_eagerly_and_takes_eager_start(factory: Factory) -> None:
    """mitmproxy wants eager tasks; uvloop on Python 3.13 calls the task factory with an
    ``eager_start`` keyword that CPython's own eager factory takes only from 3.14."""
    from egress_guard.master import _eager_task_factory

    steps: list[str] = []

    async def child() -> None:
        steps.append("child started")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(_eager_task_factory)
        t = loop.create_task(child())
        steps.append("after create_task")
        await t
        t2 = _eager_task_factory(loop, child(), eager_start=None, context=None)
        await t2

    asyncio.run(main(), loop_factory=factory)
    assert steps == ["child started", "after create_task", "child started"]
