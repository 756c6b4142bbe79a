"""The metrics about the process rather than its traffic: which build is running
(``egress_guard_build_info``) and what it costs (``process_*``: RSS, open descriptors,
CPU seconds, start time).

Why beside the traffic series: an operator comparing replicas, or an upgrade, needs the
version where the other series are (a ``group_left`` away), and a guard that leaks
memory or descriptors under a misbehaving agent must show it before it fails closed.
The process series are prometheus-client's own ``ProcessCollector`` (the standard
``process_`` names dashboards already know); they read ``/proc/self``, so on a system
without ``/proc`` they are simply absent. Nothing here imports mitmproxy (the sinks know
nothing about it): its version is read from the installed distribution.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from egress_guard import __version__


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


class BuildInfo(Collector):
    """``egress_guard_build_info{version, python, mitmproxy} 1``: one series, fixed for
    the process's life (three label values, known at start-up: bounded)."""

    def __init__(self) -> None:
        self._labels = {
            "version": __version__,
            "python": platform.python_version(),
            "mitmproxy": _dist_version("mitmproxy"),
        }

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "egress_guard_build_info",
            "The running egress-guard: its version, Python's and mitmproxy's; always 1.",
            labels=list(self._labels),
        )
        info.add_metric(list(self._labels.values()), 1.0)
        return [info]


def register_runtime(registry: CollectorRegistry) -> None:
    """Add the build and process series to ``registry`` (the guard's own, never the
    process-wide default one)."""
    registry.register(BuildInfo())
    ProcessCollector(registry=registry)
