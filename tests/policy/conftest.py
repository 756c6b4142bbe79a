from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from egress_guard.policy import PolicyError, load_policy


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[[str, str], Path]:
    def write(text: str, name: str = "policy.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text, encoding="utf-8")
        return p

    return write


@pytest.fixture
def policy_error(write_policy: Callable[[str, str], Path]) -> Callable[[str], tuple[Path, str]]:
    """Load text from a real file; return (path, rendered error). Fails if it loads."""

    def load(text: str) -> tuple[Path, str]:
        p = write_policy(text, "policy.yaml")
        with pytest.raises(PolicyError) as info:
            load_policy(p)
        return p, info.value.render()

    return load
