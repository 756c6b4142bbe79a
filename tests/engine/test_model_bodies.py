"""The model reader over the corpus of tests/testdata/model_bodies: every body that a
provider or gateway could read as running another model than the guard reads is
refused, and every model a body names (fallback lists, model-running server tools) is
returned, so that the engine checks each against the destination's ``models``.

``cases.json`` gives, per file, the request path and what the reader must do: refuse it
(with a part of the detail) or return exactly these models, the requested one first.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from egress_guard.engine import Decision, Engine, Match
from egress_guard.engine.models import ModelUnknown, NamedModel, requested_models
from egress_guard.engine.rules.addresses import decide_addresses
from egress_guard.engine.rules.names import decide_target
from egress_guard.engine.rules.requests import check_request, refuse_model

CORPUS = Path(__file__).parent.parent / "testdata" / "model_bodies"
CASES: dict[str, dict[str, object]] = json.loads((CORPUS / "cases.json").read_text())
ALLOWED = ("good-model", "gemini-ok")


def expected_verdict(case: dict[str, object]) -> bool:
    """Whether a destination with ``models: [good-model, gemini-ok]`` lets it through."""
    expect = case["expect"]
    return isinstance(expect, list) and all(m in ALLOWED for m in expect)


def test_every_file_has_a_case() -> None:
    files = {p.name for p in CORPUS.iterdir() if p.name != "cases.json"}
    assert files == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reader(name: str) -> None:
    case = CASES[name]
    body = (CORPUS / name).read_bytes()
    path = str(case["path"])
    expect = case["expect"]
    if isinstance(expect, dict):
        with pytest.raises(ModelUnknown) as e:
            requested_models(path, body)
        assert str(expect["refused"]) in str(e.value)
        assert str(e.value).isascii() and str(e.value).isprintable()
    else:
        named = requested_models(path, body)
        assert named is not None
        assert [n.model for n in named] == expect


def _engine(make_engine: Callable[..., Engine]) -> tuple[Engine, Match, Decision]:
    eng = make_engine(
        "version: 1\ndestinations:\n  - name: llm\n    hosts: [api.example.com]\n"
        f"    models: [{', '.join(ALLOWED)}]\n"
    )
    m = decide_target(eng.compiled, "api.example.com", 443)
    assert isinstance(m, Match)
    return eng, m, decide_addresses(eng.compiled, m, [ipaddress.ip_address("93.184.216.34")])


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_verdict(make_engine: Callable[..., Engine], name: str) -> None:
    """Reader and engine together, as the addon runs them: every named model must be
    allowed; a refusal names the model and the field that named it."""
    _eng, m, ok = _engine(make_engine)
    case = CASES[name]
    try:
        named = requested_models(str(case["path"]), (CORPUS / name).read_bytes())
    except ModelUnknown as e:
        d: Decision | None = refuse_model(m.destination, ok, str(e))
    else:
        d = check_request(m.destination, "POST", str(case["path"]), named, ok)
    if expected_verdict(case):
        assert d is None
    else:
        assert d is not None and not d.allowed and d.reason == "model_not_allowed"
        assert "'llm' allows models" in (d.hint or "")


def test_refusal_names_the_field_that_named_the_model(
    make_engine: Callable[..., Engine],
) -> None:
    _eng, m, ok = _engine(make_engine)
    named = (NamedModel("good-model", "model"), NamedModel("gpt-evil", "fallbacks[1].model"))
    d = check_request(m.destination, "POST", "/v1/chat/completions", named, ok)
    assert d is not None and d.detail == "model 'gpt-evil' (named in fallbacks[1].model)"
    d = check_request(m.destination, "POST", "/v1/chat/completions", "gpt-evil", ok)
    assert d is not None and d.detail == "model 'gpt-evil'"


@pytest.mark.parametrize(
    ("headers", "query", "detail"),
    [
        (["X-Portkey-Config"], "", "header 'X-Portkey-Config'"),
        (["x-model-override"], "", "header 'x-model-override'"),
        (["X-Fallback-Models"], "", "header 'X-Fallback-Models'"),
        ([], "model=gpt-evil", "query parameter 'model'"),
        ([], "alt=sse&MODELS=gpt-evil", "query parameter 'MODELS'"),
        ([], "mod%65l=gpt-evil", "query parameter 'model'"),
        ([], "fallbac%E2%84%AAs=gpt-evil", "query parameter 'fallbac\\u212as'"),
    ],
)
def test_headers_and_query_parameters_that_select_models_are_refused(
    headers: list[str], query: str, detail: str
) -> None:
    for path, body in [
        ("/v1/chat/completions", b'{"model": "good-model"}'),
        ("/v1beta/models/gemini-ok:generateContent", b"{}"),
    ]:
        with pytest.raises(ModelUnknown) as e:
            requested_models(path, body, headers=headers, query=query)
        assert detail in str(e.value)


def test_ordinary_headers_and_query_pass() -> None:
    headers = ["Content-Type", "Authorization", "anthropic-version", "x-stainless-lang"]
    named = requested_models(
        "/v1beta/models/gemini-ok:streamGenerateContent",
        None,
        headers=headers,
        query="alt=sse&key=k",
    )
    assert named == (NamedModel("gemini-ok", "path"),)
