"""docker/k8s/sidecar: the guard as a sidecar in the agent's pod, the pod's outbound TCP
redirected to it by an init container (like a service mesh's). The manifests are
rendered with kustomize and checked field by field (no cluster here to validate them
against); the init container's nftables rules are loaded for real in a network
namespace the test makes (root), to show what they redirect, let out and drop."""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import re
import secrets
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from deploy.manifests import K8S, ROOT, yaml_docs
from deploy.test_netns import in_netns, ip
from support.prereq import missing

from egress_guard.cli.parser import build_parser
from egress_guard.policy import load_policy_text

SIDECAR = K8S / "sidecar"
SO_ORIGINAL_DST = 80


def objects() -> list[dict[str, Any]]:
    """The variant's objects, as ``kubectl kustomize`` renders them when it is there
    (from the files otherwise: they are plain resources, no patches)."""
    if shutil.which("kubectl") is not None:
        out = subprocess.run(
            ["kubectl", "kustomize", str(SIDECAR)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    k = yaml_docs(SIDECAR / "kustomization.yaml")[0]
    return [d for res in k["resources"] for d in yaml_docs(SIDECAR / res)]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in objects()
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def pod() -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment")["spec"]["template"]["spec"]
    return spec


def init(name: str) -> dict[str, Any]:
    (c,) = [c for c in pod()["initContainers"] if c["name"] == name]
    return dict(c)


def rules_text() -> str:
    text: str = one("ConfigMap", "egress-redirect")["data"]["rules.nft"]
    return text


def redirect_port() -> int:
    (port,) = set(re.findall(r"redirect to :(\d+)", rules_text()))
    return int(port)


def guard_uid_in_rules() -> int:
    (uid,) = set(re.findall(r"meta skuid (\d+)", rules_text()))
    return int(uid)


# -- rendered manifests -----------------------------------------------------------------

#: the fields the manifests may use, per object (a subset of the Kubernetes API's): a
#: misspelt or misplaced key is an error here, as the API server's strict validation
#: would make it
CONTAINER_KEYS = {
    "name", "image", "imagePullPolicy", "command", "args", "env", "ports", "resources",
    "securityContext", "volumeMounts", "startupProbe", "readinessProbe", "livenessProbe",
    "restartPolicy", "stdin", "tty",
}  # fmt: skip
POD_KEYS = {
    "automountServiceAccountToken", "enableServiceLinks", "securityContext",
    "initContainers", "containers", "volumes", "serviceAccountName",
    "terminationGracePeriodSeconds",
}  # fmt: skip
SECURITY_KEYS = {
    "runAsNonRoot", "runAsUser", "runAsGroup", "readOnlyRootFilesystem",
    "allowPrivilegeEscalation", "privileged", "capabilities", "seccompProfile",
}  # fmt: skip


def test_the_variant_renders_into_its_namespace_with_pinned_images() -> None:
    objs = objects()
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert kinds == [
        ("ConfigMap", "egress-guard-sidecar-policy"),
        ("ConfigMap", "egress-redirect"),
        ("Deployment", "opencode-sidecar"),
        ("Namespace", "agents-sidecar"),
    ]
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "agents-sidecar", o["metadata"]
    if shutil.which("kubectl") is None:
        missing("kubectl is not installed (the render pins image tags)")
    images = [c["image"] for c in pod()["initContainers"] + pod()["containers"]]
    assert {i.split(":")[0] for i in images} >= {"egress-guard", "egress-guard-netinit"}
    assert all(":" in i for i in images), images


def test_the_pod_is_well_formed() -> None:
    dep = one("Deployment")
    assert dep["apiVersion"] == "apps/v1"
    assert dep["spec"]["selector"]["matchLabels"].items() <= (
        dep["spec"]["template"]["metadata"]["labels"].items()
    )
    spec = pod()
    assert set(spec) <= POD_KEYS, set(spec) - POD_KEYS
    volumes = {v["name"]: v for v in spec["volumes"]}
    configmaps = {o["metadata"]["name"] for o in objects() if o["kind"] == "ConfigMap"}
    for v in volumes.values():
        if "configMap" in v:
            assert v["configMap"]["name"] in configmaps, v
    for c in spec["initContainers"] + spec["containers"]:
        assert set(c) <= CONTAINER_KEYS, (c["name"], set(c) - CONTAINER_KEYS)
        assert set(c["securityContext"]) <= SECURITY_KEYS, c["name"]
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, (c["name"], m)
        ports = {p["name"] for p in c.get("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c:
                assert c[probe]["httpGet"]["port"] in ports, (c["name"], probe)


def test_rules_load_first_then_the_guard_starts_before_the_agent() -> None:
    spec = pod()
    assert [c["name"] for c in spec["initContainers"]] == ["egress-redirect", "egress-guard"]
    # a native sidecar: started (and probed) before the agent, kept running beside it
    assert init("egress-guard")["restartPolicy"] == "Always"
    assert "startupProbe" in init("egress-guard")
    assert "restartPolicy" not in init("egress-redirect")  # runs once, to completion
    assert [c["name"] for c in spec["containers"]] == ["opencode"]


def test_the_init_container_is_the_one_exception_and_only_loads_the_rules() -> None:
    c = init("egress-redirect")
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert c.get("command") is None and c["args"][0] == "-f"  # the image's ENTRYPOINT: nft
    (mount,) = c["volumeMounts"]
    assert c["args"][1] == f"{mount['mountPath']}/rules.nft" and mount["readOnly"] is True
    volume = next(v for v in pod()["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "egress-redirect"
    dockerfile = (SIDECAR / "netinit.Dockerfile").read_text()
    assert 'ENTRYPOINT ["nft"]' in dockerfile and "nftables" in dockerfile


def test_the_guard_runs_transparent_on_the_redirect_port_as_the_uid_let_out() -> None:
    guard = init("egress-guard")
    args = build_parser().parse_args(["run", *guard["args"]])
    assert args.transparent is True and not args.upstream_proxy
    assert args.listen == ("127.0.0.1", redirect_port())
    uid = guard["securityContext"]["runAsUser"]
    assert uid == guard_uid_in_rules() and uid != 0
    # no other container may run as the guard's UID: its connections are not redirected
    pod_uid = pod()["securityContext"]["runAsUser"]
    for c in pod()["initContainers"] + pod()["containers"]:
        if c["name"] != "egress-guard":
            assert c.get("securityContext", {}).get("runAsUser", pod_uid) != uid, c["name"]
    assert not any(
        e["name"].lower().endswith("_proxy") for e in pod()["containers"][0].get("env", [])
    ), "the agent needs no proxy settings: its connections are redirected"
    policy_volume = next(
        v for v in pod()["volumes"] if v.get("configMap", {}).get("name", "").endswith("policy")
    )
    mount = next(m for m in guard["volumeMounts"] if m["name"] == policy_volume["name"])
    assert args.policy == f"{mount['mountPath']}/policy.yaml"


def test_the_sidecar_policy_loads_and_admits_the_pods_own_addresses() -> None:
    text = one("ConfigMap", "egress-guard-sidecar-policy")["data"]["policy.yaml"]
    policy = load_policy_text(text, "docker/k8s/sidecar/policy.yaml")
    cidrs = [ipaddress.ip_network(c) for c in policy.clients.allow_cidrs]
    for addr in ("127.0.0.1", "10.1.2.3", "::1"):
        assert any(ipaddress.ip_address(addr) in n for n in cidrs), addr


# -- the rules, for real ----------------------------------------------------------------


@dataclass
class Pod:
    ns: str
    peer_ns: str
    peer_ip: str


def guide_iptables_lines() -> list[list[str]]:
    """The sidecar iptables recipe of docs/operators-guide.md, command by command."""
    text = (ROOT / "docs" / "operators-guide.md").read_text(encoding="utf-8")
    after = text.split("<!-- sidecar-iptables", 1)[1]
    block = after.split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line.split() for line in block.splitlines() if line.startswith("iptables ")]
    assert len(lines) >= 6, block
    return lines


@pytest.fixture(params=["configmap-nft", "guide-iptables"])
def pod_netns(request: pytest.FixtureRequest) -> Iterator[Pod]:
    """A "pod" namespace with the init container's rules loaded (or the operators
    guide's iptables form of them), linked by a veth pair to a "peer" namespace standing
    for everything outside the pod."""
    if os.geteuid() != 0:
        missing("sidecar rules test: needs root to create namespaces")
    tool = "nft" if request.param == "configmap-nft" else "iptables"
    for prog in ("ip", tool, "setpriv", "bash"):
        if shutil.which(prog) is None:
            missing(f"sidecar rules test: {prog} is not installed")
    tag = secrets.token_hex(4)
    pod_ns, peer_ns = f"eg-pod-{tag}", f"eg-peer-{tag}"
    x, y = random.randrange(256), random.randrange(64) * 4
    pod_ip, peer_ip = f"10.201.{x}.{y + 1}", f"10.201.{x}.{y + 2}"
    created: list[str] = []
    try:
        try:
            ip("netns", "add", pod_ns)
        except RuntimeError as e:
            missing(f"sidecar rules test: 'ip netns add' is unavailable ({e})")
        created.append(pod_ns)
        ip("netns", "add", peer_ns)
        created.append(peer_ns)
        a, b = f"egp{tag}", f"egq{tag}"
        ip("link", "add", a, "netns", pod_ns, "type", "veth", "peer", "name", b, "netns", peer_ns)
        ip("-n", pod_ns, "addr", "add", f"{pod_ip}/30", "dev", a)
        ip("-n", peer_ns, "addr", "add", f"{peer_ip}/30", "dev", b)
        for ns, dev in ((pod_ns, a), (peer_ns, b), (pod_ns, "lo"), (peer_ns, "lo")):
            ip("-n", ns, "link", "set", dev, "up")
        if tool == "nft":
            r = subprocess.run(
                ["ip", "netns", "exec", pod_ns, "nft", "-f", "-"],
                input=rules_text(),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert r.returncode == 0, r.stderr
        else:
            for argv in guide_iptables_lines():
                r = subprocess.run(
                    ["ip", "netns", "exec", pod_ns, *argv],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert r.returncode == 0, (argv, r.stderr)
        yield Pod(pod_ns, peer_ns, peer_ip)
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _listener(host: str, port: int = 0, kind: int = socket.SOCK_STREAM) -> socket.socket:
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    if kind == socket.SOCK_STREAM:
        s.listen(8)
    s.settimeout(5)
    return s


def _original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def test_rules_redirect_the_pods_tcp_let_the_guard_out_and_drop_other_udp(
    pod_netns: Pod,
) -> None:
    p = pod_netns
    guard = in_netns(p.ns, lambda: _listener("127.0.0.1", redirect_port()))
    outside = in_netns(p.peer_ns, lambda: _listener(p.peer_ip))
    outside_udp = in_netns(p.peer_ns, lambda: _listener(p.peer_ip, 0, socket.SOCK_DGRAM))
    dns = in_netns(p.peer_ns, lambda: _listener(p.peer_ip, 53, socket.SOCK_DGRAM))
    port = outside.getsockname()[1]
    try:
        # the agent (any UID but the guard's), ignoring every proxy setting: to the guard
        agent = in_netns(p.ns, lambda: socket.create_connection((p.peer_ip, port), timeout=5))
        conn, _ = guard.accept()
        assert _original_dst(conn) == (p.peer_ip, port)
        conn.close()
        agent.close()
        outside.settimeout(0.5)
        with pytest.raises(TimeoutError):
            outside.accept()  # it never left the pod

        # the guard's UID goes out as it is
        uid = guard_uid_in_rules()
        out = subprocess.run(
            [
                "ip", "netns", "exec", p.ns, "setpriv", f"--reuid={uid}", f"--regid={uid}",
                "--clear-groups", "bash", "-c", f"exec 3<>/dev/tcp/{p.peer_ip}/{port}",
            ],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        outside.settimeout(5)
        conn, _ = outside.accept()
        conn.close()

        def send(port: int) -> int:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.sendto(b"x" * 8, (p.peer_ip, port))
                return 0
            except OSError as e:
                return e.errno or -1
            finally:
                s.close()

        # UDP: DNS goes (to the cluster resolver), anything else is dropped
        assert in_netns(p.ns, lambda: send(outside_udp.getsockname()[1])) == errno.EPERM
        assert in_netns(p.ns, lambda: send(53)) == 0
        assert dns.recvfrom(64)[0] == b"x" * 8
        outside_udp.settimeout(0.5)
        with pytest.raises(TimeoutError):
            outside_udp.recvfrom(64)
    finally:
        for s in (guard, outside, outside_udp, dns):
            s.close()
