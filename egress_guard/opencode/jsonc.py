"""JSONC as OpenCode (1.18) reads opencode.json and opencode.jsonc, with line numbers.

``//`` and ``/* */`` comments outside strings, trailing commas in objects and arrays. A
``//`` inside a string (every URL) is text, not a comment. Duplicate keys: the last one
wins, as in ``JSON.parse``.

Substitutions. OpenCode replaces ``{env:VAR}`` and ``{file:path}`` in the raw text before
parsing, so they may stand inside a string (``"https://{env:HOST}/v1"``) or as a whole
value (``"autoupdate": {env:AU}``). We never resolve them: a policy generated on one
machine must not depend on that machine's environment, and a ``{file:}`` is usually an
API key. Inside a string they stay literal text; as a whole value they parse to a
``Placeholder``. Code that needs the value treats both as unknown and says so.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path as FsPath

from egress_guard.policy.yamlsrc import SourceError

#: where a value sits in the document: keys and list indexes from the top
Path = tuple[str | int, ...]

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 200

_PLACEHOLDER = re.compile(r"\{(env|file):([^{}\r\n]*)\}")


class ConfigError(SourceError):
    """An opencode.json OpenCode would refuse (or we cannot read): ``file:line: message``."""


@dataclass(frozen=True, slots=True)
class Placeholder:
    """A whole value written as ``{env:VAR}`` or ``{file:path}``: known only at run time."""

    text: str

    @property
    def kind(self) -> str:
        return self.text[1:].split(":", 1)[0]

    def __str__(self) -> str:
        return self.text


def has_substitution(text: str) -> bool:
    return _PLACEHOLDER.search(text) is not None


# -- JSONC ---------------------------------------------------------------------------------


@dataclass
class JsoncDoc:
    file: str
    data: dict[str, object]
    #: path -> line of the key (members) or of the value (array items)
    lines: dict[Path, int]


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_STR_CHUNK = re.compile(r'[^"\\\x00-\x1f]+')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_WS = " \t\r\n\v\f\u00a0\ufeff"


class _Parser:
    """Recursive descent over the text: positions give ``file:line`` for every value."""

    def __init__(self, text: str, file: str) -> None:
        self.s = text
        self.n = len(text)
        self.i = 0
        self.file = file
        self.lines: dict[Path, int] = {}
        self._newlines = [k for k, c in enumerate(text) if c == "\n"]

    def line(self, pos: int) -> int:
        return bisect_left(self._newlines, pos) + 1

    def error(self, message: str, pos: int | None = None) -> ConfigError:
        p = min(self.i if pos is None else pos, self.n)
        k = bisect_left(self._newlines, p)
        col = p - (self._newlines[k - 1] + 1 if k else 0) + 1
        return ConfigError(self.file, k + 1, f"JSON syntax error: {message} (column {col})")

    def peek(self) -> str:
        return self.s[self.i] if self.i < self.n else ""

    def skip(self) -> None:
        s, n = self.s, self.n
        while self.i < n:
            c = s[self.i]
            if c in _WS:
                self.i += 1
            elif s.startswith("//", self.i):
                ends = [j for j in (s.find("\n", self.i), s.find("\r", self.i)) if j >= 0]
                self.i = min(ends) if ends else n
            elif s.startswith("/*", self.i):
                end = s.find("*/", self.i + 2)
                if end < 0:
                    raise self.error("unterminated /* comment")
                self.i = end + 2
            else:
                return

    def document(self) -> object:
        self.skip()
        if self.i >= self.n:
            raise self.error("the file is empty; expected a JSON object")
        value = self.value((), 0)
        self.skip()
        if self.i < self.n:
            raise self.error("unexpected text after the end of the top-level value")
        return value

    def value(self, path: Path, depth: int) -> object:
        if depth > MAX_DEPTH:
            raise self.error(f"nested more than {MAX_DEPTH} levels deep")
        c = self.peek()
        if c == "{":
            m = _PLACEHOLDER.match(self.s, self.i)
            if m is not None:
                self.i = m.end()
                return Placeholder(m.group(0))
            return self.obj(path, depth)
        if c == "[":
            return self.arr(path, depth)
        if c == '"':
            return self.string()
        for word, val in (("true", True), ("false", False), ("null", None)):
            if self.s.startswith(word, self.i):
                self.i += len(word)
                return val
        m = _NUMBER.match(self.s, self.i)
        if m is not None and m.end() > self.i:
            self.i = m.end()
            text = m.group(0)
            return float(text) if (m.group(1) or m.group(2)) else int(text)
        if not c:
            raise self.error("unexpected end of file; expected a value")
        raise self.error(f"unexpected character {c!r}; expected a value")

    def obj(self, path: Path, depth: int) -> dict[str, object]:
        start = self.i
        self.i += 1
        out: dict[str, object] = {}
        self.skip()
        if self.peek() == "}":
            self.i += 1
            return out
        while True:
            if self.peek() != '"':
                if not self.peek():
                    raise self.error("unterminated object", start)
                raise self.error("expected a property name in double quotes")
            key_pos = self.i
            key = self.string()
            self.skip()
            if self.peek() != ":":
                raise self.error(f"expected ':' after property name {key!r}")
            self.i += 1
            self.skip()
            member: Path = (*path, key)
            self.lines[member] = self.line(key_pos)
            out.pop(key, None)  # last one wins, and keeps its own position in the order
            out[key] = self.value(member, depth + 1)
            if self.closes("}", "object", "property value", start):
                return out

    def closes(self, close: str, kind: str, item: str, start: int) -> bool:
        """After an object's member or an array's item: True when the container closes
        here (a trailing comma allowed), False when another one follows. Objects and
        arrays share it so that both accept and refuse the same separators."""
        value_end = self.i
        self.skip()
        c = self.peek()
        if c == ",":
            self.i += 1
            self.skip()
            if self.peek() == close:  # trailing comma
                self.i += 1
                return True
            return False
        if c == close:
            self.i += 1
            return True
        if not c:
            raise self.error(f"unterminated {kind}", start)
        # point at the value that lacks its comma, not at the next line's key
        raise self.error(f"expected ',' or '{close}' after this {item}", value_end)

    def arr(self, path: Path, depth: int) -> list[object]:
        start = self.i
        self.i += 1
        out: list[object] = []
        self.skip()
        if self.peek() == "]":
            self.i += 1
            return out
        while True:
            item: Path = (*path, len(out))
            self.lines[item] = self.line(self.i)
            out.append(self.value(item, depth + 1))
            if self.closes("]", "array", "array item", start):
                return out

    def string(self) -> str:
        start = self.i
        self.i += 1
        s = self.s
        buf: list[str] = []
        while True:
            if self.i >= self.n:
                raise self.error("unterminated string", start)
            c = s[self.i]
            if c == '"':
                self.i += 1
                return "".join(buf)
            if c == "\\":
                esc = s[self.i + 1] if self.i + 1 < self.n else ""
                if esc in _ESCAPES and esc:
                    buf.append(_ESCAPES[esc])
                    self.i += 2
                elif esc == "u":
                    buf.append(self._unicode_escape())
                else:
                    raise self.error(f"invalid escape \\{esc} in a string")
                continue
            if ord(c) < 0x20:
                raise self.error("control character in a string (write it as an escape)")
            m = _STR_CHUNK.match(s, self.i)
            assert m is not None
            buf.append(m.group(0))
            self.i = m.end()

    def _unicode_escape(self) -> str:
        hex1 = self.s[self.i + 2 : self.i + 6]
        if not _HEX4.fullmatch(hex1):
            raise self.error("invalid \\u escape (four hex digits expected)")
        cp = int(hex1, 16)
        self.i += 6
        if 0xD800 <= cp < 0xDC00 and self.s.startswith("\\u", self.i):
            hex2 = self.s[self.i + 2 : self.i + 6]
            if _HEX4.fullmatch(hex2) and 0xDC00 <= int(hex2, 16) < 0xE000:
                self.i += 6
                return chr(0x10000 + ((cp - 0xD800) << 10) + (int(hex2, 16) - 0xDC00))
        return chr(cp)


def parse_jsonc(text: str, file: str) -> JsoncDoc:
    """Parse JSONC text whose top level must be an object, or raise ConfigError."""
    if text.startswith("\ufeff"):
        text = text[1:]
    p = _Parser(text, file)
    data = p.document()
    if not isinstance(data, dict):
        raise ConfigError(file, 1, "an OpenCode config must be a JSON object ({...})")
    return JsoncDoc(file, data, p.lines)


def read_jsonc(path: str | FsPath) -> JsoncDoc:
    p = FsPath(path)
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(str(p), None, f"file is larger than {MAX_FILE_BYTES} bytes")
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(p), None, f"cannot read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(str(p), line, "file is not valid UTF-8") from e
    return parse_jsonc(text, str(p))
