"""What a blocked client is told, in a form it will show to its user.

A tunnel or plain-HTTP block is answered as DESIGN section 5 says: 403 (407 for proxy
auth, 502 when a name does not resolve) with ``X-Egress-Guard-*`` headers and a small
JSON body. A request refused inside an inspected LLM API call is answered in that
provider's own error format, so OpenCode surfaces the message instead of a parse error.
"""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import http

from egress_guard.engine import Decision
from egress_guard.engine.models import ApiKind

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


def _headers(d: Decision) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "X-Egress-Guard-Decision": "block",
        "X-Egress-Guard-Reason": d.reason,
    }
    if d.reason == "buffer_budget":
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return headers


def block_response(d: Decision) -> http.Response:
    """The 403 (or 407/502/400/503) for a refused CONNECT or plain-HTTP request."""
    status = _STATUS.get(d.reason, 403)
    body: dict[str, Any] = {
        "error": "blocked by egress-guard",
        "host": d.host,
        "port": d.port,
        "reason": d.reason,
        "hint": d.hint,
    }
    if d.detail:
        body["detail"] = d.detail
    headers = {**_headers(d), "Connection": "close"}
    if status == 407:
        headers["Proxy-Authenticate"] = 'Basic realm="egress-guard"'
    return http.Response.make(status, json.dumps(body).encode() + b"\n", headers)


def provider_block_response(d: Decision, kind: ApiKind | None) -> http.Response:
    """403 (503 ``buffer_budget``) in the error shape of the provider API the request
    was made to."""
    status = 503 if d.reason == "buffer_budget" else 403
    message = f"egress-guard: {d.reason.replace('_', ' ')}"
    if d.hint:
        message += f" ({d.hint})"
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
    return http.Response.make(status, json.dumps(body).encode() + b"\n", _headers(d))
