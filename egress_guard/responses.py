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


def _headers(d: Decision) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Egress-Guard-Decision": "block",
        "X-Egress-Guard-Reason": d.reason,
    }


def block_response(d: Decision) -> http.Response:
    """The 403 (or 407/502) for a refused CONNECT or plain-HTTP request."""
    status = {"proxy_auth_required": 407, "dns_failed": 502, "malformed_request": 400}.get(
        d.reason, 403
    )
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
    """403 in the error shape of the provider API the request was made to."""
    message = f"egress-guard: {d.reason.replace('_', ' ')}"
    if d.hint:
        message += f" ({d.hint})"
    body: dict[str, Any]
    if kind == "anthropic":
        body = {"type": "error", "error": {"type": "permission_error", "message": message}}
    elif kind == "gemini":
        body = {"error": {"code": 403, "message": message, "status": "PERMISSION_DENIED"}}
    else:  # OpenAI-compatible, and the default for anything else inspected
        body = {
            "error": {
                "message": message,
                "type": "permission_error",
                "param": "model" if d.reason == "model_not_allowed" else None,
                "code": d.reason,
            }
        }
    return http.Response.make(403, json.dumps(body).encode() + b"\n", _headers(d))
