"""docker/compose.yaml: the metrics listener is out of the agent's reach, the proxy admits
the agent network only, and the file says it needs Compose v2.

Threat: the metrics port and status page show destinations, hosts and client addresses
(what the audit log shows): an agent that can read them learns the policy and what other
agents do. A proxy that admits any private address lets every other container attached
to the guard (Prometheus, Grafana, the model server) use it as a way out.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from deploy.manifests import (
    DOCKER,
    Dockerfile,
    bind_mounts,
    compose,
    env_file,
    flag_value,
    hostport,
    url_hostport,
)

from egress_guard.policy import load_policy

OFFLINE_ENV = env_file(DOCKER / "offline.env")


def _guard(doc: dict[str, Any]) -> dict[str, Any]:
    (guard,) = [
        s
        for s in doc["services"].values()
        if s.get("build", {}).get("dockerfile") == "docker/Dockerfile"
    ]
    return guard


def _subnet(doc: dict[str, Any], network: str) -> ipaddress.IPv4Network:
    (cfg,) = doc["networks"][network]["ipam"]["config"]
    return ipaddress.IPv4Network(cfg["subnet"])


def test_metrics_listen_on_the_monitoring_network_only() -> None:
    doc = compose()
    guard = _guard(doc)
    host, port = hostport(flag_value(guard["command"], "--metrics"))
    address = ipaddress.ip_address(host)
    assert not address.is_unspecified, "--metrics 0.0.0.0 is reachable from every network"
    assert guard["networks"]["monitoring"]["ipv4_address"] == host
    assert address in _subnet(doc, "monitoring")
    assert address not in _subnet(doc, "agent")
    # the image's health check follows the listener
    env = guard["environment"]
    assert url_hostport(env["EGRESS_GUARD_HEALTH_URL"]) == (host, port)
    assert "EGRESS_GUARD_HEALTH_URL" in Dockerfile.load().env
    # nothing on the agent network is on the monitoring network
    agents = [n for n, s in doc["services"].items() if "agent" in s.get("networks", {})]
    for name in agents:
        if doc["services"][name] is not guard:
            assert "monitoring" not in doc["services"][name]["networks"], name
    assert "9090" not in str(guard.get("ports", "")), "not published on the host"


@pytest.mark.parametrize("env", [{}, OFFLINE_ENV], ids=["default", "offline"])
def test_mounted_policy_admits_the_agent_network_only(env: dict[str, str]) -> None:
    doc = compose(env)
    guard = _guard(doc)
    target = flag_value(guard["command"], "--policy")
    src = next(s for s, t, _ in bind_mounts(guard) if t == target)
    policy = load_policy(DOCKER / src)
    admitted = [ipaddress.ip_network(c) for c in policy.clients.allow_cidrs]
    assert admitted == [_subnet(doc, "agent")]
    # and no other network the guard is on overlaps it
    for other in ("models", "monitoring"):
        assert not _subnet(doc, other).overlaps(admitted[0]), other


def test_compose_file_says_it_needs_compose_v2() -> None:
    text = (DOCKER / "compose.yaml").read_text()
    assert "name" in compose() and "Compose v2" in text.split("\nname:")[0]
