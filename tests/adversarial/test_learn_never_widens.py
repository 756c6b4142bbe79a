"""``egress-guard audit learn`` must never widen a policy past its deny rules or its
address protections (issue 17, item 10).

An audit-mode log records what the guard let through *and* what it refused: an attempt
to reach the cloud metadata service, a denied name, a private address, a name whose DNS
failed. A learned policy that turned those into allow rules would hand the attacker what
the guard refused. Each test learns a policy from a log (real ``egress-guard`` processes)
and asks ``egress-guard check`` about the learned file: the policy's verdicts are the
assertion, not its text. Logs of addresses a test must never connect to (the metadata
service, private networks) are files under tests/testdata/learn/; the real audit-mode run
talks to loopback only.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.clients import curl
from support.proxy import EGRESS_GUARD, ProxyFactory
from support.upstream import Upstream

from egress_guard.policy import load_policy, load_preset

DATA = Path(__file__).resolve().parents[1] / "testdata" / "learn"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EGRESS_GUARD, *argv], capture_output=True, text=True, timeout=120, check=False
    )


def learn(out: Path, *argv: str) -> str:
    """Learn into ``out``; it must load (``validate``). Returns the text."""
    p = run("audit", "learn", *argv, "-o", str(out))
    assert p.returncode == 0, p.stderr
    v = run("validate", str(out))
    assert v.returncode == 0, v.stderr
    return out.read_text()


def check(policy: Path, *targets: str) -> dict[str, dict[str, object]]:
    """``egress-guard check --json`` on each target: its verdict under ``policy``."""
    p = run("check", "--policy", str(policy), "--json", *targets)
    assert p.returncode in (0, 1), p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["target"] for r in rows] == list(targets)
    return {str(r["target"]): r for r in rows}


def allowed(verdicts: dict[str, dict[str, object]]) -> set[str]:
    return {t for t, r in verdicts.items() if r["decision"] == "allow"}


# -- non-public addresses ------------------------------------------------------------------

SPECIAL = [
    "169.254.169.254:80",  # recorded as private_address, as not_allowlisted, as ip literal
    "169.254.169.254:443",  # recorded as allow allowlisted: metadata is never learned
    "169.254.170.2:80",
    "100.100.100.200:80",
    "[fd00:ec2::254]:80",
    "[::ffff:169.254.169.254]:80",
    "[64:ff9b::a9fe:a9fe]:80",  # NAT64 of the metadata address
    "[2002:a9fe:a9fe::1]:80",  # 6to4 of it
    "10.0.0.5:443",
    "192.168.1.10:8080",  # an enforce-mode block
    "172.16.0.1:443",  # a record claiming not_allowlisted for a private address
    "127.0.0.1:8080",
    "127.1.2.3:5432",  # port_not_allowed
    "[::1]:11434",
    "100.64.1.1:443",  # CGNAT
    "[fe80::1]:443",
    "[fc00::5]:443",
    "0.0.0.0:80",
    "224.0.0.251:5353",
    "localhost:11434",
    "db.localhost:5432",
    "metadata.google.internal:80",
    "rebind.example.com:443",  # once private_address, once not_allowlisted
]


def test_non_public_targets_never_learned(tmp_path: Path) -> None:
    """Metadata, private, loopback, link-local, CGNAT, ULA, multicast, IPv4-in-IPv6
    forms and loopback names: never allow rules, whatever reason the record gives."""
    out = tmp_path / "learned.yaml"
    text = learn(out, str(DATA / "special_addresses.jsonl"))
    v = check(out, *SPECIAL, "api.example.com:443", "93.184.215.14:443")
    assert allowed(v) == {"api.example.com:443", "93.184.215.14:443"}
    # what was left out is listed for the operator, with the reason
    tail = text[text.index("# Left out") :]
    for target in ("169.254.169.254:80", "[fe80::1]:443", "localhost:11434", "rebind.example.com"):
        assert f"#   {target}" in tail, target
    assert "metadata address: never learned" in tail


# -- refusal reasons: an allowlist -----------------------------------------------------------

REFUSED = [
    "dns.example.com:443",  # dns_failed
    "malformed.example.com:443",
    "auth.example.com:443",  # proxy_auth_required
    "self.example.com:8080",  # self_connection
    "oops.example.com:443",  # internal_error
    "sni.example.com:443",
    "hosthdr.example.com:80",
    "model.example.com:443",
    "path.example.com:443",
    "method.example.com:443",
    "future.example.com:443",  # a reason this version does not know
    "mismatch.example.com:443",  # decision allow, reason not_allowlisted
    "odd.example.com:443",  # a decision this version does not know
    "null.example.com:443",
]
LEARNED = [
    "ok.example.com:443",  # would_block not_allowlisted
    "ok.example.com:8443",  # would_block port_not_allowed
    "blocked-enforce.example.com:443",  # block not_allowlisted, enforce mode
    "listed.example.com:443",  # allow allowlisted
]


def test_only_not_listed_reasons_are_learned(tmp_path: Path) -> None:
    out = tmp_path / "learned.yaml"
    text = learn(out, str(DATA / "refusal_reasons.jsonl"))
    v = check(out, *REFUSED, *LEARNED)
    assert allowed(v) == set(LEARNED)
    tail = text[text.index("# Left out") :]
    for target in REFUSED:
        assert f"#   {target} - " in tail, target
    assert "(no target) - block client_not_allowed" in tail
    assert "(no target) - block invalid_host" in tail


# -- the source policy's deny rules ------------------------------------------------------------


def test_source_deny_network_clients_copied_and_deny_wins(tmp_path: Path) -> None:
    src = DATA / "source_policy.yaml"
    out = tmp_path / "learned.yaml"
    learn(out, str(DATA / "denied_names.jsonl"), "--policy", str(src))
    v = check(
        out,
        "x.denied.test:443",  # recorded as denylisted
        "y.denied.test:443",  # recorded as not_allowlisted; the source denies it
        "denied.test:443",
        "ssh.example.com:22",  # a deny rule on one port
        "203.0.114.9:443",  # a public address in a denied CIDR
        "flip.example.com:443",  # denied at another time in the log
        "objects.githubusercontent.com:443",  # the catalog entry names it; deny wins
        "169.254.169.254:80",
        "ssh.example.com:443",
        "fine.example.com:443",
        "github.com:443",
    )
    assert allowed(v) == {"ssh.example.com:443", "fine.example.com:443", "github.com:443"}
    assert v["objects.githubusercontent.com:443"]["reason"] == "denylisted"
    learned, source = load_policy(out), load_policy(src)
    assert learned.deny == source.deny
    assert learned.network == source.network
    assert learned.clients == source.clients
    assert learned.mode == "enforce"


def test_without_policy_the_minimal_deny_rules_are_kept(tmp_path: Path) -> None:
    out = tmp_path / "learned.yaml"
    learn(out, str(DATA / "denied_names.jsonl"))
    v = check(out, "x.denied.test:443", "flip.example.com:443", "fine.example.com:443")
    # without the source policy, a name only its deny rules cover cannot be known; one the
    # log itself records as denied is still never learned
    assert allowed(v) == {"fine.example.com:443"}
    assert load_policy(out).deny == load_preset("minimal").deny


def test_special_target_the_source_allows_is_kept_metadata_never(tmp_path: Path) -> None:
    """A loopback model server the source policy allows is not a widening; the metadata
    service is never learned, even when the source policy allowed it."""
    src = tmp_path / "source.yaml"
    src.write_text(
        "version: 1\nmode: audit\ndestinations:\n  - use: ollama\n"
        "  - name: meta\n    hosts: [169.254.169.254]\n    ports: [80]\n"
    )
    log = tmp_path / "audit.log"
    log.write_text(
        (DATA / "local_server.jsonl").read_text()  # allow allowlisted 127.0.0.1:11434 ...
    )
    out = tmp_path / "learned.yaml"
    learn(out, str(log), "--policy", str(src))
    v = check(out, "127.0.0.1:11434", "[::1]:11434", "localhost:11434", "169.254.169.254:80")
    # only the target seen; the catalog entry's other local addresses are not taken whole
    assert allowed(v) == {"127.0.0.1:11434"}
    out2 = tmp_path / "learned-no-policy.yaml"
    learn(out2, str(log))
    assert allowed(check(out2, "127.0.0.1:11434", "169.254.169.254:80")) == set()


# -- crafted logs ------------------------------------------------------------------------------


def test_log_values_cannot_write_policy_lines(tmp_path: Path) -> None:
    """Hosts, reasons and file names from the log reach only comments, escaped."""
    log = tmp_path / "audit\nmode: audit.log"
    evil = "\n  - name: evil\n    hosts: [evil.example]\n    ports: [443]\n"
    rows = [
        {"event": "decision", "host": "evil" + evil, "port": 443, "decision": "would_block",
         "reason": "not_allowlisted"},
        {"event": "decision", "host": "a.example", "port": 443, "decision": "would_block",
         "reason": "x" + evil},
        {"event": "decision", "host": "b.example", "port": 443, "decision": "would_block",
         "reason": "not_allowlisted", "destination": "d" + evil, "ts": "t" + evil},
    ]  # fmt: skip
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "learned.yaml"
    learn(out, str(log))
    v = check(out, "evil.example:443", "a.example:443", "b.example:443")
    assert allowed(v) == {"b.example:443"}
    assert load_policy(out).mode == "enforce"


# -- a real audit-mode run (loopback only) -------------------------------------------------------


def run_policy(port: int) -> str:
    return f"""\
version: 1
mode: audit
destinations:
  - name: test-api
    purpose: test upstream
    hosts: [api.test]
    ports: [{port}]
  - name: private-api
    purpose: allowed by name, resolves to a private address
    hosts: [private.test]
    ports: [{port}]
deny:
  - hosts: ["**.denied.test"]
network:
  allow_cidrs: [127.0.0.1/32]
  resolve:
    api.test: 127.0.0.1
    other.test: 127.0.0.1
    x.denied.test: 127.0.0.1
    private.test: 127.0.0.2
    rebind.test: 127.0.0.3
"""


def test_audit_mode_run_learns_nothing_past_deny(
    proxy: ProxyFactory, http_upstream: Upstream, tmp_path: Path
) -> None:
    port = http_upstream.port
    p = proxy(run_policy(port))
    urls = {
        "api.test": 200,  # allow
        "other.test": 200,  # would_block not_allowlisted
        "x.denied.test": 403,  # denylisted, in every mode
        "127.0.0.1": 200,  # would_block ip_literal_not_allowed (allow_cidrs lifts private)
        "private.test": 0,  # would_block private_address: 127.0.0.2, nothing listens
        "rebind.test": 0,  # would_block not_allowlisted, resolves to 127.0.0.3
    }
    for host in urls:
        curl(p.url, f"http://{host}:{port}/")
    curl(p.url, f"http://127.0.0.1:{p.port}/")  # the guard itself: self_connection
    recs = p.wait_audit(lambda r: True, count=len(urls) + 1)
    reasons = {(r["host"], r["port"]): (r["decision"], r["reason"]) for r in recs}
    assert reasons[("x.denied.test", port)] == ("block", "denylisted")
    assert reasons[("127.0.0.1", port)] == ("would_block", "ip_literal_not_allowed")
    assert reasons[("private.test", port)] == ("would_block", "private_address")
    assert reasons[("127.0.0.1", p.port)] == ("block", "self_connection")
    assert p.stop() == 0

    targets = [f"{h}:{port}" for h in urls] + [f"127.0.0.1:{p.port}"]
    with_policy = tmp_path / "learned.yaml"
    learn(with_policy, str(p.audit_path), "--policy", str(p.policy_path))
    assert allowed(check(with_policy, *targets)) == {f"api.test:{port}", f"other.test:{port}"}
    without = tmp_path / "learned-bare.yaml"
    learn(without, str(p.audit_path))
    # without the source policy the static addresses are unknown: rebind.test is a name
    # like any other (its addresses are checked when it is used)
    assert allowed(check(without, *targets)) == {
        f"api.test:{port}",
        f"other.test:{port}",
        f"rebind.test:{port}",
    }


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.jsonl")))
def test_every_learned_target_is_allowed_by_the_learned_policy(tmp_path: Path, name: str) -> None:
    """Round trip: whatever a log teaches, the learned file allows each target it names in
    a destination (and still loads)."""
    out = tmp_path / "learned.yaml"
    text = learn(out, str(DATA / name))
    learned = [
        line.split("#   ", 1)[1].split(" - ", 1)[0]
        for line in text[: text.find("\ndeny:")].splitlines()
        if line.startswith("  #   ")
    ]
    if not learned:
        assert load_policy(out).destinations == ()
        return
    v = check(out, *learned)
    assert allowed(v) == set(learned)
