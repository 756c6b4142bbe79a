"""The dashboard and the alert rules query exactly the series a running egress-guard
exports: scraped from a real instance, not read from the source."""

from __future__ import annotations

import json
import typing

import pytest
from deploy.manifests import (
    DOCKER,
    dashboard_exprs,
    grouping_labels,
    metric_names,
    selectors,
    yaml_docs,
)
from deploy.running import RunningGuard, exported_series

from egress_guard import __version__
from egress_guard.engine.decide import Action
from egress_guard.engine.types import Reason

#: series Prometheus itself adds for every scrape target
PROMETHEUS_SERIES = {"up": {"job", "instance"}}
#: labels Prometheus attaches to every scraped series
TARGET_LABELS = {"job", "instance"}


def dashboards() -> dict[str, list[str]]:
    return {
        p.name: dashboard_exprs(json.loads(p.read_text()))
        for p in sorted((DOCKER / "grafana" / "dashboards").glob("*.json"))
    }


def alert_exprs() -> list[str]:
    doc = yaml_docs(DOCKER / "prometheus" / "alerts.yml")[0]
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def all_exprs() -> list[tuple[str, str]]:
    out = [(name, e) for name, exprs in dashboards().items() for e in exprs]
    out += [("alerts.yml", e) for e in alert_exprs()]
    return out


def check_expr(expr: str, series: dict[str, set[str]]) -> list[str]:
    """Problems with one expression: unknown series, unknown labels, unknown values."""
    problems = []
    known = {**series, **PROMETHEUS_SERIES}
    names = metric_names(expr)
    if not names:
        problems.append(f"no series in {expr!r}")
    labels: set[str] = set(TARGET_LABELS)
    for name in names:
        if name not in known:
            problems.append(f"{name} is not exported")
        else:
            labels |= known[name]
    for name, matchers in selectors(expr):
        for label, _op, value in matchers:
            if label not in known.get(name, set()) | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
            if label == "decision" and value not in typing.get_args(Action):
                problems.append(f"decision={value!r} is never exported")
            if label == "reason" and value not in (*typing.get_args(Reason), "other"):
                problems.append(f"reason={value!r} is never exported")
    for label in grouping_labels(expr):
        if label not in labels:
            problems.append(f"grouping by {label!r}, which {sorted(names)} do not carry")
    return problems


def test_running_guard_exports_the_design_series(running_guard: RunningGuard) -> None:
    series = exported_series(running_guard.families)
    for name in [
        "egress_guard_decisions_total",
        "egress_guard_bytes_total",
        "egress_guard_connection_duration_seconds_bucket",
        "egress_guard_active_connections",
        "egress_guard_policy_reloads_total",
        "egress_guard_policy_info",
    ]:
        assert name in series, name
    assert series["egress_guard_decisions_total"] == {"destination", "decision"}


def _samples(guard: RunningGuard, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in guard.families for s in f.samples if s.name == name]


def test_blocks_carry_the_reason(running_guard: RunningGuard) -> None:
    """The fixture's unlisted CONNECT is counted under its reason code, and under the
    ``unlisted`` destination (never the host the client asked for)."""
    series = exported_series(running_guard.families)
    assert series["egress_guard_blocks_total"] == {"destination", "decision", "reason"}
    blocks = _samples(running_guard, "egress_guard_blocks_total")
    assert (
        {"destination": "unlisted", "decision": "block", "reason": "not_allowlisted"},
        1.0,
    ) in blocks
    assert "unlisted.invalid" not in running_guard.metrics_text


def test_build_info_and_process_metrics(running_guard: RunningGuard) -> None:
    info = _samples(running_guard, "egress_guard_build_info")
    assert len(info) == 1 and info[0][1] == 1.0
    assert info[0][0]["version"] == __version__
    assert info[0][0]["python"].count(".") == 2 and info[0][0]["mitmproxy"][0].isdigit()
    (rss,) = _samples(running_guard, "process_resident_memory_bytes")
    assert rss[1] > 10 * 1024 * 1024  # a Python process with mitmproxy loaded
    (fds,) = _samples(running_guard, "process_open_fds")
    assert fds[1] >= 3
    (cpu,) = _samples(running_guard, "process_cpu_seconds_total")
    assert cpu[1] > 0


def test_alerts_cover_audit_health_and_reload_failure() -> None:
    exprs = alert_exprs()
    assert "egress_guard_audit_healthy == 0" in exprs
    assert any('egress_guard_policy_reloads_total{result="error"}' in e for e in exprs)


def test_dashboard_shows_audit_health_blocks_by_reason_and_instances() -> None:
    exprs = [e for v in dashboards().values() for e in v]
    assert any("egress_guard_audit_healthy" in e and "instance" in e for e in exprs)
    assert any("egress_guard_blocks_total" in e and "reason" in e for e in exprs)
    per_instance = [e for e in exprs if "instance" in e]
    assert any("process_resident_memory_bytes" in e for e in per_instance)


def test_dashboard_and_alerts_have_expressions() -> None:
    assert sum(len(v) for v in dashboards().values()) >= 5
    assert len(alert_exprs()) >= 3


@pytest.mark.parametrize(
    "source,expr", all_exprs(), ids=[f"{s}:{i}" for i, (s, _) in enumerate(all_exprs())]
)
def test_expression_uses_exported_series(
    running_guard: RunningGuard, source: str, expr: str
) -> None:
    problems = check_expr(expr, exported_series(running_guard.families))
    assert not problems, f"{source}: {expr}\n" + "\n".join(problems)


def test_checker_catches_mistakes(running_guard: RunningGuard) -> None:
    """The check above can fail: a renamed series, label or value is reported."""
    series = exported_series(running_guard.families)
    assert check_expr("rate(egress_guard_decision_total[5m])", series)
    assert check_expr('sum(egress_guard_bytes_total{host="x"})', series)
    assert check_expr('sum(egress_guard_decisions_total{decision="denied"})', series)
    assert check_expr("sum by (host) (egress_guard_active_connections)", series)
    assert check_expr('sum(egress_guard_blocks_total{reason="blocked"})', series)
    assert check_expr("process_open_fds * on (instance) group_left (release) up", series)
    assert not check_expr(
        "histogram_quantile(0.9, sum by (le, destination) "
        "(rate(egress_guard_connection_duration_seconds_bucket[5m])))",
        series,
    )
