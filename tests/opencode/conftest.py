"""Fixtures for the OpenCode integration tests (the config files live in fixtures/)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def fixtures() -> Path:
    return Path(__file__).parent / "fixtures"
