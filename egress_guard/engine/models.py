"""Which model an LLM API request asks for, read from the request as it would be served.

Only the request shapes of known provider APIs are read. A destination with a ``models``
list refuses a model call whose model cannot be read; it also refuses requests other
than GET, HEAD, OPTIONS and DELETE to paths that are not a known model endpoint (batch
APIs, an unfamiliar spelling, a provider this table does not know), and protocol
upgrades (WebSocket realtime APIs stream model work in frames no HTTP rule sees): a
model check that an unfamiliar request can skip is no check.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Literal, NamedTuple
from urllib.parse import parse_qsl

ApiKind = Literal["openai", "anthropic", "gemini"]

_I = re.IGNORECASE  # servers such as Express route case-insensitively, with or without "/"

#: Endpoints that name the model in the path, checked first: (pattern, error format).
#: Gemini and Vertex AI (``publishers/*/models/X:verb``, also Anthropic-on-Vertex's
#: rawPredict), Bedrock (``/model/X/converse``), Azure OpenAI (the deployment picks the
#: model; a ``model`` in the body is ignored by Azure, so it is not what is checked).
_PATH_MODEL: list[tuple[re.Pattern[str], ApiKind]] = [
    (
        re.compile(
            r"/(?:tuned)?models/(?P<model>[^/:]+):(?:generateContent|streamGenerateContent|"
            r"countTokens|embedContent|batchGenerateContent|batchEmbedContents|predict|"
            r"predictLongRunning|rawPredict|streamRawPredict)/?$",
            _I,
        ),
        "gemini",
    ),
    (
        re.compile(
            r"/model/(?P<model>[^/]+)/(?:invoke|invoke-with-response-stream|converse|"
            r"converse-stream|count-tokens)/?$",
            _I,
        ),
        "anthropic",
    ),
    (re.compile(r"/openai/deployments/(?P<model>[^/]+)/", _I), "openai"),
]
#: Endpoints whose JSON body names the model.
#: OpenAI-compatible (also Groq, Together, Fireworks, Mistral, Ollama, LM Studio, Zen...)
_OPENAI = re.compile(r"/(?:chat/completions|completions|responses|embeddings)/?$", _I)
_ANTHROPIC = re.compile(r"/v1/messages(?:/count_tokens)?/?$", _I)


#: methods that do not start model work; on a destination with ``models`` every other
#: request (POST, PUT, PATCH, CONNECT for HTTP/2 WebSockets, ...) must be a model call
#: the guard can read
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


#: default for --max-model-body: the largest request body held whole to read its model
#: (LLM requests with images run to tens of MB)
DEFAULT_MAX_MODEL_BODY = 64 * 1024 * 1024


def api_kind(path: str) -> ApiKind | None:
    """The provider API a request path belongs to, or None when it is not a model call."""
    bare = path.split("?", 1)[0]
    for pattern, kind in _PATH_MODEL:
        if pattern.search(bare):
            return kind
    if _ANTHROPIC.search(bare):
        return "anthropic"
    if _OPENAI.search(bare):
        return "openai"
    return None


class ModelUnknown(ValueError):
    """A model endpoint whose request does not say (readably, unambiguously) which
    models it may run."""


class NamedModel(NamedTuple):
    """One model a request may run, and the field of the request that names it."""

    model: str
    field: str  # "model", "models[1]", "fallbacks[0].model", "tools[2].parameters.model", ...


#: body keys (top level) whose value selects a model, read as the provider reads them
_SELECTORS = frozenset({"model", "models", "fallbacks", "context_window_fallback_dict"})
#: body keys (top level) the reader also looks into or refuses: their spelling must be
#: the one it reads, or a server that folds case would read a value the guard did not
_READ_KEYS = _SELECTORS | {"route", "preset", "tools", "user_config"}
#: keys inside a ``tools`` entry (and its ``parameters``) the reader looks at
_TOOL_KEYS = frozenset({"model", "type", "parameters"})
#: a key whose folded spelling contains one of these names a model (or a way to another)
_MODELISH = ("model", "fallback")
#: request headers that select models on gateways: Portkey's config (a JSON config
#: with ``targets[].override_params.model``, or the id of a stored one)
_SELECTOR_HEADERS = frozenset({"x-portkey-config"})
#: server tools that run a model chosen at run time unless the tool names it
_RUNTIME_MODEL_TOOLS = ("advisor", "subagent", "fusion")


def requested_models(
    path: str,
    body: bytes | None,
    *,
    headers: Iterable[str] = (),
    query: str = "",
    content_type: Sequence[str] = (),
) -> tuple[NamedModel, ...] | None:
    """Every model a request may run, the one it asks for first; None when the path is
    not a model call.

    Besides ``model``, a request may name models that gateways fall back to or route
    to (OpenRouter's ``models`` and ``route``, LiteLLM's ``fallbacks`` and
    ``context_window_fallback_dict``, model-running server tools such as OpenRouter's
    and Anthropic's advisor or OpenAI's image generation); all are returned, so that
    each can be checked. Raises ModelUnknown when the request is unreadable or could be
    read as naming another model than the guard reads: a body that is not strict UTF-8
    JSON (BOM, NaN, duplicate keys, too deep), a key spelled like a model-selecting key
    but not as the guard reads it (``Model``, ``model ``, the Kelvin sign in
    ``fallbacKs``: servers that match keys case-insensitively, like Go's encoding/json,
    read those), a model-selecting field whose value is not a model name, a stored
    configuration that picks models (OpenRouter ``preset``, Portkey's config header),
    a query parameter or header that names models, a ``Content-Type`` other than
    JSON (gateways such as LiteLLM's proxy read a body as a form when the header merely
    contains ``form``, and a JSON body can be a form naming another model).
    """
    bare = path.split("?", 1)[0]
    kind = api_kind(bare)
    if kind is None:
        return None
    for name in headers:
        folded = _fold(name)
        if folded in _SELECTOR_HEADERS or any(w in folded for w in _MODELISH):
            raise ModelUnknown(f"header {_show(name)} can select another model")
    for name, _value in parse_qsl(query, keep_blank_values=True):
        if any(w in _fold(name) for w in _MODELISH):
            raise ModelUnknown(f"query parameter {_show(name)} can select a model")
    _check_content_type(content_type)
    path_model: NamedModel | None = None
    for pattern, _kind in _PATH_MODEL:
        m = pattern.search(bare)
        if m is not None:
            model = m.group("model")
            if "%" in model or not model:
                raise ModelUnknown(f"cannot read the model in {bare!r}")
            path_model = NamedModel(model, "path")
            break
    if path_model is not None and not body:
        return (path_model,)
    data = _strict_json(body or b"")
    if not isinstance(data, dict):
        raise ModelUnknown("request body is not a JSON object")
    if path_model is not None:
        # the path names the model (Azure ignores a body "model"); gateways serving
        # these paths may still read fallback fields from the body
        return (path_model, *_body_models(data, top_model=False))
    return _body_models(data, top_model=True)


def _body_models(data: dict[str, object], *, top_model: bool) -> tuple[NamedModel, ...]:
    """The models a JSON body's top level names; ``top_model`` when its ``model`` is
    the one the request asks for (it must be there), rather than the path's."""
    out: list[NamedModel] = []
    for key, value in data.items():
        folded = _fold(key)
        _refuse_misspelt(key, folded, _READ_KEYS)
        if key == "model":
            if not top_model:  # LiteLLM's Gemini routes take a body model over the path's
                out.extend(_model_list(value, key, single=True))
            continue
        if key in ("models", "fallbacks"):
            out.extend(_model_list(value, key))
        elif key == "context_window_fallback_dict":
            if not isinstance(value, dict) or not all(
                isinstance(v, str) and v for v in value.values()
            ):
                raise ModelUnknown(f"{key!r} must map model names to model names")
            out.extend(NamedModel(v, f"{key}[{k!r}]") for k, v in value.items())
        elif key == "route":
            if value != "fallback" or "models" not in data:
                raise ModelUnknown(
                    "'route' without a 'models' list lets the gateway pick the model"
                )
        elif key == "preset":
            raise ModelUnknown("'preset' selects a stored configuration that can pick models")
        elif key == "user_config":
            raise ModelUnknown("'user_config' configures a router (LiteLLM) that picks models")
        elif key == "tools":
            if top_model:
                out.extend(_tool_models(value))
        elif top_model and any(w in folded for w in _MODELISH):
            out.extend(_model_list(value, key, single=True))
    if top_model:
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise ModelUnknown("request body has no 'model' string")
        out.insert(0, NamedModel(model, "model"))
    return tuple(out)


def _refuse_misspelt(
    key: str, folded: str, read_keys: AbstractSet[str], where: str | None = None
) -> None:
    """Refuse a key that folds to one the guard reads without being spelled that way:
    servers such as Go's encoding/json match keys case-insensitively and would read it
    as that key, naming a model the guard never saw."""
    if folded in read_keys and key != folded:
        inside = f" in {_show(where)}" if where is not None else ""
        raise ModelUnknown(
            f"key {_show(key)}{inside} can be read as {folded!r} (servers such as Go's "
            "encoding/json match keys case-insensitively)"
        )


def _model_list(value: object, field: str, *, single: bool = False) -> list[NamedModel]:
    """Models named by a fallback-style field: a string (when ``single``), or a list of
    strings or of objects with a ``model`` string (LiteLLM, OpenRouter's Anthropic
    endpoint, other gateways)."""
    if single and isinstance(value, str) and value:
        return [NamedModel(value, field)]
    if not isinstance(value, list):
        raise ModelUnknown(f"{_show(field)} is not a list of model names")
    out: list[NamedModel] = []
    for i, entry in enumerate(value):
        where = f"{field}[{i}]"
        if isinstance(entry, str) and entry:
            out.append(NamedModel(entry, where))
        elif isinstance(entry, dict):
            found = _object_models(entry, where)
            if not any(n.field == f"{where}.model" for n in found):
                raise ModelUnknown(f"{_show(where)} names no model")
            out.extend(found)
        else:
            raise ModelUnknown(f"{_show(where)} is not a model name")
    return out


def _object_models(obj: dict[str, object], where: str) -> list[NamedModel]:
    """Models an object inside a model-selecting field names: its ``model`` and any
    other key that looks like one; a key spelled like ``model`` but not as read is
    refused."""
    out: list[NamedModel] = []
    for key, value in obj.items():
        folded = _fold(key)
        _refuse_misspelt(key, folded, _TOOL_KEYS, where)
        if key == "model":
            if not isinstance(value, str) or not value:
                raise ModelUnknown(f"{_show(where + '.model')} is not a model name")
            out.append(NamedModel(value, f"{where}.model"))
        elif key != "parameters" and any(w in folded for w in _MODELISH):
            out.extend(_model_list(value, f"{where}.{key}", single=True))
    return out


def _tool_models(tools: object) -> list[NamedModel]:
    """Models that server tools run: OpenRouter's ``openrouter:advisor`` (and other
    server tools) name it in ``parameters.model``, Anthropic's advisor and OpenAI's
    image generation in ``model``. An advisor-like tool that names none runs a model
    chosen at run time, so it is refused."""
    if isinstance(tools, dict):
        tools = [tools]  # a lenient reader may take one tool for a list of one
    if not isinstance(tools, list):
        return []  # not tools: the provider refuses it
    out: list[NamedModel] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            continue
        where = f"tools[{i}]"
        found = _object_models(tool, where)
        params = tool.get("parameters")
        if isinstance(params, dict):
            found += _object_models(params, f"{where}.parameters")
        kind = tool.get("type")
        if (
            not found
            and isinstance(kind, str)
            and any(w in _fold(kind) for w in _RUNTIME_MODEL_TOOLS)
        ):
            raise ModelUnknown(f"{where} ({_show(kind)}) runs a model chosen at run time; name it")
        out.extend(found)
    return out


def _check_content_type(values: Sequence[str]) -> None:
    """A model call's body is read as JSON: its Content-Type, if any, must say JSON and
    nothing a server could read otherwise (one header, ``application/json``, at most a
    UTF-8 charset)."""
    if not values:
        return
    if len(values) > 1:
        raise ModelUnknown("more than one Content-Type header")
    media, *params = values[0].split(";")
    if media.strip().lower() != "application/json" or any(
        p.strip().lower().replace('"', "") not in ("charset=utf-8", "") for p in params
    ):
        raise ModelUnknown(
            f"Content-Type {_show(values[0])}: a model call's body must be sent as "
            "application/json (a server may read other types, such as forms, differently)"
        )


def _strict_json(body: bytes) -> object:
    """The body parsed as only strict JSON: UTF-8 without a BOM (Python would also take
    UTF-16 and a BOM, Go takes neither), no NaN or Infinity, no key twice in an object
    (first-wins and last-wins parsers would run different models), nesting within the
    parser's recursion limit."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelUnknown(f"request body is not UTF-8: {e}") from e
    if text.startswith("\ufeff"):
        raise ModelUnknown("request body starts with a byte order mark")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except RecursionError as e:  # the parser's nesting limit (about 1000 levels)
        raise ModelUnknown("request body nests too deep") from e
    except ValueError as e:
        raise ModelUnknown(f"request body is not readable JSON: {e}") from e


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """Two ``model`` keys would let the guard read one and the provider the other."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {_show(k)}")
        out[k] = v
    return out


def _fold(key: str) -> str:
    """A key as the most lenient reader could match it: compatibility forms, full case
    folding (which also maps the Kelvin sign to k and the long s to s, as Go's
    EqualFold does), without whitespace, control, format and combining characters (so
    also without accents)."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", key).casefold())
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c)[0] not in "CZM")


def _show(text: str) -> str:
    """Untrusted text quoted for a refusal's detail: bounded, ASCII, escapes visible."""
    return ascii(text[:80])
