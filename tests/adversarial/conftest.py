"""Fixtures of the adversarial suite: a private network namespace per module, the lab of
upstreams inside it, and the session-finish hook that writes the suite's report.

The report is written outside the source tree (``.cache/reports/adversarial.md`` at the
repository root, or ``$EG_REPORT_DIR/adversarial.md``): a test run must leave ``git status``
clean. Its headline figures are also printed in pytest's terminal summary, so a CI log
shows them.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from adversarial.report import write_report
from adversarial.stats import STATS
from support.adv_lab import Lab
from support.adv_net import NetNS, assert_isolated, netns_available, remove_stale_namespaces
from support.prereq import missing
from support.proxy import ProxyProcess


def report_dir() -> Path:
    """Where the adversarial report goes: never a tracked file."""
    env = os.environ.get("EG_REPORT_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "reports"


@pytest.fixture(scope="module")
def netns() -> Iterator[NetNS]:
    """A fresh namespace for this module; the main thread works inside it meanwhile."""
    why = netns_available()
    if why is not None:
        missing(f"adversarial suite needs a private network namespace: {why}")
    remove_stale_namespaces()
    ns = NetNS()
    try:
        with ns.enter():
            assert_isolated()
            yield ns
    finally:
        ns.destroy()


@pytest.fixture(scope="module")
def lab(
    netns: NetNS, ca: trustme.CA, ca_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lab]:
    lab = Lab(netns, tmp_path_factory.mktemp("adv"), ca, ca_file)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def bypass_guard(lab: Lab) -> Iterator[ProxyProcess]:
    """The bypass corpus's guard (policy ``bypass``) in this module's lab: it must pass an
    allowed request first (so refusals are about the spelling) and still be alive after."""
    p = lab.proxy("bypass")
    assert lab.allowed_roundtrip(p, "/control-before") == 200, p.log()
    yield p
    assert p.proc is not None and p.proc.poll() is None, "proxy died during the module"


@pytest.fixture(scope="session", autouse=True)
def _raise_fd_limit() -> None:
    """Hundreds of tunnels need two descriptors each here and two in the proxy (which
    inherits this limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


#: the modules whose figures make the committed report; a session that ran only some of
#: them (``-k``, one file) writes its report next to it instead of over it
ALL_MODULES = {
    "test_bypass",
    "test_bypass_audit_mode",
    "test_faults",
    "test_fuzz",
    "test_load",
}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not STATS.ran:
        return
    complete = STATS.ran >= ALL_MODULES and session.testsfailed == 0
    out = report_dir()
    out.mkdir(parents=True, exist_ok=True)
    target = out / ("adversarial.md" if complete else "adversarial.partial.md")
    write_report(STATS, target)
    STATS.report_path = str(target)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The headline figures in the run's own output (CI logs keep it; the file does not)."""
    if not STATS.ran:
        return
    tr = terminalreporter
    tr.section("adversarial suite")
    if "test_bypass" in STATS.ran:
        tr.write_line(
            f"bypass corpus: {STATS.spellings_tried} spellings tried, "
            f"{len(STATS.spellings_passed)} passed through (must be 0), "
            f"{len(STATS.audit_mismatches)} audit disagreements (must be 0)"
        )
    if "test_bypass_audit_mode" in STATS.ran:
        am = STATS.audit_mode
        tr.write_line(
            f"bypass corpus, audit mode: {am.tried} spellings tried, "
            f"{len(am.passed)} passed through (must be 0), "
            f"{len(am.mismatches)} audit disagreements (must be 0)"
        )
    if STATS.report_path:
        tr.write_line(f"report: {STATS.report_path}")
