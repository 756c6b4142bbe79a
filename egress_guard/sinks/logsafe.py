"""Human log lines a client cannot write into.

Log lines quote what clients send (a request line, a Host header, a metrics scrape's
URL); mitmproxy's own lines quote raw requests too. Written to a terminal as they are,
an ``ESC ]0;...BEL`` retitles the operator's terminal, ``ESC [2J`` clears it, a carriage
return or a newline starts a fake line ("policy loaded") and a bidi override (U+202E)
shows text in an order other than the one written. ``SafeFormatter`` is the formatter of
every handler ``egress-guard run`` writes to stderr with:

* every control character in what a record says is written as an escape (``\\x1b``,
  ``\\u202e``): C0 (newline, carriage return and tab included), DEL, C1, and the
  invisible and direction-changing format characters (bidi embeddings, overrides and
  isolates, zero-width characters, the line and paragraph separators, the BOM, tag
  characters), and lone surrogates;
* a newline is kept only where the guard writes one on purpose: in the message
  template or an argument marked ``Block`` (a policy error's render) and in a
  traceback. Every line after a record's first is indented, so no line of a record,
  whatever it quotes, can pass for a record of its own;
* secrets are removed from the message as from the audit log's free text
  (``redact.text``: queries, path parameters, userinfo).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Final

from egress_guard.sinks import redact

#: what never reaches a terminal raw (see the module docstring); newline and tab are
#: added for text that must stay on one line
_CONTROLS: Final = (
    "\x00-\x08\x0b-\x1f\x7f-\x9f"  # C0 but tab and newline, DEL, C1
    "\u00ad\u061c\u180e"  # soft hyphen, Arabic letter mark, Mongolian vowel separator
    "\u200b-\u200f"  # zero-width space/joiners, LRM, RLM
    "\u2028-\u202e"  # line and paragraph separators, bidi embeddings and overrides
    "\u2060-\u206f"  # word joiner, invisible operators, bidi isolates, deprecated formats
    "\ufeff\ufff9-\ufffb"  # BOM / zero-width no-break space, interlinear annotations
    "\U000e0000-\U000e007f"  # tag characters
    "\ud800-\udfff"  # lone surrogates (surrogateescape'd bytes)
)
_BLOCK_UNSAFE: Final = re.compile(f"[{_CONTROLS}]")
_LINE_UNSAFE: Final = re.compile(f"[\t\n{_CONTROLS}]")

#: how the lines after a record's first start
INDENT: Final = "  "


class Block(str):
    """Text the guard writes over several lines on purpose (a policy error's render):
    its newlines are kept when it is logged; everything else is escaped as usual."""

    __slots__ = ()


def _escape_char(m: re.Match[str]) -> str:
    n = ord(m.group())
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def escape(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control and invisible format character written as an escape;
    newlines (and tabs) kept only with ``keep_newlines``."""
    pattern = _BLOCK_UNSAFE if keep_newlines else _LINE_UNSAFE
    if pattern.search(text) is None:
        return text
    return pattern.sub(_escape_char, text)


def indent_lines(text: str) -> str:
    """Every line after the first indented: none can pass for a record of its own."""
    return text.replace("\n", "\n" + INDENT) if "\n" in text else text


class _Escaped:
    """A log argument rendered escaped, whether formatted with %s, %r or a format spec."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        v = self.value
        if isinstance(v, Block):
            return escape(v, keep_newlines=True)
        return escape(str(v))

    def __repr__(self) -> str:
        return escape(repr(self.value))

    def __format__(self, spec: str) -> str:
        return escape(format(self.value, spec))


def _safe_arg(arg: object) -> object:
    if isinstance(arg, (int, float)):  # bool too; keeps %d, %x, %g working
        return arg
    return _Escaped(arg)


def safe_message(record: logging.LogRecord) -> str:
    """The record's message, escaped (see the module docstring), secrets removed."""
    msg = record.msg
    template = (
        escape(msg, keep_newlines=True)
        if isinstance(msg, Block)
        else escape(msg if isinstance(msg, str) else str(msg))
    )
    args = record.args
    if args:
        try:
            if isinstance(args, Mapping):
                safe: Any = {k: _safe_arg(v) for k, v in args.items()}
            else:
                safe = tuple(_safe_arg(a) for a in args)
            text = template % safe
        except Exception:  # a bad format string must not lose the record
            text = f"{template} {escape(repr(args))}"
    else:
        text = template
    return redact.text(text) or ""


class SafeFormatter(logging.Formatter):
    """A logging.Formatter that writes no raw control character and no secret, and
    keeps each record recognisable as one (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            safe = logging.makeLogRecord(record.__dict__)
            safe.msg = safe_message(record)
            safe.args = None
            # tracebacks are formatted afresh (and escaped) for this copy only
            safe.exc_text = None
            out = super().format(safe)
        except Exception as e:  # never raise from logging, never print raw text
            out = f"(unformattable log record: {escape(repr(e))}) {escape(repr(record.msg))}"
        return indent_lines(out)

    def formatException(self, ei: Any) -> str:
        return escape(super().formatException(ei), keep_newlines=True)

    def formatStack(self, stack_info: str) -> str:
        return escape(super().formatStack(stack_info), keep_newlines=True)
