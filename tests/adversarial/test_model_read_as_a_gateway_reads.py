"""The model allowlist against a gateway that reads requests its own way.

LiteLLM's proxy (an OpenAI-, Anthropic- and Gemini-compatible gateway many teams put in
front of providers) decides the model it runs differently from a plain JSON reader:

* ``_read_request_body`` parses the body as a *form* whenever the Content-Type header
  contains ``form`` (``application/x-www-form-urlencoded``, ``multipart/form-data``, or
  only a parameter spelled so), else as JSON. A body that is valid JSON naming an allowed
  model can be a form naming another: ``{"model":"good-model","x":"&model=evil&"}``.
* its Gemini endpoints (``/v1beta/models/{model}:generateContent``) take the path's model
  only ``if "model" not in data``: a body ``model`` wins over the path's.
* ``route_request`` builds a router from a request's ``user_config``
  (``model_list[].litellm_params.model``) and lets it pick the deployment.

The upstream here reads like that and reports the models it ran; every one must be on the
allowlist, or the guard must refuse the request (nothing reaches the upstream).
"""

from __future__ import annotations

import http.server
import json
import re
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import trustme
from adversarial.test_model_key_collision import models_policy
from support.proxy import ProxyFactory, guard_ca

ALLOWED = {"good-model", "gemini-ok"}
_GEMINI = re.compile(r"/models/([^/:]+):(?:generateContent|streamGenerateContent)$")


class GatewayLike(http.server.BaseHTTPRequestHandler):
    """Reads a model call as LiteLLM's proxy does; answers 200 with the models it ran."""

    protocol_version = "HTTP/1.1"
    ran: list[str]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ctype = self.headers.get("content-type", "")
        data: dict[str, Any]
        if "form" in ctype:  # litellm.proxy.common_utils.http_parsing_utils
            data = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        else:
            data = json.loads(body)
        path = self.path.split("?", 1)[0]
        m = _GEMINI.search(path)
        if m and "model" not in data:  # litellm/proxy/google_endpoints/endpoints.py
            data["model"] = m.group(1)
        models = [str(data.get("model"))]
        if isinstance(data.get("user_config"), dict):  # route_llm_request.route_request
            for dep in data["user_config"].get("model_list", []):
                if dep.get("model_name") == models[0]:
                    models = [dep["litellm_params"]["model"]]
        self.server.ran.extend(models)  # type: ignore[attr-defined]
        out = json.dumps({"ran": models}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Gateway:
    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GatewayLike)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "http" if tls is None else "https"
        self.server.daemon_threads = True
        self.ran: list[str] = []
        self.server.ran = self.ran  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["plain-http", "inspected-tunnel"])
def gateway(request: pytest.FixtureRequest, ca: trustme.CA) -> Iterator[Gateway]:
    tls = None
    if request.param == "inspected-tunnel":
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("api.test").configure_cert(tls)
    g = Gateway(tls)
    try:
        yield g
    finally:
        g.close()


#: (path, content-type, body): each is JSON naming an allowed model to a plain JSON reader
CASES = {
    "form-urlencoded": (
        "/v1/chat/completions",
        "application/x-www-form-urlencoded",
        b'{"model":"good-model","x":"&model=evil-model&"}',
    ),
    "form-in-a-parameter": (
        "/v1/chat/completions",
        'application/json; profile="form"',
        b'{"model":"good-model","x":"&model=evil-model&"}',
    ),
    "form-in-a-charset": (
        "/v1/messages",
        "application/json; charset=form",
        b'{"model":"good-model","x":"&model=evil-model&"}',
    ),
    "body-model-over-gemini-path": (
        "/v1beta/models/gemini-ok:generateContent",
        "application/json",
        b'{"model":"evil-model","contents":[{"parts":[{"text":"hi"}]}]}',
    ),
    "user-config-router": (
        "/v1/chat/completions",
        "application/json",
        json.dumps(
            {
                "model": "good-model",
                "messages": [],
                "user_config": {
                    "model_list": [
                        {"model_name": "good-model", "litellm_params": {"model": "evil-model"}}
                    ]
                },
            }
        ).encode(),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gateway_runs_only_allowed_models(
    proxy: ProxyFactory, gateway: Gateway, ca_file: Path, case: str
) -> None:
    path, ctype, body = CASES[case]
    if gateway.scheme == "https":
        p = proxy(models_policy(gateway.port), "--inspect", "--upstream-ca", str(ca_file))
        verify: ssl.SSLContext | bool = guard_ca(p)
    else:
        p = proxy(models_policy(gateway.port))
        verify = True
    with httpx.Client(proxy=p.url, verify=verify, trust_env=False, timeout=20) as c:
        r = c.post(
            f"{gateway.scheme}://api.test:{gateway.port}{path}",
            content=body,
            headers={"content-type": ctype},
        )
    assert set(gateway.ran) <= ALLOWED, (
        f"the gateway ran {gateway.ran} (guard said {r.status_code})"
    )
    assert r.status_code == 403, r.text
    assert r.headers["x-egress-guard-reason"] == "model_not_allowed"


@pytest.mark.parametrize(
    ("path", "ctype", "body"),
    [
        ("/v1/chat/completions", "application/json", b'{"model":"good-model","messages":[]}'),
        ("/v1/messages", "application/json; charset=utf-8", b'{"model":"good-model"}'),
        ("/v1/messages", 'Application/JSON; Charset="UTF-8"', b'{"model":"good-model"}'),
        ("/v1beta/models/gemini-ok:generateContent", "application/json", b'{"contents":[]}'),
        (
            "/v1beta/models/gemini-ok:generateContent",
            "application/json",
            b'{"model":"gemini-ok","contents":[]}',
        ),
    ],
)
def test_plain_json_model_calls_still_pass(
    proxy: ProxyFactory, gateway: Gateway, ca_file: Path, path: str, ctype: str, body: bytes
) -> None:
    if gateway.scheme == "https":
        p = proxy(models_policy(gateway.port), "--inspect", "--upstream-ca", str(ca_file))
        verify: ssl.SSLContext | bool = guard_ca(p)
    else:
        p = proxy(models_policy(gateway.port))
        verify = True
    with httpx.Client(proxy=p.url, verify=verify, trust_env=False, timeout=20) as c:
        r = c.post(
            f"{gateway.scheme}://api.test:{gateway.port}{path}",
            content=body,
            headers={"content-type": ctype},
        )
    assert r.status_code == 200, r.text
    assert set(gateway.ran) <= ALLOWED
