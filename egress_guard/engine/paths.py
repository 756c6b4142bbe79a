"""One spelling of a request path for method/path/model rules, or a refusal.

Path rules and the model check read the path; the upstream reads it too, and servers
differ in what they make of it: they percent-decode (``/v1/chat/%63ompletions``), merge
slashes (``/v1/chat//completions``), resolve dot segments (``/v1/../admin``), drop
``;params`` (Tomcat, Spring), treat ``\\`` as ``/`` (IIS). A rule checked on one spelling
and served on another is a bypass, so rules are checked on the decoded path, and any
spelling whose meaning depends on the server is refused rather than guessed.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes


class AmbiguousPath(ValueError):
    """A path that different servers would read differently."""


#: escapes whose decoding changes the path's structure or hides another escape
_STRUCTURAL = re.compile(r"%(?:2[fF]|5[cC]|25|3[fF]|23|3[bB])")


def canonical_path(raw: str) -> str:
    """The path part of a request target, percent-decoded; raises AmbiguousPath.

    The query string is not part of the result (rules are on paths); it is not checked
    either, since servers do not route on it.
    """
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise AmbiguousPath(f"path {path[:80]!r} does not start with '/'")
    if "\\" in path or ";" in path:
        raise AmbiguousPath("path contains '\\' or ';', which servers read differently")
    if m := _STRUCTURAL.search(path):
        raise AmbiguousPath(f"path encodes a delimiter ({m.group()})")
    try:
        text = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise AmbiguousPath("path does not decode to UTF-8") from None
    if "%" in text:
        raise AmbiguousPath("path has a '%' that is not an escape")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise AmbiguousPath("path contains control characters or spaces")
    segments = text.split("/")[1:]
    if any(s in ("", ".", "..") for s in segments[:-1]) or segments[-1] in (".", ".."):
        raise AmbiguousPath("path has empty or dot segments")
    return text
