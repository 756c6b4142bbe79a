"""The files of a rotated audit log as a shell glob would list them: test-only (the
writer rotates, ``audit verify`` orders what it is given; neither needs this)."""

from __future__ import annotations

import contextlib
import os


def rotated_set(path: str) -> list[str]:
    """The existing files of a rotated log, oldest first: ``path.N`` ... ``path.1``, ``path``."""
    base = os.path.basename(path)
    folder = os.path.dirname(path) or "."
    numbered: list[tuple[int, str]] = []
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            suffix = name[len(base) + 1 :] if name.startswith(base + ".") else ""
            if suffix.isdigit() and not suffix.startswith("0"):
                numbered.append((int(suffix), os.path.join(os.path.dirname(path), name)))
    out = [p for _, p in sorted(numbered, reverse=True)]
    if os.path.exists(path):
        out.append(path)
    return out
