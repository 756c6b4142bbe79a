"""Fixtures for the deployment tests: the real CLI's flags and one running proxy."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest
from deploy.running import RunningGuard, connect_unlisted, get_through
from prometheus_client.parser import text_string_to_metric_families
from support.proxy import EGRESS_GUARD, ProxyProcess, free_port
from support.upstream import Upstream


@pytest.fixture(scope="session")
def run_help_flags() -> set[str]:
    """The options ``egress-guard run --help`` prints (the real CLI, in a subprocess)."""
    out = subprocess.run(
        [EGRESS_GUARD, "run", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out))
    assert {"--policy", "--listen", "--metrics", "--audit-log"} <= flags, out
    return flags


@pytest.fixture(scope="session")
def running_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGuard]:
    """``egress-guard run`` with --metrics on loopback, after one allowed request (to a
    loopback upstream the policy lists) and one blocked CONNECT for an unlisted host, so
    every series has samples with its labels."""
    workdir = tmp_path_factory.mktemp("deploy-guard")
    mport = free_port()
    with Upstream(None) as up:
        policy = (
            "version: 1\n"
            "destinations:\n"
            "  - name: loopback-upstream\n"
            f"    hosts: [127.0.0.1]\n    ports: [{up.port}]\n"
        )
        proxy = ProxyProcess(workdir, policy, ["--metrics", f"127.0.0.1:{mport}"])
        proxy.start()
        try:
            ok = get_through(proxy.host, proxy.port, f"127.0.0.1:{up.port}")
            assert ok.startswith(b"HTTP/1.1 200"), ok[:300]
            head = connect_unlisted(proxy.host, proxy.port)
            assert head.startswith(b"HTTP/1.1 403"), head
            text = ""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                    text = r.read().decode()
                if 'decision="block"' in text and "_duration_seconds_count{" in text:
                    break
                time.sleep(0.05)
            families = list(text_string_to_metric_families(text))
            yield RunningGuard(proxy, mport, families, text)
        finally:
            proxy.stop()
