"""Secrets out of everything the guard writes: the audit log, human log lines, 403s.

Clients put credentials in places a proxy sees: a query string (``?key=...``), path
parameters (``;jsessionid=...``), an encoded query (``/x%3Fkey=...``, which a server that
decodes the path reads as a query), userinfo in an absolute URL
(``http://user:pw@host/``), in a CONNECT target or in a Host header
(``Host: user:pw@api.test``). The rules, one per kind of field (docs/audit-log.md):

``path(p)``
    cut at the first ``?``, ``#`` or ``;``, or at the first percent-encoding of one of
    them, in any case and however often the ``%`` itself is encoded (``%3F``, ``%3f``,
    ``%23``, ``%3B``, ``%253F`` ...); an absolute-form or ``//`` authority loses its
    userinfo (everything up to its last ``@``).
``host(h)``
    a host or authority as the client wrote it: the same cut, and no userinfo.
``text(t)``
    free text that may quote client input (details, errors, log lines): each
    ``?query``, ``%3F...``, ``#fragment``, ``;params`` glued to a word is replaced by a
    marker (``?<query removed>``...), and userinfo goes wherever it stands before a host:
    after ``scheme://``, or at the start of a word when what follows the ``@`` looks like
    a host (has a ``.``, ``:`` or ``[``), e.g. ``'user:pw@api.test'``. A lone ``?``
    ending a sentence, a model name such as ``claude-3-5-sonnet@20240620`` and the
    markers themselves are left alone (scrubbing twice changes nothing).
"""

from __future__ import annotations

import re
from typing import Final

#: where a path (or an authority written by a client) stops being kept: a query,
#: fragment or parameter delimiter, raw or percent-encoded (once or more: ``%25`` is ``%``)
_CUT: Final = re.compile(r"[?#;]|%(?:25)*(?:3[fFbB]|23)")

QUERY_MARK: Final = "?<query removed>"
ENCODED_MARK: Final = "%3F<query removed>"
FRAGMENT_MARK: Final = "#<fragment removed>"
PARAMS_MARK: Final = ";<params removed>"
USERINFO_MARK: Final = "<userinfo removed>@"

#: a delimiter glued to the word before it (``/x?k=v``, not ``really?``), through to the
#: end of the word; the markers themselves are not matched again
_TEXT_QUERY: Final = re.compile(
    r"(?<=[^\s'\"<>(\[])"
    r"(?:(?P<q>\?)(?!<query removed>)"
    r"|(?P<e>%(?:25)*(?:3[fF]|23|3[bB]))(?!<)"
    r"|(?P<f>#)(?!<fragment removed>)"
    r"|(?P<p>;)(?!<params removed>))"
    r"(?P<rest>[^\s'\"]+)"
)
_URL_USERINFO: Final = re.compile(r"(?<=://)(?!<userinfo removed>@)[^\s'\"/?#<>]*@")
#: userinfo (up to a word's last ``@``: userinfo may hold more) at the start of a word,
#: before something that looks like a host
_WORD_USERINFO: Final = re.compile(
    r"(?:^|(?<=[\s'\"(\[=,]))[^\s'\"/?#<>\[\]]+@(?=\[|[^\s'\"@/]*[.:])"
)


def path(p: str | None) -> str | None:
    """A request path (origin- or absolute-form) with no query, fragment, parameters,
    encoded delimiters or userinfo."""
    if p is None:
        return None
    scheme, sep, rest = p.partition("//")
    if sep and (scheme == "" or (scheme.endswith(":") and "/" not in scheme)):
        # absolute-form (scheme://) or scheme-relative (//): the authority runs to the
        # first "/" and loses its userinfo; a delimiter inside it is cut below
        authority, slash, tail = rest.partition("/")
        p = f"{scheme}//{authority.rpartition('@')[2]}{slash}{tail}"
    m = _CUT.search(p)
    return p if m is None else p[: m.start()]


def host(h: str | None) -> str | None:
    """A host or authority as written by a client: no userinfo, nothing after a
    query, fragment or parameter delimiter."""
    if h is None:
        return None
    m = _CUT.search(h)
    if m is not None:
        h = h[: m.start()]
    return h.rpartition("@")[2]


def _text_query(m: re.Match[str]) -> str:
    if m.group("q"):
        return QUERY_MARK
    if m.group("e"):
        return ENCODED_MARK
    if m.group("f"):
        return FRAGMENT_MARK
    return PARAMS_MARK


def text(t: str | None) -> str | None:
    """Free text that may quote client input, with the secrets it may carry replaced
    by markers."""
    if t is None:
        return None
    if "@" in t:
        t = _URL_USERINFO.sub(USERINFO_MARK, t)
        t = _WORD_USERINFO.sub(USERINFO_MARK, t)
    return _TEXT_QUERY.sub(_text_query, t)
