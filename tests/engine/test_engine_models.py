"""Which model a provider request asks for: table-driven over the known API shapes, the
spellings servers also route (any case, trailing slash), and the refusals."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from egress_guard.engine import Decision, Engine, Match
from egress_guard.engine.models import ModelUnknown, api_kind, requested_models
from egress_guard.engine.rules.addresses import decide_addresses
from egress_guard.engine.rules.names import decide_target
from egress_guard.engine.rules.requests import check_model_body, check_request

BODY = b'{"model": "m-body"}'

MODEL_CALLS = [
    # (path, body, kind, model)
    ("/v1/chat/completions", BODY, "openai", "m-body"),
    ("/v1/Chat/Completions", BODY, "openai", "m-body"),
    ("/v1/chat/completions/", BODY, "openai", "m-body"),
    ("/zen/v1/responses", BODY, "openai", "m-body"),
    ("/api/v1/embeddings", BODY, "openai", "m-body"),
    ("/v1/messages", BODY, "anthropic", "m-body"),
    ("/v1/MESSAGES", BODY, "anthropic", "m-body"),
    ("/v1/messages/count_tokens", BODY, "anthropic", "m-body"),
    ("/v1beta/models/gemini-x:generateContent", None, "gemini", "gemini-x"),
    ("/v1beta/models/gemini-x:GenerateContent", None, "gemini", "gemini-x"),
    ("/v1beta/models/gemini-x:streamGenerateContent/", None, "gemini", "gemini-x"),
    ("/v1beta/models/gemini-x:batchGenerateContent", None, "gemini", "gemini-x"),
    ("/v1beta/models/text-emb:batchEmbedContents", None, "gemini", "text-emb"),
    ("/v1beta/tunedModels/my-tune:generateContent", None, "gemini", "my-tune"),
    (
        "/v1/projects/p/locations/l/publishers/anthropic/models/claude-x:streamRawPredict",
        BODY,
        "gemini",
        "claude-x",
    ),
    ("/model/anthropic.claude-v2:1/converse-stream", BODY, "anthropic", "anthropic.claude-v2:1"),
    ("/model/amazon.titan/invoke", BODY, "anthropic", "amazon.titan"),
    # Azure: the deployment picks the model; the body's "model" is not what runs
    ("/openai/deployments/gpt-4o-big/chat/completions", BODY, "openai", "gpt-4o-big"),
]


@pytest.mark.parametrize(("path", "body", "kind", "model"), MODEL_CALLS)
def test_model_calls(path: str, body: bytes | None, kind: str, model: str) -> None:
    assert api_kind(path) == kind
    named = requested_models(path + "?alt=sse", body)
    assert named is not None and named[0].model == model


@pytest.mark.parametrize(
    "path", ["/v1/models", "/v1/messages/batches", "/v1/batches", "/v1/files", "/healthz"]
)
def test_not_model_calls(path: str) -> None:
    assert api_kind(path) is None
    assert requested_models(path, BODY) is None


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b"not json"),
        ("/v1/chat/completions", b'{"messages": []}'),
        ("/v1/chat/completions", b'{"model": 7}'),
        ("/v1/chat/completions", b'{"model": "ok", "model": "evil"}'),
        ("/v1/messages", b"[]"),
        ("/v1beta/models/x%2Fy:generateContent", None),
    ],
)
def test_unreadable_model_is_refused(path: str, body: bytes | None) -> None:
    with pytest.raises(ModelUnknown):
        requested_models(path, body)


def llm_allowed(make_engine: Callable[..., Engine]) -> tuple[Engine, Match, Decision]:
    """An engine whose destination ``llm`` lists models, and an allowed target on it."""
    eng = make_engine(
        "version: 1\ndestinations:\n  - name: llm\n    hosts: [api.example.com]\n    models: [m1]\n"
    )
    m = decide_target(eng.compiled, "api.example.com", 443)
    assert isinstance(m, Match)
    return eng, m, decide_addresses(eng.compiled, m, [ipaddress.ip_address("93.184.216.34")])


@pytest.mark.parametrize(
    ("method", "path", "refused"),
    [
        ("POST", "/v1/messages/batches", True),  # each request names its own model
        ("POST", "/v1/batches", True),
        ("PUT", "/v1/something", True),
        ("patch", "/v1/something", True),
        ("GET", "/v1/models", False),
        ("DELETE", "/v1/files/f1", False),
        ("POST", "/v1/messages", False),  # a model call: decided once the body is read
    ],
)
def test_requests_with_a_body_to_unknown_paths_are_refused_when_models_are_listed(
    make_engine: Callable[..., Engine], method: str, path: str, refused: bool
) -> None:
    _eng, m, ok = llm_allowed(make_engine)
    d = check_request(m.destination, method, path, None, ok)
    if refused:
        assert isinstance(d, Decision) and d.reason == "model_not_allowed" and not d.allowed
    else:
        assert d is None


@pytest.mark.parametrize(
    ("method", "length", "chunked", "detail"),
    [
        ("POST", "1000", False, None),  # within the limit: held whole, then checked
        ("POST", "1001", False, "a body of 1001 bytes is larger than --max-model-body (1000)"),
        ("POST", None, True, "a body of unknown length (Transfer-Encoding) cannot be"),
        ("POST", "10", True, "a body of unknown length (Transfer-Encoding) cannot be"),
        ("post", None, False, "a body without Content-Length cannot be checked"),
        ("PUT", None, False, "a body without Content-Length cannot be checked"),
        ("GET", None, False, None),  # no body to hold
        ("POST", "+5", False, "an invalid Content-Length"),
        ("POST", "1e3", False, "an invalid Content-Length"),
    ],
)
def test_model_body_must_declare_a_length_within_the_limit(
    make_engine: Callable[..., Engine],
    method: str,
    length: str | None,
    chunked: bool,
    detail: str | None,
) -> None:
    _eng, m, ok = llm_allowed(make_engine)
    d = check_model_body(m.destination, ok, method, length, chunked, 1000)
    if detail is None:
        assert d is None
    else:
        assert d is not None and not d.allowed and d.reason == "model_not_allowed"
        assert d.detail is not None and d.detail.startswith(detail)
        assert "--max-model-body" in (d.hint or "") and "'llm' allows models" in (d.hint or "")
