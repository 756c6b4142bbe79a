"""Which model an LLM API request asks for, read from the request as it would be served.

Only the request shapes of known provider APIs are read; for anything else the model is
unknown (None) and a destination with a ``models`` list refuses it on a model endpoint,
because a model check that can be skipped by an unfamiliar spelling is no check.
"""

from __future__ import annotations

import json
import re
from typing import Literal

ApiKind = Literal["openai", "anthropic", "gemini"]

#: OpenAI-compatible (also Groq, Together, Fireworks, Mistral, Ollama, LM Studio, Zen...)
_OPENAI = re.compile(r"/(?:chat/completions|completions|responses|embeddings)/?$")
_ANTHROPIC = re.compile(r"/v1/messages(?:/count_tokens)?/?$")
_GEMINI = re.compile(
    r"/models/(?P<model>[^/:]+):(?:generateContent|streamGenerateContent|countTokens|embedContent)$"
)


def api_kind(path: str) -> ApiKind | None:
    """The provider API a request path belongs to, or None when it is not a model call."""
    bare = path.split("?", 1)[0]
    if _GEMINI.search(bare):
        return "gemini"
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
    kind = api_kind(bare)
    if kind is None:
        return None
    if kind == "gemini":
        m = _GEMINI.search(bare)
        assert m is not None
        model = m.group("model")
        if "%" in model or not model:
            raise ModelUnknown(f"cannot read the model in {bare!r}")
        return model
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
