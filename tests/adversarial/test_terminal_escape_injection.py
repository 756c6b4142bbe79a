"""Terminal escape injection and log forging through egress-guard's human log lines.

Threat: a client (an agent, anything that reaches the proxy or the metrics port) puts
control characters into strings the guard or mitmproxy writes to stderr: an
``ESC ]0;...BEL`` retitles the operator's terminal, ``ESC [2J`` clears it, a carriage
return or newline forges a line ("policy loaded"), a C1 CSI (0x9b) or a bidi override
(U+202E) hides what a line says. Every human log line must carry them escaped, and only
the guard's own multi-line renders may span lines (each continuation indented).

The inputs are tests/testdata/hygiene/control_sequences.json.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from support.policies import make_policy
from support.ports import free_port
from support.proxy import ProxyFactory, ProxyProcess
from support.upstream import Upstream

from egress_guard.sinks.logsafe import Block, SafeFormatter, escape

DATA = Path(__file__).parent.parent / "testdata" / "hygiene" / "control_sequences.json"
SEQUENCES: dict[str, str] = {
    k: v for k, v in json.loads(DATA.read_text()).items() if not k.startswith("_")
}

#: a character no terminal line written by the guard may contain raw
_RAW = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u206f\ufeff\ufff9-\ufffb\U000e0000-\U000e007f\ud800-\udfff]"
)
#: how a log record starts (run's format): anything else at column 0 is a forged record
_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def raw_chars(text: str) -> list[str]:
    return sorted({repr(c) for c in _RAW.findall(text)})


def send(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # a head or body left unfinished ends here
        s.settimeout(3)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass


def stderr_text(p: ProxyProcess) -> str:
    # the proxy writes UTF-8; surrogateescape keeps any byte that is not
    return p.log_path.read_bytes().decode("utf-8", "surrogateescape")


@pytest.fixture
def verbose_guard(proxy: ProxyFactory, http_upstream: Upstream) -> tuple[ProxyProcess, int]:
    """-v: mitmproxy's own lines and the guard's debug lines, the widest log surface."""
    mport = free_port()
    p = proxy(make_policy(http_upstream.port), "-v", "--metrics", f"127.0.0.1:{mport}")
    return p, mport


def test_metrics_request_line_reaches_stderr_escaped(
    verbose_guard: tuple[ProxyProcess, int],
) -> None:
    """The metrics server's access line quotes the request line a scraper sent."""
    p, mport = verbose_guard
    for seq in SEQUENCES.values():
        # latin-1 is what http.server decodes a request line as: the UTF-8 bytes of
        # U+202E arrive as C1 characters, which must be escaped as well
        target = "/m" + seq.replace("\n", "")
        send(mport, b"GET " + target.encode("utf-8", "surrogatepass") + b" HTTP/1.1\r\n\r\n")
    deadline = time.monotonic() + 5
    while stderr_text(p).count('" 40') < len(SEQUENCES) and time.monotonic() < deadline:
        time.sleep(0.05)
    text = stderr_text(p)
    assert text.count('" 40') == len(SEQUENCES), text
    assert raw_chars(text) == []
    assert "\\x1b]0" in text  # the OSC sequence, escaped
    for line in text.splitlines():
        assert _RECORD_START.match(line) or line.startswith(" "), line


def test_proxy_traffic_with_control_characters_never_reaches_stderr_raw(
    verbose_guard: tuple[ProxyProcess, int], http_upstream: Upstream
) -> None:
    """URLs, Host headers, CONNECT targets, header lines, methods: every sequence, sent
    through the proxy itself with mitmproxy's own lines on (-v)."""
    p, _ = verbose_guard
    up = http_upstream.port
    for seq in SEQUENCES.values():
        b = seq.replace("\r", "").replace("\n", "").encode("utf-8", "surrogatepass")
        for data in (
            b"GET http://api.test:%d/a%sb HTTP/1.1\r\nHost: api.test:%d\r\n\r\n" % (up, b, up),
            b"GET http://api.test:%d/ HTTP/1.1\r\nHost: api.%stest:%d\r\n\r\n" % (up, b, up),
            b"CONNECT api.test:%d%s HTTP/1.1\r\nHost: x\r\n\r\n" % (up, b),
            b"GET http://api.test:%d/ HTTP/1.1\r\nHost: api.test:%d\r\n%s\r\n\r\n" % (up, up, b),
            b"G%sT http://api.test:%d/ HTTP/1.1\r\nHost: api.test:%d\r\n\r\n" % (b, up, up),
            b"GET http://other%s.test:%d/ HTTP/1.1\r\nHost: x\r\n\r\n" % (b, up),
            b"GET http://api.test:%d/ HTTP/1.1\r\nHost: api.test:%d\r\nContent-Length: 1%s\r\n\r\n"
            % (up, up, b),
            b"GET /%s HTTP/1.1\r\n" % b,  # closed before the head ends
        ):
            send(p.port, data)
    time.sleep(0.3)
    text = stderr_text(p)
    assert raw_chars(text) == []
    for line in text.splitlines():
        assert _RECORD_START.match(line) or line.startswith(" "), line


def test_policy_error_render_keeps_its_lines_indented(proxy: ProxyFactory) -> None:
    """The guard's own multi-line message (a rejected reload) keeps its newlines; the
    lines after the first are indented, so none passes for a record."""
    p = proxy(make_policy(9))
    p.policy_path.write_text("version: 1\nmode: enforce\ndestinations: 7\n")
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload rejected" not in p.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = stderr_text(p)
    _, _, rest = text.partition("policy reload rejected, keeping the old policy:")
    assert rest, text
    continuation = rest.split("\n")[1]
    assert continuation.startswith("  ") and "policy.yaml" in continuation, rest
    assert raw_chars(text) == []


# -- the formatter itself, on records shaped like mitmproxy's and the guard's ---------------


def _format(msg: object, *args: object, name: str = "mitmproxy.proxy.server") -> str:
    fmt = SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, args or None, None)
    return fmt.format(record)


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_formatter_escapes_every_sequence_in_messages_and_arguments(name: str) -> None:
    seq = SEQUENCES[name]
    for out in (
        _format(f"127.0.0.1:5: Bad request {seq}"),  # mitmproxy: pre-formatted f-string
        _format("egress-guard: %s from %s", seq, seq, name="egress_guard"),
        _format("egress-guard: %r", seq, name="egress_guard"),
    ):
        assert raw_chars(out) == [], out
        assert "\n" not in out, out


def test_formatter_forged_record_stays_on_its_line() -> None:
    forged = SEQUENCES["newline-forged-record"]
    out = _format("client error: %s", forged, name="egress_guard")
    assert out.count("\n") == 0
    assert "\\x0a2026-01-01" in out


def test_formatter_block_keeps_newlines_but_indents_and_escapes() -> None:
    render = Block("/p.yaml:3: bad \x1b[2J value\n  hint: fix it\nINFO forged")
    out = _format(Block("reload rejected:\n%s"), render, name="egress_guard")
    lines = out.split("\n")
    assert len(lines) == 4
    assert all(line.startswith("  ") for line in lines[1:])
    assert raw_chars(out) == []
    # a plain (unmarked) argument never gets a newline through, even in a Block template
    out = _format(Block("rejected:\n%s"), "a\nb", name="egress_guard")
    assert out.count("\n") == 1 and "a\\x0ab" in out


def test_formatter_traceback_is_escaped_and_indented() -> None:
    fmt = SafeFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("bad \x1b]0;x\x07\nFORGED line")
    except ValueError:
        record = logging.LogRecord(
            "egress_guard", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    out = fmt.format(record)
    assert raw_chars(out) == []
    assert all(line.startswith("  ") for line in out.split("\n")[1:]), out


def test_formatter_keeps_numbers_and_bad_format_strings() -> None:
    assert _format("%d connection(s) after %g s", 3, 1.5).endswith("3 connection(s) after 1.5 s")
    assert "\x1b" not in _format("%d %s", "x\x1b")  # wrong types: still one escaped line


def test_escape_covers_c1_bidi_and_surrogates() -> None:
    assert escape("\x9b\u202e\udc80\U000e0041") == "\\x9b\\u202e\\udc80\\U000e0041"
    assert escape("a\nb", keep_newlines=True) == "a\nb"
    assert escape("a\nb") == "a\\x0ab"
    assert escape("plain é ü 名前") == "plain é ü 名前"  # printable non-ASCII stays
