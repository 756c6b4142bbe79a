from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from egress_guard.engine import Engine
from egress_guard.policy import load_catalog, load_policy_text


def build_engine(
    text: str,
    *,
    self_endpoints: Iterable[tuple[str, int]] = (),
    file: str = "policy.yaml",
) -> Engine:
    return Engine(load_policy_text(text, file), load_catalog(), frozenset(self_endpoints))


@pytest.fixture(scope="session")
def make_engine() -> Callable[..., Engine]:
    """``make_engine(policy_text, self_endpoints=[...])``: a compiled policy."""
    return build_engine
