"""Every broken policy under ``tests/testdata/bad_policies/`` is refused with ``file:LINE:``.

One file per mistake (DESIGN.md section 3's rejections and the ones found since). The
first line of each says what the loader must answer::

    # expect: line N: <fragment of the message>

``N`` is the line of that file that holds the mistake, so an error pointing anywhere
else fails. To add a case, add a file; nothing here changes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from egress_guard.policy import PolicyError, load_policy

BAD = Path(__file__).resolve().parents[1] / "testdata" / "bad_policies"
_EXPECT = re.compile(r"# expect: line (\d+): (.+)")


def _cases() -> list[Path]:
    return sorted(BAD.glob("*.yaml"))


def test_there_are_cases() -> None:
    assert len(_cases()) >= 60, BAD


@pytest.mark.parametrize("path", _cases(), ids=lambda p: p.stem)
def test_bad_policy_is_refused_at_its_line(path: Path) -> None:
    header = path.read_text(encoding="utf-8").splitlines()[0]
    m = _EXPECT.fullmatch(header)
    assert m, f"{path}: first line must be '# expect: line N: <fragment>'"
    line, fragment = int(m.group(1)), m.group(2)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    rendered = info.value.render()
    assert rendered.startswith(f"{path}:{line}: "), rendered
    assert fragment in rendered, rendered
