"""Missing prerequisites: a skip on a developer's machine, a failure in CI.

A test that skips because curl, a network namespace or OpenCode's network document is
missing tests nothing; in CI (``CI=true``, as ``.ci/run`` is started) that must turn the
run red instead of letting it pass while testing less. ``scripts/install-test-peers.sh``
installs everything these checks look for.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(why: str) -> NoReturn:
    """Stop this test for a missing prerequisite: fail in CI, skip elsewhere."""
    if in_ci():
        pytest.fail(f"missing test prerequisite (CI=true): {why}", pytrace=False)
    pytest.skip(why)
