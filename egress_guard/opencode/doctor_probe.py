"""``egress-guard doctor``'s look at the proxy itself: does something answer at the proxy
URL, is it an egress-guard, and which policy does it run?

A configuration can be right and the traffic still unguarded: ``HTTPS_PROXY`` pointing
at another proxy (a corporate Squid, a leftover mitmproxy) sends every request past the
guard. So the doctor asks the proxy for a name that cannot exist
(``egress-guard-doctor.invalid``, RFC 2606) in plain HTTP: an egress-guard refuses it
itself, marking its answer with ``X-Egress-Guard-Decision`` and the fingerprint of the
policy in force (``X-Egress-Guard-Policy``). The request is refused and audited like
any other, so the doctor's visit is in the audit log.
"""

from __future__ import annotations

import base64
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from egress_guard.normalize import join_hostport
from egress_guard.opencode.doctor_report import DoctorInput, Finding
from egress_guard.opencode.doctor_values import redact

PROBE_HOST = "egress-guard-doctor.invalid"
PROBE_TIMEOUT_S = 3.0
MAX_HEAD = 16 * 1024


@dataclass(frozen=True)
class ProbeResult:
    #: None: nothing answered (``error`` says why)
    status: int | None
    status_line: str = ""
    #: the answer carried X-Egress-Guard-Decision: the guard refused it itself
    is_guard: bool = False
    #: the policy fingerprint the guard sent (sha256 prefix), or None
    policy_sha: str | None = None
    reason: str | None = None
    error: str | None = None


def _auth_header(url: str) -> bytes:
    """Proxy-Authorization for a URL with user:password (a guard with clients.auth)."""
    try:
        parts = urlsplit(url if "://" in url else "http://" + url)
    except ValueError:
        return b""
    if parts.username is None:
        return b""
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return b"Proxy-Authorization: Basic " + base64.b64encode(pair) + b"\r\n"


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < MAX_HEAD:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def probe(url: str, host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Ask the proxy at ``host:port`` (``url`` for its credentials) for ``PROBE_HOST``."""
    request = (
        f"GET http://{PROBE_HOST}/ HTTP/1.1\r\nHost: {PROBE_HOST}\r\n".encode()
        + _auth_header(url)
        + b"User-Agent: egress-guard-doctor\r\nConnection: close\r\n\r\n"
    )
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(request)
            head = _read_head(sock)
    except OSError as e:
        where = join_hostport(host, port)
        return ProbeResult(None, error=f"{where}: {e.strerror or e}")
    if not head:
        return ProbeResult(None, error="the connection was closed without an answer")
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    first = lines[0]
    try:
        status = int(first.split(" ", 2)[1])
    except (IndexError, ValueError):
        return ProbeResult(None, error=f"the answer is not HTTP: {first[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return ProbeResult(
        status,
        status_line=first[:200],
        is_guard="x-egress-guard-decision" in headers,
        policy_sha=headers.get("x-egress-guard-policy") or None,
        reason=headers.get("x-egress-guard-reason") or None,
    )


def probe_findings(inp: DoctorInput, result: ProbeResult | None) -> list[Finding]:
    """What the probe of ``inp.proxy_url`` means for the user (None: not probed, the
    proxy URL's scheme is not plain http)."""
    url = redact(inp.proxy_url)
    if result is None:
        return [
            Finding(
                "info",
                "proxy",
                f"{url} was not probed: only http:// proxy URLs are",
                "run with --proxy-url http://HOST:PORT (the guard's --listen) to check it",
            )
        ]
    if result.status is None:
        return [
            Finding(
                "warning",
                "proxy",
                f"nothing answers at {url} ({result.error}): until the guard runs there, "
                "every request OpenCode makes through it fails",
                "start the guard (egress-guard run --listen HOST:PORT) or give --proxy-url "
                "where it listens; --no-probe checks the configuration alone",
            )
        ]
    if not result.is_guard:
        return [
            Finding(
                "error",
                "proxy",
                f"{url} answers ({result.status_line!r}) but it is not an egress-guard: "
                "traffic sent there is not checked by the guard",
                "point HTTPS_PROXY and HTTP_PROXY (and --proxy-url) at the guard's --listen "
                "address",
            )
        ]
    ours = inp.policy.sha256[: len(result.policy_sha or "")]
    if result.policy_sha is not None and result.policy_sha != ours:
        return [
            Finding(
                "warning",
                "proxy",
                f"the egress-guard at {url} runs the policy with sha256 {result.policy_sha}, "
                f"not {inp.policy_label} (sha256 {inp.policy.sha256[:16]}) that these checks "
                "used",
                "pass the guard's policy file with --policy, or reload the guard (SIGHUP) "
                "if its file changed",
            )
        ]
    running = (
        f"running {inp.policy_label} (sha256 {result.policy_sha})"
        if result.policy_sha
        else "(its policy is not shown: an older egress-guard)"
    )
    auth = (
        "; it asks for proxy credentials (clients.auth), which the proxy URL lacks or were refused"
        if result.status == 407
        else ""
    )
    return [
        Finding(
            "info",
            "proxy",
            f"egress-guard answers at {url}, {running}{auth}",
            "nothing to do" if not auth else "put user:password in the proxy URL",
        )
    ]
