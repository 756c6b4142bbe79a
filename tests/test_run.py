"""``egress-guard run --event-loop``: which loop the proxy gets, and a clear refusal when
the one asked for is missing. (The relay on each loop: tests/proxy/test_tunnel_relay.py.)"""

from __future__ import annotations

import sys

import pytest
import uvloop

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
