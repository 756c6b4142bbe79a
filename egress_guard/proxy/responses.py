"""What a blocked client is told, in a form it will show to its user.

A tunnel or plain-HTTP block is answered as DESIGN section 5 says: 403 (407 for proxy
auth, 502 when a name does not resolve) with ``X-Egress-Guard-*`` headers and a small
JSON body. A request refused inside an inspected LLM API call is answered in that
provider's own error format, so OpenCode surfaces the message instead of a parse error.

What a client is told is for the client: it names the destination, the allowed models
and the catalog entry to use, but never a filesystem path (the policy file's, or a
shipped preset's: the hint's ``file:line`` stays in the audit log and the operator's
logs) and no secret (``redact.text``: queries, path parameters, userinfo).

Clients show a refusal in different places, so the why (host, port, reason, hint) is in
each of them: the status line's reason phrase (``Forbidden: egress-guard blocked
llm.test:443 (not_allowlisted): ...``: what urllib, requests and OpenCode print, OpenCode
verbatim), the body's ``error`` (what a client that prints the body shows), and the
provider error message inside an inspected API call. A reason phrase is a header line:
it is built from printable ASCII only, and bounded.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any, Final

from mitmproxy import http

from egress_guard.engine import Decision
from egress_guard.engine.models import ApiKind
from egress_guard.policy import policies_dir
from egress_guard.sinks import redact

#: what a policy file is called in a client's answer
POLICY_NAME = "the policy"
#: a policy-looking file path left over (one not named by the caller): absolute, home- or
#: dot-relative, or a drive path; with its ``:line``
_PATH_LEFT = re.compile(
    r"(?:^|(?<=[\s'\"(\[=,]))"
    r"(?:[A-Za-z]:[\\/]|~?/|\.\.?/)[^\s'\"]*?\.(?:ya?ml|json|txt|pem)(?::(?:\d+|None))?"
    r"(?=$|[\s'\"),;\]])"
)


@functools.lru_cache(maxsize=8)
def _sources_pattern(sources: tuple[str, ...]) -> re.Pattern[str] | None:
    """The policy's own file names (longest first) with an optional ``:line``."""
    names = sorted(
        {s for s in sources if s and not s.startswith("builtin:")}, key=len, reverse=True
    )
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(f"(?:{alternatives})(?::(?:\\d+|None))?")


_PRESETS = re.compile(
    re.escape(str(policies_dir()) + os.sep) + r"(?P<name>[^\s'\"/:]+)\.ya?ml(?::(?:\d+|None))?"
)


def public_text(text: str | None, sources: Iterable[str] = ()) -> str | None:
    """``text`` fit for a client: the policy's file names (``sources``) and shipped
    presets' paths replaced by names, any other file path that looks like a policy's
    removed, secrets redacted."""
    if text is None:
        return None
    pattern = _sources_pattern(tuple(sources))
    if pattern is not None:
        text = pattern.sub(POLICY_NAME, text)
    text = _PRESETS.sub(lambda m: f"preset {m.group('name')!r}", text)
    text = _PATH_LEFT.sub(POLICY_NAME, text)
    return redact.text(text)


#: what an address the client did not write is called in its answer
ADDRESS_NAME: Final = "<address>"
#: a word that may be an IP address (v4, v6, v4-mapped, with a zone), or v4 with a port
_ADDRESS_LIKE = re.compile(r"[0-9A-Fa-f:.%]*[.:][0-9A-Fa-f:.%]*[0-9A-Fa-f]")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None


def hide_addresses(text: str | None, host: str | None) -> str | None:
    """``text`` with every IP address but the one the client asked for (``host``)
    replaced by ``<address>``. What a name resolved to ("private.test resolved to
    10.2.3.4", "deny rule ... (resolved to ...)", a pinned tunnel's addresses) is for the
    operator's audit log: told to the client, the guard answers internal DNS for an agent
    that may have no resolver of its own, one refused CONNECT per name."""
    if not text:
        return text
    asked = _ip((host or "").strip("[]"))

    def one(m: re.Match[str]) -> str:
        word = m.group()
        ip = _ip(word)
        tail = ""
        if ip is None and word.count(":") == 1:  # a.b.c.d:port
            head, _, tail = word.partition(":")
            ip, tail = _ip(head), ":" + tail
            if ip is None or ip.version != 4:
                return word
        if ip is None or ip == asked:
            return word
        return ADDRESS_NAME + tail

    return _ADDRESS_LIKE.sub(one, text)


#: refusals that are not 403; ``buffer_budget`` (the held-body budget is spent) is 503
#: with Retry-After: the request was not judged, and may pass once others are done
_STATUS = {
    "proxy_auth_required": 407,
    "dns_failed": 502,
    "malformed_request": 400,
    "buffer_budget": 503,
}
#: seconds a client is asked to wait after a 503 buffer_budget
RETRY_AFTER_S = 5


#: the longest reason phrase sent (a status line a client can always hold)
MAX_PHRASE: Final = 400
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _target(d: Decision) -> str:
    host = redact.host(d.host) or "?"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address: the port stays readable
    return host if d.port is None else f"{host}:{d.port}"


def why(d: Decision, sources: Iterable[str] = ()) -> str:
    """The refusal in one sentence for the client's user (and the agent): host and
    port, reason code, and the hint (``public_text``: no file paths, no secrets).
    ``egress-guard blocked llm.test:443 (not_allowlisted): no catalog entry covers ...``"""
    text = f"egress-guard blocked {_target(d)} ({d.reason})"
    hint = hide_addresses(public_text(d.hint, tuple(sources)), d.host)
    return f"{text}: {hint}" if hint else text


def reason_phrase(status: int, d: Decision, sources: Iterable[str] = ()) -> str:
    """The status line's reason phrase: the standard one, then ``why``, as printable
    ASCII (anything else, a client's own bytes included, becomes ``?``), bounded."""
    try:
        standard = HTTPStatus(status).phrase
    except ValueError:
        standard = "Blocked"
    phrase = _UNPRINTABLE.sub("?", f"{standard}: {why(d, sources)}")
    return phrase if len(phrase) <= MAX_PHRASE else phrase[: MAX_PHRASE - 3] + "..."


def _headers(d: Decision) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "X-Egress-Guard-Decision": "block",
        "X-Egress-Guard-Reason": d.reason,
    }
    if d.reason == "buffer_budget":
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return headers


#: the first hex digits of the policy's sha256 on the guard's own refusals: what
#: ``egress-guard doctor`` reads to tell the guard (and its policy) from any other proxy;
#: the same prefix ``validate`` and the start-up log print, and no more than a fingerprint
POLICY_HEADER = "X-Egress-Guard-Policy"
POLICY_SHA_CHARS = 16


def block_response(
    d: Decision,
    sources: Iterable[str] = (),
    status: int | None = None,
    policy_sha256: str | None = None,
) -> http.Response:
    """The 403 (or 407/502/400/503) for a refused CONNECT or plain-HTTP request.
    ``sources``: the policy's file names, which the client is not told (``public_text``).
    ``status``: instead of the reason's own. ``policy_sha256``: the policy in force."""
    status = status or _STATUS.get(d.reason, 403)
    sources = tuple(sources)
    body: dict[str, Any] = {
        "error": why(d, sources),
        "host": redact.host(d.host),
        "port": d.port,
        "reason": d.reason,
        "hint": hide_addresses(public_text(d.hint, sources), d.host),
    }
    if d.detail:
        body["detail"] = hide_addresses(public_text(d.detail, sources), d.host)
    headers = {**_headers(d), "Connection": "close"}
    if policy_sha256:
        headers[POLICY_HEADER] = policy_sha256[:POLICY_SHA_CHARS]
    if status == 407:
        headers["Proxy-Authenticate"] = 'Basic realm="egress-guard"'
    resp = http.Response.make(status, json.dumps(body).encode() + b"\n", headers)
    resp.reason = reason_phrase(status, d, sources)
    return resp


def provider_block_response(
    d: Decision, kind: ApiKind | None, sources: Iterable[str] = (), status: int | None = None
) -> http.Response:
    """403 (503 ``buffer_budget``) in the error shape of the provider API the request
    was made to (``sources`` as for block_response; ``status`` instead of the reason's
    own)."""
    status = status or (503 if d.reason == "buffer_budget" else 403)
    sources = tuple(sources)
    message = f"egress-guard: {d.reason.replace('_', ' ')} at {_target(d)}"
    hint = hide_addresses(public_text(d.hint, sources), d.host)
    if hint:
        message += f" ({hint})"
    body: dict[str, Any]
    if kind == "anthropic":
        kind_name = "overloaded_error" if status == 503 else "permission_error"
        body = {"type": "error", "error": {"type": kind_name, "message": message}}
    elif kind == "gemini":
        state = "UNAVAILABLE" if status == 503 else "PERMISSION_DENIED"
        body = {"error": {"code": status, "message": message, "status": state}}
    else:  # OpenAI-compatible, and the default for anything else inspected
        body = {
            "error": {
                "message": message,
                "type": "server_error" if status == 503 else "permission_error",
                "param": "model" if d.reason == "model_not_allowed" else None,
                "code": d.reason,
            }
        }
    resp = http.Response.make(status, json.dumps(body).encode() + b"\n", _headers(d))
    resp.reason = reason_phrase(status, d, sources)
    return resp
