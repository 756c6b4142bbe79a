"""docker/compose.yaml, its Prometheus and Grafana files, and the offline profile: the
network layout that leaves OpenCode no way out but the guard, and cross references."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path
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
    interpolate,
    service_env,
    url_hostport,
    yaml_docs,
)
from support.proxy import EGRESS_GUARD

from egress_guard.cli.parser import build_parser
from egress_guard.policy import load_policy

OFFLINE_ENV = env_file(DOCKER / "offline.env")


def all_config_files() -> list[Path]:
    return sorted(
        p for p in DOCKER.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml", ".json"}
    )


@pytest.mark.parametrize("path", all_config_files(), ids=lambda p: str(p.relative_to(DOCKER)))
def test_every_yaml_and_json_file_parses(path: Path) -> None:
    if path.suffix == ".json":
        assert json.loads(path.read_text())
    else:
        docs = yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


def guard_service(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    found = [
        (name, s)
        for name, s in doc["services"].items()
        if s.get("build", {}).get("dockerfile") == "docker/Dockerfile"
    ]
    assert len(found) == 1, "one service builds docker/Dockerfile"
    return found[0]


def internal_networks(doc: dict[str, Any]) -> set[str]:
    return {n for n, spec in doc["networks"].items() if (spec or {}).get("internal") is True}


def test_agent_network_is_internal_and_guard_bridges_it() -> None:
    doc = compose()
    internal = internal_networks(doc)
    name, guard = guard_service(doc)
    opencode = doc["services"]["opencode"]
    agent_nets = set(opencode["networks"])
    assert agent_nets and agent_nets <= internal, "opencode must have no route out"
    assert agent_nets <= set(guard["networks"]), f"{name} must share opencode's network"
    assert set(guard["networks"]) - internal, f"{name} needs a network with a route out"
    for other, svc in doc["services"].items():
        if other == name:
            continue
        # no other service joins both the agent network and one with a route out
        nets = set(svc.get("networks", ["default"]))
        assert not (nets & agent_nets and nets - internal), other


def test_opencode_proxy_environment_points_at_guard() -> None:
    doc = compose()
    name, _guard = guard_service(doc)
    listen_port = hostport(flag_value(Dockerfile.load().cmd, "--listen"))[1]
    env = service_env(doc["services"]["opencode"])
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        assert url_hostport(env[var]) == (name, listen_port), var
    for var in ("NO_PROXY", "no_proxy"):
        entries = {e.strip() for e in env[var].split(",")}
        assert entries <= {"localhost", "127.0.0.1", "::1"}, f"{var} lets traffic bypass"
    assert doc["services"]["opencode"]["depends_on"][name]["condition"] == "service_healthy"


def test_guard_container_hardening_and_policy_mount() -> None:
    doc = compose()
    _name, guard = guard_service(doc)
    assert guard["read_only"] is True
    assert guard["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in guard["security_opt"]
    assert "entrypoint" not in guard, "the image's entrypoint"
    # the image's command line, but --metrics (test_compose_isolation.py checks where)
    image_cmd = Dockerfile.load().cmd
    metrics_at = image_cmd.index("--metrics") + 1
    assert guard["command"][:metrics_at] == image_cmd[:metrics_at]
    assert guard["command"][metrics_at + 1 :] == image_cmd[metrics_at + 1 :]
    policy_target = flag_value(Dockerfile.load().cmd, "--policy")
    mounts = {target: (src, ro) for src, target, ro in bind_mounts(guard)}
    assert policy_target in mounts, "the policy is mounted where --policy reads it"
    assert mounts[policy_target][1], "read-only"
    confdir = flag_value(Dockerfile.load().cmd, "--confdir")
    named = [v for v in guard["volumes"] if isinstance(v, str) and v.endswith(":" + confdir)]
    assert named, "the confdir is a volume (read-only root)"
    # the guard must close what is still open (and record it) before Compose kills it
    drain = build_parser().parse_args(["run", *Dockerfile.load().cmd]).drain_timeout
    grace = _seconds(guard.get("stop_grace_period", "10s"))  # Compose's default is 10 s
    assert drain + 2 <= grace, (drain, grace)


def _seconds(duration: str) -> float:
    """A Compose duration as stop_grace_period takes it: ``10s``, ``1m30s``."""
    units = {"h": 3600, "m": 60, "s": 1}
    total, number = 0.0, ""
    for c in duration:
        if c.isdigit() or c == ".":
            number += c
        else:
            total += float(number) * units[c]
            number = ""
    assert not number, f"duration without a unit: {duration!r}"
    return total


@pytest.mark.parametrize("env", [{}, OFFLINE_ENV], ids=["default", "offline"])
def test_bind_mount_sources_exist(env: dict[str, str]) -> None:
    doc = compose(env)
    for name, svc in doc["services"].items():
        for src, target, _ro in bind_mounts(svc):
            path = (DOCKER / src).resolve()
            assert path.exists(), f"{name}: {src} -> {target} does not exist"


@pytest.mark.parametrize("env", [{}, OFFLINE_ENV], ids=["default", "offline"])
def test_mounted_policy_validates(env: dict[str, str]) -> None:
    doc = compose(env)
    _name, guard = guard_service(doc)
    target = flag_value(Dockerfile.load().cmd, "--policy")
    src = next(s for s, t, _ in bind_mounts(guard) if t == target)
    load_policy(DOCKER / src)


def test_exposed_ports_match_image() -> None:
    doc = compose()
    _name, guard = guard_service(doc)
    assert {int(p) for p in guard["expose"]} == Dockerfile.load().exposed


def test_prometheus_scrapes_guard_metrics_port() -> None:
    doc = compose()
    name, guard = guard_service(doc)
    metrics_port = hostport(flag_value(Dockerfile.load().cmd, "--metrics"))[1]
    prom = doc["services"]["prometheus"]
    assert set(prom["networks"]) & set(guard["networks"]), "prometheus reaches the guard"
    mounts = {t: s for s, t, _ in bind_mounts(prom)}
    config_path = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file"))
    config = yaml_docs(DOCKER / mounts[config_path])[0]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for sc in jobs["egress-guard"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"{name}:{metrics_port}"]
    assert jobs["egress-guard"].get("metrics_path", "/metrics") == "/metrics"
    for rule_file in config["rule_files"]:
        assert rule_file in mounts, f"{rule_file} is not mounted into prometheus"


def test_grafana_provisioning_points_at_mounted_dashboards() -> None:
    doc = compose()
    graf = doc["services"]["grafana"]
    mounts = {t: s for s, t, _ in bind_mounts(graf)}
    prov = DOCKER / mounts["/etc/grafana/provisioning"]
    providers = yaml_docs(prov / "dashboards" / "egress-guard.yaml")[0]["providers"]
    for p in providers:
        path = p["options"]["path"]
        assert path in mounts, f"dashboard provider path {path} is not mounted"
        dashboards = list((DOCKER / mounts[path]).glob("*.json"))
        assert dashboards, "no dashboards provisioned"
    sources = yaml_docs(prov / "datasources" / "prometheus.yaml")[0]["datasources"]
    host, port = url_hostport(sources[0]["url"])
    assert host in doc["services"] and port == 9090
    home = service_env(graf)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert any(
        home.startswith(t + "/") and (DOCKER / s / Path(home).name).exists()
        for t, s in mounts.items()
    )


def test_offline_profile_ollama_only_through_guard() -> None:
    assert "offline" in OFFLINE_ENV["COMPOSE_PROFILES"].split(",")
    doc = compose(OFFLINE_ENV)
    internal = internal_networks(doc)
    _name, guard = guard_service(doc)
    ollama = doc["services"]["ollama"]
    assert ollama["profiles"] == ["offline"]
    nets = set(ollama["networks"])
    assert nets <= internal, "ollama cannot reach (or be reached from) outside"
    assert nets <= set(guard["networks"])
    assert not nets & set(doc["services"]["opencode"]["networks"]), "only via the guard"
    (net,) = nets
    address = ipaddress.ip_address(ollama["networks"][net]["ipv4_address"])
    subnet = ipaddress.ip_network(doc["networks"][net]["ipam"]["config"][0]["subnet"])
    assert address in subnet

    pol = load_policy(DOCKER / OFFLINE_ENV["EGRESS_GUARD_POLICY"])
    assert pol.network.resolve["ollama"] == str(address)
    assert any(address in ipaddress.ip_network(c) for c in pol.network.allow_cidrs)
    cfg = json.loads((DOCKER / OFFLINE_ENV["OPENCODE_CONFIG_FILE"]).read_text())
    base = cfg["provider"]["ollama"]["options"]["baseURL"]
    assert url_hostport(base)[0] == "ollama"


def test_offline_policy_decisions_with_real_cli() -> None:
    """`egress-guard check` with the offline policy: the compose ollama is allowed, the
    internet is not."""
    pol = DOCKER / OFFLINE_ENV["EGRESS_GUARD_POLICY"]
    cfg = json.loads((DOCKER / OFFLINE_ENV["OPENCODE_CONFIG_FILE"]).read_text())
    base = cfg["provider"]["ollama"]["options"]["baseURL"]
    ok = subprocess.run(
        [EGRESS_GUARD, "check", "--policy", str(pol), base],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    blocked = subprocess.run(
        [EGRESS_GUARD, "check", "--policy", str(pol), "api.anthropic.com", "registry.npmjs.org"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert blocked.returncode == 1, blocked.stdout + blocked.stderr


def test_interpolation_helper() -> None:
    doc = {"a": "${X:-d}", "b": "${Y}", "c": ["$$HOME", "${X-e}"]}
    assert interpolate(doc, {}) == {"a": "d", "b": "", "c": ["$HOME", "e"]}
    assert interpolate(doc, {"X": "", "Y": "y"}) == {"a": "d", "b": "y", "c": ["$HOME", ""]}


@pytest.mark.parametrize("env", [{}, OFFLINE_ENV], ids=["default", "offline"])
def test_doctor_finds_no_errors_in_compose_setup(env: dict[str, str], tmp_path: Path) -> None:
    """`egress-guard doctor` on what the opencode container sees: its environment, its
    mounted opencode.json, and the policy the guard container enforces."""
    doc = compose(env)
    name, guard = guard_service(doc)
    opencode = doc["services"]["opencode"]
    oc_env = service_env(opencode)
    config_target = oc_env["OPENCODE_CONFIG"]
    config_src = next(s for s, t, _ in bind_mounts(opencode) if t == config_target)
    policy_src = next(
        s for s, t, _ in bind_mounts(guard) if t == flag_value(Dockerfile.load().cmd, "--policy")
    )
    r = subprocess.run(
        [
            EGRESS_GUARD,
            "doctor",
            str(DOCKER / config_src),
            "--policy",
            str(DOCKER / policy_src),
            "--proxy-url",
            oc_env["HTTPS_PROXY"],
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **oc_env},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    findings = json.loads(r.stdout)
    assert not [f for f in findings if f["severity"] == "error"], findings
    assert url_hostport(oc_env["HTTPS_PROXY"])[0] == name
