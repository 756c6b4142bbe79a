"""docker/k8s: the NodeLocal DNSCache variant of the DNS rule, the ServiceMonitor label
kube-prometheus-stack selects by default, and the OpenCode example's proxy variables and
configuration.

Threat and failure: with NodeLocal DNSCache the shipped DNS rule matches nothing and
every lookup is dropped (operators then widen the policy by hand, usually too far); a
ServiceMonitor nobody selects leaves the guard unmonitored without an error; an agent
that reads only ``https_proxy`` (lower case, as curl does) goes direct, and only the
NetworkPolicy stops it.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from deploy.manifests import DOCKER, K8S, k8s_one, url_hostport, yaml_docs

AGENT_NS = "opencode"
NODELOCAL = ipaddress.ip_network("169.254.20.10/32")


def _nodelocal() -> list[dict[str, Any]]:
    return yaml_docs(K8S / "networkpolicy-nodelocaldns.yaml")


def test_nodelocal_dns_variant_opens_port_53_to_the_cache_only() -> None:
    docs = _nodelocal()
    assert {(d["kind"], d["metadata"]["namespace"]) for d in docs} == {
        ("NetworkPolicy", AGENT_NS),
        ("NetworkPolicy", "egress-guard"),
    }
    for d in docs:
        spec = d["spec"]
        assert spec["policyTypes"] == ["Egress"]
        (rule,) = spec["egress"]
        (peer,) = rule["to"]
        assert set(peer) == {"ipBlock"} and "except" not in peer["ipBlock"]
        assert ipaddress.ip_network(peer["ipBlock"]["cidr"]) == NODELOCAL
        assert sorted((p["protocol"], p["port"]) for p in rule["ports"]) == [
            ("TCP", 53),
            ("UDP", 53),
        ]
    guard = next(d for d in docs if d["metadata"]["namespace"] == "egress-guard")
    assert guard["spec"]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "egress-guard"}
    }


def test_nodelocal_variant_is_offered_not_applied_by_default() -> None:
    text = (K8S / "kustomization.yaml").read_text()
    (kust,) = yaml_docs(K8S / "kustomization.yaml")
    assert "networkpolicy-nodelocaldns.yaml" not in kust["resources"]
    assert "# - networkpolicy-nodelocaldns.yaml" in text


def test_servicemonitor_has_the_label_kube_prometheus_stack_selects() -> None:
    (sm,) = yaml_docs(K8S / "monitoring" / "servicemonitor.yaml")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_opencode_example_sets_both_cases_and_ships_its_config() -> None:
    agent = k8s_one("Deployment", "opencode")
    (c,) = agent["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
        assert env[var] and env[var.lower()] == env[var], var
    url_hostport(str(env["https_proxy"]))
    cm = k8s_one("ConfigMap", "opencode-config")
    assert cm["metadata"]["namespace"] == AGENT_NS
    shipped = json.loads((DOCKER / "opencode" / "opencode.json").read_text())
    assert json.loads(cm["data"]["opencode.json"]) == shipped
    # mounted where OPENCODE_CONFIG points
    volumes = {v["name"]: v for v in agent["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    directory, _, filename = str(env["OPENCODE_CONFIG"]).rpartition("/")
    assert filename == "opencode.json"
    mount = mounts[directory]
    assert mount.get("readOnly") is True
    assert volumes[mount["name"]]["configMap"]["name"] == "opencode-config"


def test_offline_install_guide_is_linked_and_names_what_the_repo_ships() -> None:
    root = DOCKER.parent
    guide = (root / "docs" / "offline-install.md").read_text()
    for page in ("README.md", "docs/air-gapped.md", "docs/operators-guide.md"):
        assert "offline-install.md" in (root / page).read_text(), page
    assert "--no-index --find-links wheelhouse egress-guard" in guide
    assert "docker save" in guide and "docker load" in guide
    # the image tag and the images it saves are the ones the repository builds and uses
    compose_text = (DOCKER / "compose.yaml").read_text()
    for image in ("prom/prometheus:v3.5.0", "grafana/grafana:12.1.0"):
        assert image in compose_text and image in guide, image
    (kust,) = yaml_docs(K8S / "kustomization.yaml")
    tag = kust["images"][0]["newTag"]
    assert f"egress-guard:{tag}" in guide
