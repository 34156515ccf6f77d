"""Client text made safe to write into a log line or a terminal.

A client chooses its device id, its request path and method; written raw into a
log, a line break in one forges a second record, and an escape sequence rewrites
an operator's terminal. Everything not printable is escaped here, and values in
``key=value`` records are quoted when they hold anything that would split them
(logfmt's rule), so one event is always one line.
"""

from __future__ import annotations

import re

# Characters that make a logfmt value need quotes: space, quote, '=', backslash,
# and anything not printable (control, format such as bidi marks, separators).
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _escape(char: str) -> str:
    special = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if char in special:
        return special[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        # A byte that was not UTF-8 (decoded with surrogateescape): shown as that byte.
        code -= 0xDC00
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escaped(text: str) -> str:
    """``text`` with backslashes, quotes and every non-printable character escaped."""
    return "".join(char if char.isprintable() and char not in '\\"' else _escape(char) for char in text)


def printable(text: bytes | str, limit: int = 200) -> str:
    """Client text for a log line: escaped, and cut to ``limit`` characters (marked ``...``)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    if len(text) > limit:
        return escaped(text[:limit]) + "..."
    return escaped(text)


def logfmt_value(value: object) -> str:
    """One value of a ``key=value`` record: bare when plain, else quoted and escaped;
    None is ``-``."""
    if value is None:
        return "-"
    text = str(value)
    if text and text != "-" and _NEEDS_QUOTES.search(text) is None and text.isprintable():
        return text
    return f'"{escaped(text)}"'
