"""The event loops egress-guard runs on (``--event-loop``), for tests that must hold on
each: uvloop (the default) and Python's own asyncio loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import uvloop

#: a loop factory for ``asyncio.run(..., loop_factory=)``; None is asyncio's own loop
Factory = Callable[[], asyncio.AbstractEventLoop] | None

#: parametrize a test's ``factory`` argument over both loops
EACH_LOOP = pytest.mark.parametrize(
    "factory", [uvloop.new_event_loop, None], ids=["uvloop", "asyncio"]
)

#: parametrize a test's ``loop`` argument: the value for ``egress-guard run --event-loop``
LOOPS = pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
