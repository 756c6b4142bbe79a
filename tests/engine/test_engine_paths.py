"""Request paths for method/path/model rules: one decoded spelling, or a refusal.

Table-driven for the spellings servers disagree on, and a property: a path that a rule
refuses (or a model call the model check must see) keeps that outcome in every
percent-encoding of its characters.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress_guard.engine.models import api_kind
from egress_guard.engine.paths import AmbiguousPath, canonical_path

CANONICAL = [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/chat/completions?x=%2F..%2F", "/v1/chat/completions"),  # the query is not routed on
    ("/v1/chat/%63ompletions", "/v1/chat/completions"),
    ("/v1/chat/%43ompletions", "/v1/chat/Completions"),
    ("/v1beta/models/gemini-pro%3AgenerateContent", "/v1beta/models/gemini-pro:generateContent"),
    ("/model/anthropic.claude-v2%3A1/invoke", "/model/anthropic.claude-v2:1/invoke"),
    ("/v1/models/", "/v1/models/"),
    ("/", "/"),
    ("/caf%C3%A9", "/café"),
]

AMBIGUOUS = [
    ("v1/chat/completions", "does not start"),
    ("*", "does not start"),
    ("/v1/chat//completions", "empty or dot"),
    ("//v1/chat/completions", "empty or dot"),
    ("/v1/./chat/completions", "empty or dot"),
    ("/v1/x/../chat/completions", "empty or dot"),
    ("/v1/%2e%2e/admin", "empty or dot"),
    ("/v1/chat/completions/..", "empty or dot"),
    ("/v1/chat%2Fcompletions", "delimiter"),
    ("/v1/chat%2fcompletions", "delimiter"),
    ("/v1/chat%5Ccompletions", "delimiter"),
    ("/v1/chat/%2563ompletions", "delimiter"),  # double encoding
    ("/v1/chat/completions%3Fx", "delimiter"),
    ("/v1/chat/completions%23x", "delimiter"),
    ("/v1/chat/completions%3Bx", "delimiter"),
    ("/v1/chat/completions;x", "';'"),
    ("/v1\\chat\\completions", "';'"),
    ("/v1/chat/completions%20", "control"),
    ("/v1/chat/completions%00", "control"),
    ("/v1/chat/completions%7F", "control"),
    ("/v1/%zz", "not an escape"),
    ("/v1/%ff", "UTF-8"),
]


@pytest.mark.parametrize(("raw", "expected"), CANONICAL)
def test_canonical(raw: str, expected: str) -> None:
    assert canonical_path(raw) == expected


@pytest.mark.parametrize(("raw", "why"), AMBIGUOUS)
def test_ambiguous_is_refused(raw: str, why: str) -> None:
    with pytest.raises(AmbiguousPath, match=why):
        canonical_path(raw)


def _spellings(path: str, draw: st.DrawFn) -> str:
    """``path`` with a random choice of its characters percent-encoded (either case)."""
    out = []
    for ch in path:
        if ch != "/" and draw(st.booleans()):
            esc = "".join(f"%{b:02X}" for b in ch.encode())
            out.append(esc.lower() if draw(st.booleans()) else esc)
        else:
            out.append(ch)
    return "".join(out)


@st.composite
def spelled(draw: st.DrawFn) -> tuple[str, str]:
    path = draw(
        st.sampled_from(
            [
                "/v1/chat/completions",
                "/v1/messages",
                "/v1/responses",
                "/v1beta/models/gemini-evil:generateContent",
                "/admin/keys",
            ]
        )
    )
    return path, _spellings(path, draw)


@settings(max_examples=300, deadline=None)
@given(spelled())
def test_every_spelling_reads_as_the_same_path(pair: tuple[str, str]) -> None:
    plain, spelling = pair
    try:
        got = canonical_path(spelling)
    except AmbiguousPath:
        return  # refused: also safe
    assert got == plain
    assert api_kind(got) == api_kind(plain)  # a model call stays a model call
