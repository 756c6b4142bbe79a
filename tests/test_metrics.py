"""Metrics sink and its HTTP server: real scrapes over loopback, parsed as Prometheus does."""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.prereq import missing

from egress_guard.engine import Decision
from egress_guard.sinks.events import CloseEvent, DecisionEvent, PolicyEvent
from egress_guard.sinks.metrics import DURATION_BUCKETS, Metrics
from egress_guard.sinks.metrics_http import MetricsServer, start_http_server

CONTRACT = {
    "egress_guard_decisions",
    "egress_guard_bytes",
    "egress_guard_connection_duration_seconds",
    "egress_guard_active_connections",
    "egress_guard_policy_reloads",
    "egress_guard_policy_info",
}
#: beyond DESIGN section 7 (docs/metrics.md): blocks by reason, the build, the process
OPERATIONS = {
    "egress_guard_blocks",
    "egress_guard_build_info",
    "process_cpu_seconds",
    "process_max_fds",
    "process_open_fds",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_virtual_memory_bytes",
}

Key = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Health:
    ok: bool = True

    def __call__(self) -> bool:
        return self.ok


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.set_destinations(["anthropic", "npm"])
    return m


@pytest.fixture
def server(metrics: Metrics, health: Health) -> Iterator[MetricsServer]:
    srv = start_http_server(metrics, "127.0.0.1", 0, health)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # trust_env=False: an HTTP(S)_PROXY in the environment must not see these requests
    with httpx.Client(trust_env=False, timeout=5) as c:
        yield c


def scrape(client: httpx.Client, srv: MetricsServer) -> dict[Key, float]:
    r = client.get(f"{srv.url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return samples(r.text)


def samples(text: str) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def only(values: dict[Key, float], name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in values.items() if n == name}


def L(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def decision(
    action: str, destination: str | None, host: str = "api.anthropic.com"
) -> DecisionEvent:
    d = Decision(
        allowed=action != "block",
        action=action,  # type: ignore[arg-type]
        reason="allowlisted" if action == "allow" else "not_allowlisted",
        destination=destination,
        host=host,
        port=443,
    )
    return DecisionEvent(
        conn_id="c1", client="127.0.0.1", decision=d, mode="enforce", policy_sha256="x"
    )


def closed(
    destination: str | None, up: int, down: int, duration: float, host: str = "h.example"
) -> CloseEvent:
    return CloseEvent(
        conn_id="c1",
        client="127.0.0.1",
        host=host,
        port=443,
        destination=destination,
        decision="allow",
        bytes_up=up,
        bytes_down=down,
        duration_s=duration,
        mode="enforce",
        policy_sha256="x",
    )


def policy_ok(sha: str, version: int = 1) -> PolicyEvent:
    return PolicyEvent(ok=True, source="p.yaml", sha256=sha, version=version, mode="enforce")


def policy_error() -> PolicyEvent:
    return PolicyEvent(
        ok=False, source="p.yaml", sha256=None, version=1, mode=None, error="bad key"
    )


# -- values -------------------------------------------------------------------------------


def test_scraped_values_are_exact(
    metrics: Metrics, server: MetricsServer, client: httpx.Client
) -> None:
    for _ in range(3):
        metrics.decision(decision("allow", "anthropic"))
    metrics.decision(decision("block", None, host="evil.example"))
    metrics.decision(decision("would_block", "npm"))
    metrics.decision(decision("would_block", "npm"))
    metrics.close(closed("anthropic", up=100, down=2000, duration=0.003))
    metrics.close(closed("anthropic", up=50, down=500, duration=42.0))
    metrics.close(closed(None, up=0, down=0, duration=0.0))
    metrics.connection_opened("anthropic")
    metrics.connection_opened("anthropic")
    metrics.connection_opened("npm")
    metrics.connection_closed("npm")
    metrics.policy(policy_ok("abc123", 1))

    values = scrape(client, server)

    assert only(values, "egress_guard_decisions_total") == {
        L(destination="anthropic", decision="allow"): 3,
        L(destination="unlisted", decision="block"): 1,
        L(destination="npm", decision="would_block"): 2,
    }
    assert only(values, "egress_guard_bytes_total") == {
        L(destination="anthropic", direction="up"): 150,
        L(destination="anthropic", direction="down"): 2500,
        L(destination="unlisted", direction="up"): 0,
        L(destination="unlisted", direction="down"): 0,
    }
    assert only(values, "egress_guard_connection_duration_seconds_count") == {
        L(destination="anthropic"): 2,
        L(destination="unlisted"): 1,
    }
    assert only(values, "egress_guard_connection_duration_seconds_sum") == {
        L(destination="anthropic"): pytest.approx(42.003),
        L(destination="unlisted"): 0,
    }
    buckets = only(values, "egress_guard_connection_duration_seconds_bucket")
    anthropic = {
        dict(k)["le"]: v for k, v in buckets.items() if dict(k)["destination"] == "anthropic"
    }
    assert anthropic["0.005"] == 1  # 3 ms
    assert anthropic["30.0"] == 1
    assert anthropic["60.0"] == 2  # 42 s
    assert anthropic["+Inf"] == 2
    assert only(values, "egress_guard_active_connections") == {
        L(destination="anthropic"): 2,
        L(destination="npm"): 0,
    }
    assert only(values, "egress_guard_policy_reloads_total") == {
        L(result="ok"): 1,
        L(result="error"): 0,
    }
    assert only(values, "egress_guard_policy_info") == {L(sha256="abc123", version="1"): 1}


def test_exactly_the_contract_series_and_no_created_samples(
    metrics: Metrics, server: MetricsServer, client: httpx.Client
) -> None:
    metrics.decision(decision("allow", "anthropic"))
    metrics.close(closed("anthropic", 1, 1, 1.0))
    metrics.connection_opened("anthropic")
    metrics.policy(policy_ok("abc"))
    text = client.get(f"{server.url}/metrics").text
    assert {f.name for f in text_string_to_metric_families(text)} == CONTRACT | OPERATIONS
    assert "_created" not in text


def test_created_samples_are_dropped_for_this_registry_only() -> None:
    before = prometheus_client.metrics._use_created
    m = Metrics()
    m.decision(decision("allow", None))
    assert b"_created" not in m.render()
    assert prometheus_client.metrics._use_created == before
    # nothing was registered in the process-wide default registry
    assert (
        prometheus_client.REGISTRY.get_sample_value(
            "egress_guard_decisions_total", {"destination": "unlisted", "decision": "allow"}
        )
        is None
    )


def test_histogram_buckets_span_5ms_to_1h(metrics: Metrics) -> None:
    metrics.close(closed("anthropic", 0, 0, 7200.0))
    values = samples(metrics.render().decode())
    les = [dict(k)["le"] for k in only(values, "egress_guard_connection_duration_seconds_bucket")]
    bounds = sorted(float(le) for le in les)
    assert bounds[0] == 0.005
    assert bounds[-2] == 3600.0
    assert math.isinf(bounds[-1])
    assert tuple(bounds[:-1]) == DURATION_BUCKETS


# -- cardinality --------------------------------------------------------------------------


def test_ten_thousand_unlisted_hosts_make_one_series_per_decision(
    metrics: Metrics, server: MetricsServer, client: httpx.Client
) -> None:
    actions = ("allow", "block", "would_block")
    for i in range(10_000):
        host = f"h{i}.attacker.example"
        metrics.decision(decision(actions[i % 3], None, host=host))
        metrics.close(closed(None, 1, 2, 0.01, host=host))
    r = client.get(f"{server.url}/metrics")
    assert "attacker" not in r.text
    values = samples(r.text)
    assert only(values, "egress_guard_decisions_total") == {
        L(destination="unlisted", decision="allow"): 3334,
        L(destination="unlisted", decision="block"): 3333,
        L(destination="unlisted", decision="would_block"): 3333,
    }
    assert only(values, "egress_guard_bytes_total") == {
        L(destination="unlisted", direction="up"): 10_000,
        L(destination="unlisted", direction="down"): 20_000,
    }
    assert only(values, "egress_guard_connection_duration_seconds_count") == {
        L(destination="unlisted"): 10_000
    }


def test_label_not_in_set_destinations_is_unlisted(metrics: Metrics) -> None:
    metrics.decision(decision("allow", "anthropic"))
    metrics.decision(decision("allow", "api.evil.example"))  # a name the policy lacks
    metrics.close(closed("not-a-rule", 5, 6, 1.0))
    metrics.connection_opened("not-a-rule")

    metrics.set_destinations(["evil"])  # reload: anthropic is gone, evil is new
    metrics.decision(decision("block", "evil"))
    metrics.decision(decision("block", "anthropic"))

    values = samples(metrics.render().decode())
    assert only(values, "egress_guard_decisions_total") == {
        L(destination="anthropic", decision="allow"): 1,
        L(destination="unlisted", decision="allow"): 1,
        L(destination="evil", decision="block"): 1,
        L(destination="unlisted", decision="block"): 1,
    }
    assert only(values, "egress_guard_bytes_total") == {
        L(destination="unlisted", direction="up"): 5,
        L(destination="unlisted", direction="down"): 6,
    }
    assert only(values, "egress_guard_active_connections") == {L(destination="unlisted"): 1}


def test_everything_is_unlisted_before_set_destinations() -> None:
    m = Metrics()
    m.decision(decision("allow", "anthropic"))
    values = samples(m.render().decode())
    assert only(values, "egress_guard_decisions_total") == {
        L(destination="unlisted", decision="allow"): 1
    }
    m2 = Metrics(destinations=["anthropic"])
    m2.decision(decision("allow", "anthropic"))
    values = samples(m2.render().decode())
    assert only(values, "egress_guard_decisions_total") == {
        L(destination="anthropic", decision="allow"): 1
    }


# -- active connections -------------------------------------------------------------------


def test_active_connections_never_go_negative(metrics: Metrics) -> None:
    metrics.connection_opened("anthropic")
    metrics.connection_closed("anthropic")
    metrics.connection_closed("anthropic")  # unmatched close
    metrics.connection_closed(None)  # unmatched close
    values = samples(metrics.render().decode())
    assert only(values, "egress_guard_active_connections") == {L(destination="anthropic"): 0}


def test_connection_closed_after_reload_uses_the_label_it_opened_with(metrics: Metrics) -> None:
    metrics.connection_opened("anthropic")
    metrics.connection_opened(None)
    metrics.set_destinations([])  # anthropic removed from the policy while open
    metrics.connection_closed("anthropic")
    values = samples(metrics.render().decode())
    assert only(values, "egress_guard_active_connections") == {
        L(destination="anthropic"): 0,
        L(destination="unlisted"): 1,
    }


def test_bad_measurements_do_not_raise(metrics: Metrics) -> None:
    metrics.close(closed("anthropic", -5, -1, float("nan")))
    metrics.close(closed("anthropic", 3, 4, -2.0))
    metrics.close(closed("anthropic", 0, 0, float("inf")))
    values = samples(metrics.render().decode())
    assert only(values, "egress_guard_bytes_total") == {
        L(destination="anthropic", direction="up"): 3,
        L(destination="anthropic", direction="down"): 4,
    }
    assert only(values, "egress_guard_connection_duration_seconds_sum") == {
        L(destination="anthropic"): 0
    }
    assert metrics.healthy is True


# -- policy -------------------------------------------------------------------------------


def test_policy_info_has_one_sample_after_two_reloads(
    metrics: Metrics, server: MetricsServer, client: httpx.Client
) -> None:
    metrics.policy(policy_ok("aaa", 1))
    metrics.policy(policy_ok("bbb", 1))
    values = scrape(client, server)
    assert only(values, "egress_guard_policy_info") == {L(sha256="bbb", version="1"): 1}
    assert only(values, "egress_guard_policy_reloads_total") == {
        L(result="ok"): 2,
        L(result="error"): 0,
    }

    metrics.policy(policy_error())  # rejected: the old policy stays in force
    values = scrape(client, server)
    assert only(values, "egress_guard_policy_info") == {L(sha256="bbb", version="1"): 1}
    assert only(values, "egress_guard_policy_reloads_total") == {
        L(result="ok"): 2,
        L(result="error"): 1,
    }


def test_scrape_during_reloads_always_sees_one_policy(metrics: Metrics) -> None:
    stop = threading.Event()

    def reload_forever() -> None:
        i = 0
        while not stop.is_set():
            metrics.policy(policy_ok(f"sha{i % 2}"))
            i += 1

    t = threading.Thread(target=reload_forever, daemon=True)
    t.start()
    try:
        for _ in range(300):
            values = samples(metrics.render().decode())
            assert len(only(values, "egress_guard_policy_info")) == 1
    finally:
        stop.set()
        t.join(5)


# -- HTTP ---------------------------------------------------------------------------------


def test_healthz_follows_the_health_callable(
    health: Health, server: MetricsServer, client: httpx.Client
) -> None:
    r = client.get(f"{server.url}/healthz")
    assert (r.status_code, r.text) == (200, "ok\n")
    health.ok = False
    assert client.get(f"{server.url}/healthz").status_code == 503
    health.ok = True
    assert client.get(f"{server.url}/healthz").status_code == 200


def test_healthz_is_503_when_the_callable_raises(metrics: Metrics, client: httpx.Client) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    srv = start_http_server(metrics, "127.0.0.1", 0, broken)
    try:
        assert client.get(f"{srv.url}/healthz").status_code == 503
    finally:
        srv.stop()


@pytest.mark.parametrize("path", ["/", "/metricsx", "/metrics/", "/healthz/x", "/favicon.ico"])
def test_unknown_path_is_404(server: MetricsServer, client: httpx.Client, path: str) -> None:
    r = client.get(f"{server.url}{path}")
    assert r.status_code == 404
    assert "egress_guard" not in r.text


def test_metrics_ignores_query_string_and_supports_head(
    server: MetricsServer, client: httpx.Client
) -> None:
    assert client.get(f"{server.url}/metrics?name[]=x").status_code == 200
    r = client.head(f"{server.url}/metrics")
    assert r.status_code == 200
    assert r.content == b""
    assert int(r.headers["content-length"]) > 0


def test_port_zero_binds_where_told_in_a_daemon_thread_and_stop_closes(
    metrics: Metrics, client: httpx.Client
) -> None:
    srv = start_http_server(metrics, "127.0.0.1", 0, lambda: True)
    assert srv.port != 0
    assert srv.host == "127.0.0.1"
    threads = [t for t in threading.enumerate() if t.name == f"egress-guard-metrics-{srv.port}"]
    assert len(threads) == 1 and threads[0].daemon
    assert client.get(f"{srv.url}/healthz").status_code == 200
    srv.stop()
    with pytest.raises(httpx.ConnectError):
        client.get(f"{srv.url}/healthz")
    srv.stop()  # idempotent


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_ipv6_host_literal(metrics: Metrics, client: httpx.Client, host: str) -> None:
    if not _ipv6_loopback():
        missing("no IPv6 loopback")
    srv = start_http_server(metrics, host, 0, lambda: True)
    try:
        assert srv.host == "::1"
        assert srv.url == f"http://[::1]:{srv.port}"
        assert client.get(f"{srv.url}/metrics").status_code == 200
        # bound to ::1 only: not reachable over IPv4
        with pytest.raises(httpx.ConnectError):
            client.get(f"http://127.0.0.1:{srv.port}/metrics")
    finally:
        srv.stop()


def test_audit_health_is_exported(tmp_path: Path) -> None:
    """A real audit log on /dev/full (ENOSPC on every write) shows up in the metrics."""
    from egress_guard.sinks.audit import AuditLog

    good = AuditLog(str(tmp_path / "audit.log"), fsync="never")
    bad = AuditLog("/dev/full", fsync="never", retry_interval=0.05)
    try:
        for log, healthy in ((good, 1.0), (bad, 0.0)):
            m = Metrics()
            m.track_audit(log)
            samples = {
                s.name: s.value
                for fam in text_string_to_metric_families(m.render().decode())
                for s in fam.samples
            }
            assert samples["egress_guard_audit_healthy"] == healthy
            errors = samples["egress_guard_audit_write_errors_total"]
            assert (errors > 0) if healthy == 0.0 else (errors == 0)
            assert samples["egress_guard_audit_events_dropped_total"] == 0
    finally:
        good.shutdown(timeout=2)
        bad.shutdown(timeout=0.5)
