"""The status page in a real headless browser: the distribution's Chromium, driven by
Playwright (its driver ships in the wheel; no browser is downloaded). Load the page from
a real proxy's metrics listener, make a blocked request, see it appear.

``scripts/install-test-peers.sh`` installs Chromium, the dev extra installs Playwright;
without either this test skips on a developer's machine and fails in CI."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from support.clients import curl, send_raw
from support.policies import make_policy
from support.ports import free_port
from support.prereq import missing
from support.proxy import ProxyFactory

#: markup a client can put in a request path: it must show as text, never run
MARKUP = "/<svg/onload=document.title=1><img/src=x/onerror=document.title=2>"


def chromium() -> str | None:
    """The distribution's Chromium (``EG_CHROMIUM`` overrides)."""
    if os.environ.get("EG_CHROMIUM"):
        return os.environ["EG_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[dev]')")
    exe = chromium()
    if exe is None:
        missing("no Chromium on PATH (scripts/install-test-peers.sh installs it)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def test_a_blocked_request_appears_live(
    browser: Any, proxy: ProxyFactory, http_upstream: Any
) -> None:
    mport = free_port()
    p = proxy(make_policy(http_upstream.port), "--metrics", f"127.0.0.1:{mport}")
    base = f"http://127.0.0.1:{mport}"
    page = browser.new_page()
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    try:
        page.goto(f"{base}/")
        sha = p.audit("policy_loaded")[-1]["policy_sha256"]
        page.wait_for_function(
            "sha => document.getElementById('policy-sha256').textContent === sha", arg=sha
        )
        assert page.locator("#health").inner_text() == "healthy"
        assert page.locator("#audit-state").inner_text() == "writing"
        assert page.locator("#no-decisions").is_visible()

        # a blocked request, made after the page loaded: it appears without a reload
        assert curl(p.url, f"http://other.test:{http_upstream.port}/x").code == 403
        row = page.locator("#decisions tbody tr", has_text="other.test").first
        row.wait_for(timeout=10_000)
        cells = row.locator("td").all_inner_texts()
        assert cells[1] == "block"
        assert cells[2] == "other.test"
        assert cells[3] == str(http_upstream.port)
        assert cells[4] == p.wait_audit(lambda r: r["host"] == "other.test")[0]["reason"]
        assert cells[7].startswith("127.0.0.1")
        unlisted = page.locator("#destinations tbody tr", has_text="unlisted").first
        unlisted.wait_for(timeout=5_000)
        assert unlisted.locator("td").nth(2).inner_text() == "1"

        # client-controlled text is shown as text: the markup neither renders nor runs
        req = f"GET http://other.test:{http_upstream.port}{MARKUP} HTTP/1.1\r\n"
        req += f"Host: other.test:{http_upstream.port}\r\n\r\n"
        sock, resp = send_raw(p.port, req.encode())
        sock.close()
        assert resp.status == 403
        shown = page.locator("#decisions tbody tr", has_text="onerror").first
        shown.wait_for(timeout=10_000)
        assert MARKUP in shown.inner_text()
        assert page.locator("#decisions img, #decisions svg").count() == 0
        assert page.title() == "egress-guard status"

        # blocks only: an allowed request does not push the blocks off the table
        page.check("#blocks-only")
        assert curl(p.url, f"http://api.test:{http_upstream.port}/ok").code == 200
        page.uncheck("#blocks-only")
        page.locator("#decisions tbody tr[data-decision=allow]").first.wait_for(timeout=10_000)
        page.check("#blocks-only")
        page.wait_for_function(
            "() => document.querySelectorAll('#decisions tbody tr[data-decision=allow]').length === 0"
        )
        assert page.locator("#decisions tbody tr", has_text="other.test").count() == 2

        # self-contained: the page fetched nothing from anywhere but the listener
        assert requested and all(u.startswith(f"{base}/") for u in requested), requested
    finally:
        page.close()
