"""``egress-guard doctor`` asks the proxy URL itself (issue 19, item 9): nothing there,
something that is not an egress-guard (traffic past the guard: an error), or an
egress-guard running the policy the checks used, or another one.

Real processes on loopback: the guard (tests/support/proxy.py), and a plain HTTP server
standing in for some other proxy.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.ports import free_port
from support.proxy import ProxyFactory

from egress_guard.policy import load_policy

FIXTURES = Path(__file__).parent / "fixtures"
BIN = str(Path(sys.executable).parent / "egress-guard")
POLICY = "version: 1\ninclude: [minimal]\ndestinations:\n  - use: openai\n"


def doctor(proxy_url: str, *extra: str) -> tuple[int, list[dict[str, str]]]:
    res = subprocess.run(
        [BIN, "doctor", str(FIXTURES / "doctor_clean.json"), "--json", "--proxy-url", proxy_url, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent",
             "HTTPS_PROXY": proxy_url, "HTTP_PROXY": proxy_url, "NO_PROXY": "localhost,127.0.0.1"},
    )  # fmt: skip
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, [f for f in json.loads(res.stdout) if f["check"] == "proxy"]


def test_the_guard_and_its_policy(proxy: ProxyFactory, tmp_path: Path) -> None:
    p = proxy(POLICY)
    sha = load_policy(p.policy_path).sha256[:16]
    rc, found = doctor(p.url, "--policy", str(p.policy_path))
    assert rc == 0
    (f,) = found
    assert f["severity"] == "info" and "egress-guard answers" in f["message"], f
    assert sha in f["message"], f
    # the probe was refused and audited like any other request
    assert any(r.get("host") == "egress-guard-doctor.invalid" for r in p.audit()), p.audit()
    # the checks used another policy than the guard runs: said so
    rc, found = doctor(p.url)
    (f,) = found
    assert rc == 0 and f["severity"] == "warning", f
    assert sha in f["message"] and "not the built-in minimal preset" in f["message"], f


@pytest.fixture
def other_proxy() -> Iterator[str]:
    """An HTTP server that answers anything with 200: a proxy that is not the guard."""

    class Any200(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Any200)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_something_else_answering_is_an_error(other_proxy: str) -> None:
    rc, found = doctor(other_proxy)
    assert rc == 1
    (f,) = found
    assert f["severity"] == "error" and "not an egress-guard" in f["message"], f


def test_nothing_answering_is_a_warning() -> None:
    rc, found = doctor(f"http://127.0.0.1:{free_port()}")
    assert rc == 0
    (f,) = found
    assert f["severity"] == "warning" and "nothing answers" in f["message"], f


def test_no_probe_checks_the_configuration_alone(other_proxy: str) -> None:
    rc, found = doctor(other_proxy, "--no-probe")
    assert (rc, found) == (0, [])
