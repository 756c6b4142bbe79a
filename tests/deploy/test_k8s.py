"""docker/k8s: the Deployment's hardening and probes, ports that agree across objects,
the policy ConfigMap, and the NetworkPolicy that leaves agents no way out but the guard."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from deploy.manifests import (
    K8S,
    ROOT,
    Dockerfile,
    flag_value,
    hostport,
    k8s_objects,
    k8s_one,
    url_hostport,
    yaml_docs,
)
from support.prereq import missing

from egress_guard.cli.parser import build_parser
from egress_guard.policy import load_policy_text

NS = "egress-guard"
AGENT_NS = "opencode"
#: the sidecar variant's namespace, and its init container that loads the pod's redirect
#: rules: the one container that needs more than Pod Security "restricted" (NET_ADMIN)
SIDECAR_NAMESPACE = "docker/k8s/sidecar/namespace.yaml"
SIDECAR_REDIRECT_INIT = ("docker/k8s/sidecar/deployment.yaml", "egress-redirect")


def deployment() -> dict[str, Any]:
    return k8s_one("Deployment", "egress-guard")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = deployment()["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    (c,) = pod_spec()["containers"]
    return dict(c)


def container_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container()["ports"]}


def resolve_port(port: int | str) -> int:
    return container_ports()[port] if isinstance(port, str) else port


def test_every_manifest_is_a_known_object() -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in k8s_objects()}
    for needed in [
        ("Deployment", "egress-guard"),
        ("Service", "egress-guard"),
        ("ConfigMap", "egress-guard-policy"),
        ("NetworkPolicy", "egress-only-via-egress-guard"),
        ("ServiceMonitor", "egress-guard"),
    ]:
        assert needed in kinds


def test_kustomization_lists_existing_files() -> None:
    for kfile in K8S.rglob("kustomization.yaml"):
        k = yaml_docs(kfile)[0]
        for res in k["resources"]:
            assert (kfile.parent / res).is_file(), f"{kfile}: {res}"
    listed = {r for r in yaml_docs(K8S / "kustomization.yaml")[0]["resources"]}
    assert {"deployment.yaml", "service.yaml", "configmap.yaml", "networkpolicy.yaml"} <= listed


def test_kustomize_builds_offline() -> None:
    if shutil.which("kubectl") is None:
        missing("kubectl is not installed")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    images = [
        c["image"]
        for o in objs
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
    ]
    assert images and all(":" in i for i in images), "the image is pinned to a tag"


def test_two_replicas_hardened() -> None:
    dep = deployment()
    assert dep["spec"]["replicas"] == 2
    pod = pod_spec()
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container()["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    res = container()["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"]
    uid = int(Dockerfile.load().last("USER").args.split(":")[0])
    assert psc["runAsUser"] == uid, "same uid as the image"


def test_args_are_accepted_by_run(run_help_flags: set[str]) -> None:
    args = container()["args"]
    assert container().get("command") is None, "the image's ENTRYPOINT (egress-guard run)"
    flags = {a.split("=")[0] for a in args if a.startswith("--")}
    assert flags <= run_help_flags, f"unknown to egress-guard run: {flags - run_help_flags}"
    try:
        parsed = build_parser().parse_args(["run", *args])
    except SystemExit as e:
        raise AssertionError(f"egress-guard run rejects {args}") from e
    assert parsed.audit_log == "-", "audit to stdout: the cluster's log pipeline"
    assert parsed.listen[0] == "0.0.0.0" and parsed.metrics[0] == "0.0.0.0"
    grace = k8s_one("Deployment", "egress-guard")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    # the guard must close what is still open (and record it) before the kubelet kills it
    assert parsed.drain_timeout + 2 <= grace, (parsed.drain_timeout, grace)


def test_ports_agree_everywhere() -> None:
    args = container()["args"]
    listen = hostport(flag_value(args, "--listen"))[1]
    metrics = hostport(flag_value(args, "--metrics"))[1]
    ports = container_ports()
    assert ports == {"proxy": listen, "metrics": metrics}
    assert set(ports.values()) == Dockerfile.load().exposed
    c = container()
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert resolve_port(get["port"]) == metrics, probe
    svc = k8s_one("Service", "egress-guard")
    assert (
        svc["spec"]["selector"].items()
        <= deployment()["spec"]["template"]["metadata"]["labels"].items()
    )
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert resolve_port(svc_ports["proxy"]["targetPort"]) == listen
    assert resolve_port(svc_ports["metrics"]["targetPort"]) == metrics
    ann = deployment()["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == metrics and ann["prometheus.io/path"] == "/metrics"
    sm = k8s_one("ServiceMonitor", "egress-guard")
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports and ep.get("path", "/metrics") == "/metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


def test_policy_configmap_mounted_as_directory_and_valid() -> None:
    args = container()["args"]
    policy_path = flag_value(args, "--policy")
    mount = next(m for m in container()["volumeMounts"] if m["name"] == "policy")
    assert mount["mountPath"] == os.path.dirname(policy_path)
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    assert mount["readOnly"] is True
    vol = next(v for v in pod_spec()["volumes"] if v["name"] == "policy")
    cm = k8s_one("ConfigMap", vol["configMap"]["name"])
    assert cm["metadata"]["namespace"] == deployment()["metadata"]["namespace"]
    text = cm["data"][os.path.basename(policy_path)]
    pol = load_policy_text(text, "docker/k8s/configmap.yaml")
    assert pol.mode == "enforce"
    nets = [ipaddress.ip_network(c) for c in pol.clients.allow_cidrs]
    assert any(ipaddress.ip_address("10.244.1.7") in n for n in nets), "pod addresses"
    assert not any(ipaddress.ip_address("8.8.8.8") in n for n in nets), "nothing public"


def test_configmap_policy_is_the_image_policy() -> None:
    """configmap.yaml says it is docker/policy.yaml: the effective policies agree."""
    text = k8s_one("ConfigMap", "egress-guard-policy")["data"]["policy.yaml"]
    in_cluster = load_policy_text(text, "docker/k8s/configmap.yaml")
    image = load_policy_text((ROOT / "docker" / "policy.yaml").read_text(), "docker/policy.yaml")
    assert in_cluster.sha256 == image.sha256


def test_writable_paths_are_volumes() -> None:
    args = container()["args"]
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    assert flag_value(args, "--confdir") in mounts
    assert not mounts[flag_value(args, "--confdir")].get("readOnly", False)


def test_agent_namespace_egress_only_to_guard_and_dns() -> None:
    np = k8s_one("NetworkPolicy", "egress-only-via-egress-guard")
    assert np["metadata"]["namespace"] == AGENT_NS
    spec = np["spec"]
    assert spec["podSelector"] == {}, "every pod of the agent namespace"
    assert spec["policyTypes"] == ["Egress"]
    listen = hostport(flag_value(container()["args"], "--listen"))[1]
    guard_labels = deployment()["spec"]["template"]["metadata"]["labels"]
    seen_guard = seen_dns = False
    for rule in spec["egress"]:
        assert rule.get("to"), "no rule may allow every destination"
        for peer in rule["to"]:
            assert "ipBlock" not in peer, "no address ranges: only the guard and DNS"
            ns = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            pods = peer["podSelector"]["matchLabels"]
            ports = {(p["protocol"], p["port"]) for p in rule["ports"]}
            if ns == NS:
                assert pods.items() <= guard_labels.items()
                assert ports == {("TCP", listen)}
                seen_guard = True
            else:
                assert (ns, pods) == ("kube-system", {"k8s-app": "kube-dns"})
                assert ports == {("UDP", 53), ("TCP", 53)}
                seen_dns = True
    assert seen_guard and seen_dns


def test_guard_ingress_admits_agents_on_proxy_port_only() -> None:
    np = k8s_one("NetworkPolicy", "egress-guard-ingress")
    listen = hostport(flag_value(container()["args"], "--listen"))[1]
    metrics = hostport(flag_value(container()["args"], "--metrics"))[1]
    by_ns = {}
    for rule in np["spec"]["ingress"]:
        for peer in rule["from"]:
            ns = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            by_ns[ns] = {p["port"] for p in rule["ports"]}
    assert by_ns[AGENT_NS] == {listen}
    assert listen not in by_ns.get("monitoring", set()) and metrics in by_ns["monitoring"]


def test_guard_egress_excludes_internal_ranges() -> None:
    np = k8s_one("NetworkPolicy", "egress-guard-egress")
    blocks = [p["ipBlock"] for r in np["spec"]["egress"] for p in r["to"] if "ipBlock" in p]
    for probe in ("10.1.2.3", "172.20.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1"):
        ip = ipaddress.ip_address(probe)
        for b in blocks:
            net = ipaddress.ip_network(b["cidr"])
            if ip.version == net.version and ip in net:
                assert any(ip in ipaddress.ip_network(e) for e in b["except"]), probe


def test_example_agent_uses_the_service() -> None:
    agent = k8s_one("Deployment", "opencode")
    assert agent["metadata"]["namespace"] == AGENT_NS
    svc = k8s_one("Service", "egress-guard")
    proxy_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "proxy")
    (c,) = agent["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    expected = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    for var in ("HTTPS_PROXY", "HTTP_PROXY"):
        assert url_hostport(str(env[var])) == (expected, proxy_port)


def test_no_manifest_outside_docker_dir() -> None:
    assert all(Path(o["__file__"]).parts[0] == "docker" for o in k8s_objects())
    assert (ROOT / "docker" / "k8s").is_dir()


def test_every_pod_meets_pod_security_restricted() -> None:
    """The namespaces enforce Pod Security "restricted": a pod that breaks it is refused
    at admission, so every shipped pod template must meet it."""
    namespaces = {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == "Namespace"}
    for ns in namespaces.values():
        labels = ns["metadata"]["labels"]
        if ns["__file__"] == SIDECAR_NAMESPACE:
            # its init container needs NET_ADMIN: enforced "privileged", warned and
            # audited at "restricted" (test_k8s_sidecar.py pins that one exception)
            assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
            assert labels["pod-security.kubernetes.io/warn"] == "restricted"
            assert labels["pod-security.kubernetes.io/audit"] == "restricted"
            continue
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    workloads = [o for o in k8s_objects() if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    assert len(workloads) >= 2
    for w in workloads:
        assert w["metadata"]["namespace"] in namespaces, w["__file__"]
        pod = w["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        for c in pod["containers"] + pod.get("initContainers", []):
            if (w["__file__"], c["name"]) == SIDECAR_REDIRECT_INIT:
                continue  # the one exception (test_k8s_sidecar.py)
            sc = c.get("securityContext", {})
            where = f"{w['__file__']}: {c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", psc.get("runAsUser", 1)) != 0, where
            seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {}))
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), where
            assert not sc.get("privileged", False), where
        for v in pod.get("volumes", []):
            assert "hostPath" not in v, w["__file__"]
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), w["__file__"]
