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
from typing import Literal

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
    """A model endpoint whose request does not say (readably) which model it wants."""


def requested_model(path: str, body: bytes | None) -> str | None:
    """The model a request asks for; None when the path is not a model call.

    Raises ModelUnknown for a model call whose model cannot be read (not JSON, no
    ``model`` string, a path-encoded model that is not plain text).
    """
    bare = path.split("?", 1)[0]
    for pattern, _kind in _PATH_MODEL:
        m = pattern.search(bare)
        if m is not None:
            model = m.group("model")
            if "%" in model or not model:
                raise ModelUnknown(f"cannot read the model in {bare!r}")
            return model
    if api_kind(bare) is None:
        return None
    try:
        data = json.loads(body or b"", object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelUnknown(f"request body is not readable JSON: {e}") from e
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str) or not model:
        raise ModelUnknown("request body has no 'model' string")
    return model


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """Two ``model`` keys would let the guard read one and the provider the other."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out
