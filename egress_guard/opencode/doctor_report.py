"""``egress-guard doctor``'s input and its findings, and how findings are printed.

Kept apart from the checks so that the checks' modules (``doctor``, ``doctor_env``) and
the CLI share these types without importing one another.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from egress_guard.opencode.config import OpenCodeConfig
from egress_guard.policy import CatalogEntry, EffectivePolicy
from egress_guard.policy.loader import shipped_preset
from egress_guard.policy.writer import comment_safe

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER: Mapping[str, int] = {"error": 0, "warning": 1, "info": 2}
DEFAULT_PROXY_URL = "http://127.0.0.1:8080"


@dataclass(frozen=True)
class Finding:
    severity: Severity
    check: str
    message: str
    fix: str
    source: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "severity": self.severity,
            "check": self.check,
            "message": self.message,
            "fix": self.fix,
            "source": self.source,
        }


@dataclass
class DoctorInput:
    cfg: OpenCodeConfig | None
    env: Mapping[str, str]
    policy: EffectivePolicy
    catalog: Mapping[str, CatalogEntry]
    policy_label: str = "the built-in minimal preset"
    proxy_url: str = DEFAULT_PROXY_URL
    inspect: bool = False
    #: files read when the config was discovered (not given): reported as info
    discovered: Sequence[str] | None = None
    checked_places: Sequence[str] = field(default_factory=tuple)

    @property
    def own_policy(self) -> str:
        """Where a fix tells the user to allow something: never into a shipped preset (an
        upgrade replaces it), but a policy of their own that includes it."""
        preset = shipped_preset(self.policy.source)
        if preset is None:
            return "the policy"
        return (
            f"a policy of your own (`version: 1`, `include: [{preset}]`; egress-guard policy "
            "from-opencode writes one), run with --policy, not the shipped preset"
        )


def render_text(findings: Sequence[Finding]) -> Iterator[str]:
    for f in findings:
        where = f"{f.source}: " if f.source else ""
        # values from opencode.json and the environment: no line breaks or escapes reach
        # the terminal
        yield comment_safe(f"{f.severity.upper():<8} [{f.check}] {where}{f.message}")
        yield comment_safe(f"         fix: {f.fix}")
    counts = {s: sum(1 for f in findings if f.severity == s) for s in SEVERITY_ORDER}
    yield (
        f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info"
        + ("" if counts["error"] else ": no errors")
    )
