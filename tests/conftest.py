"""Shared fixtures: a test CA, real loopback upstreams, and the real proxy process."""

from __future__ import annotations

import contextlib
import os
import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).parent))

from support.audit_sample import write_sample
from support.policies import inspect_policy
from support.proxy import ProxyFactory, ProxyProcess
from support.upstream import Upstream

TEST_NAMES = ["api.test", "other.test", "private.test", "localhost", "127.0.0.1", "::1"]


@pytest.fixture(scope="session", autouse=True)
def shared_confdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The proxies of one test session share one interception CA (see ProxyProcess)."""
    path = tmp_path_factory.mktemp("confdir")
    old = os.environ.get("EG_TEST_CONFDIR")
    os.environ["EG_TEST_CONFDIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("EG_TEST_CONFDIR", None)
    else:
        os.environ["EG_TEST_CONFDIR"] = old


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def tls_upstream(ca: trustme.CA) -> Iterator[Upstream]:
    cert = ca.issue_cert(*TEST_NAMES)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    with Upstream(ctx) as up:
        yield up


@pytest.fixture
def http_upstream() -> Iterator[Upstream]:
    with Upstream(None) as up:
        yield up


#: the proxies a test started, so a failure report can show their logs
STARTED = pytest.StashKey[list[ProxyProcess]]()
LOG_TAIL_CHARS = 8000


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the tail of each proxy's log: a flaky failure in CI
    is otherwise undiagnosable once its temporary directory is gone."""
    report = yield
    if report.failed:
        for p in item.stash.get(STARTED, []):
            with contextlib.suppress(OSError):
                report.sections.append(
                    (
                        f"egress-guard log ({p.workdir.name}, {report.when})",
                        p.log()[-LOG_TAIL_CHARS:],
                    )
                )
    return report


@pytest.fixture
def proxy(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyFactory]:
    """``proxy(policy_text, *extra_args)`` starts egress-guard; stopped at teardown."""
    started: list[ProxyProcess] = []
    request.node.stash[STARTED] = started

    def start(policy: str | Callable[[int], str] | None, *extra: str, **kw: object) -> ProxyProcess:
        p = ProxyProcess(tmp_path / f"proxy{len(started)}", policy, list(extra), **kw)  # type: ignore[arg-type]
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def inspect_guard(proxy: ProxyFactory, tls_upstream: Upstream, ca_file: Path) -> ProxyProcess:
    """A guard that inspects api.test with method, path and model rules
    (``support.policies.inspect_policy``), verifying the upstream with the test CA."""
    return proxy(inspect_policy(tls_upstream.port), "--inspect", "--upstream-ca", str(ca_file))


@pytest.fixture
def audit_sample(tmp_path: Path) -> Path:
    """A fresh 14-line sample audit log (``support.audit_sample.write_sample``)."""
    p = tmp_path / "audit.log"
    write_sample(p)
    assert len(p.read_bytes().splitlines()) == 14
    return p
