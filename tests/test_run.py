"""``egress-guard run``'s options: which event loop the proxy gets (and a clear refusal
when the one asked for is missing; the relay on each loop: tests/proxy/test_tunnel_relay.py),
and the numbers its timeouts take."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop
from support.loops import EACH_LOOP, Factory

from egress_guard.cli.parser import build_parser
from egress_guard.cli.run import DEFAULT_DRAIN_TIMEOUT, loop_factory


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], DEFAULT_DRAIN_TIMEOUT),
        (["--drain-timeout", "0"], 0),
        (["--drain-timeout", "25"], 25),
    ],
)
def test_drain_timeout_values(argv: list[str], expected: int) -> None:
    assert build_parser().parse_args(["run", *argv]).drain_timeout == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--drain-timeout", "-1"], "--drain-timeout: must be at least 0"),
        (["--drain-timeout", "1.5"], "--drain-timeout: '1.5' is not a whole number"),
        (["--idle-timeout", "0"], "--idle-timeout: must be at least 1"),
    ],
)
def test_bad_timeouts_are_refused_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


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
    from egress_guard.proxy.master import _eager_task_factory

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
