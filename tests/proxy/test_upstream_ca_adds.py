"""``--upstream-ca`` adds to the public roots; ``--upstream-ca-only`` replaces them.

Before: ``--upstream-ca FILE`` was handed to mitmproxy's ``ssl_verify_upstream_trusted_ca``,
which *replaces* the public roots, so once an operator gave a corporate CA (for an
internal LLM gateway) every public provider failed in inspect mode (502). Two loopback
TLS upstreams signed by two different test CAs stand in for "a public provider" and "the
corporate gateway"; the public one's CA is made the default roots (certifi.where(), what
mitmproxy and the guard read) by a launcher.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from support.policies import MODEL_RULES as RULES
from support.policies import make_policy
from support.proxy import ProxyFactory, ProxyProcess, guard_ca
from support.upstream import Upstream

LAUNCHER = [sys.executable, str(Path(__file__).parent.parent / "support" / "public_roots_run.py")]


@pytest.fixture(scope="module")
def public_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def corp_ca() -> trustme.CA:
    return trustme.CA()


def _upstream(ca: trustme.CA) -> Upstream:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("api.test", "other.test").configure_cert(ctx)
    return Upstream(ctx)


@pytest.fixture
def public_up(public_ca: trustme.CA) -> Iterator[Upstream]:
    with _upstream(public_ca) as up:
        yield up


@pytest.fixture
def corp_up(corp_ca: trustme.CA) -> Iterator[Upstream]:
    with _upstream(corp_ca) as up:
        yield up


@pytest.fixture
def pems(tmp_path: Path, public_ca: trustme.CA, corp_ca: trustme.CA) -> tuple[Path, Path]:
    public, corp = tmp_path / "public-roots.pem", tmp_path / "corp-ca.pem"
    public_ca.cert_pem.write_to_path(str(public))
    corp_ca.cert_pem.write_to_path(str(corp))
    return public, corp


def policy(pub_port: int, corp_port: int) -> str:
    """api.test on both ports, with request rules so its tunnels are intercepted."""
    text = make_policy(pub_port, corp_port)
    return text.replace(
        f"    ports: [{pub_port}, {corp_port}]\n  - name: private-api",
        f"    ports: [{pub_port}, {corp_port}]\n{RULES}  - name: private-api",
        1,
    )


def start(
    proxy: ProxyFactory, pems: tuple[Path, Path], ports: tuple[int, int], *flags: str
) -> ProxyProcess:
    public, _ = pems
    return proxy(
        policy(*ports),
        "--inspect",
        *flags,
        launcher=LAUNCHER,
        env={"EG_TEST_PUBLIC_ROOTS": str(public)},
    )


def status(p: ProxyProcess, port: int) -> int:
    with httpx.Client(proxy=p.url, verify=guard_ca(p), trust_env=False, timeout=20) as c:
        return c.post(
            f"https://api.test:{port}/v1/chat/completions", json={"model": "good-model"}
        ).status_code


def test_default_trusts_public_roots_only(
    proxy: ProxyFactory, public_up: Upstream, corp_up: Upstream, pems: tuple[Path, Path]
) -> None:
    """The stand-in works: without a flag, the "public" upstream verifies, the
    corporate one does not."""
    p = start(proxy, pems, (public_up.port, corp_up.port))
    assert status(p, public_up.port) == 200
    assert status(p, corp_up.port) == 502
    assert corp_up.seen.requests == []


def test_upstream_ca_adds_to_public_roots(
    proxy: ProxyFactory, public_up: Upstream, corp_up: Upstream, pems: tuple[Path, Path]
) -> None:
    _, corp = pems
    p = start(proxy, pems, (public_up.port, corp_up.port), "--upstream-ca", str(corp))
    assert status(p, corp_up.port) == 200
    assert status(p, public_up.port) == 200  # before: 502, the public roots were gone


def test_upstream_ca_repeated(
    proxy: ProxyFactory,
    public_up: Upstream,
    corp_up: Upstream,
    pems: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """Several CA files, one of them a bundle with an unrelated CA in front."""
    _, corp = pems
    extra = tmp_path / "two.pem"
    extra.write_bytes(trustme.CA().cert_pem.bytes() + corp.read_bytes())
    p = start(
        proxy,
        pems,
        (public_up.port, corp_up.port),
        "--upstream-ca",
        str(trustme_other(tmp_path)),
        "--upstream-ca",
        str(extra),
    )
    assert status(p, corp_up.port) == 200
    assert status(p, public_up.port) == 200


def trustme_other(tmp_path: Path) -> Path:
    path = tmp_path / "unrelated.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_upstream_ca_only_replaces_public_roots(
    proxy: ProxyFactory, public_up: Upstream, corp_up: Upstream, pems: tuple[Path, Path]
) -> None:
    _, corp = pems
    p = start(proxy, pems, (public_up.port, corp_up.port), "--upstream-ca-only", str(corp))
    assert status(p, corp_up.port) == 200
    assert status(p, public_up.port) == 502
    assert public_up.seen.requests == []


@pytest.mark.parametrize("bad", ["missing", "not-pem", "fifo", "empty"])
def test_bad_ca_file_is_a_clear_start_up_error(tmp_path: Path, bad: str) -> None:
    import os

    from support.ports import free_port
    from support.proxy import EGRESS_GUARD

    path = tmp_path / "ca.pem"
    if bad == "not-pem":
        path.write_text("hello\n")
    elif bad == "fifo":
        os.mkfifo(path)
    elif bad == "empty":
        path.write_text("")
    for flag in ("--upstream-ca", "--upstream-ca-only"):
        res = subprocess.run(
            [
                EGRESS_GUARD,
                "run",
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--confdir",
                str(tmp_path / "conf"),
                flag,
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 2, res.stderr
        assert str(path) in res.stderr and "Traceback" not in res.stderr


def test_both_flags_refused(tmp_path: Path, pems: tuple[Path, Path]) -> None:
    from support.proxy import EGRESS_GUARD

    _, corp = pems
    res = subprocess.run(
        [EGRESS_GUARD, "run", "--upstream-ca", str(corp), "--upstream-ca-only", str(corp)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2 and "not allowed with" in res.stderr
