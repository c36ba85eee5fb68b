"""Errors the harness reports to a person: one line naming the file, the place and the problem.

Names and values come from files written by strangers, so whatever an error prints goes
through ``escaped`` (in ``PortingError``, the one place messages are put together):
control, format and line-separator characters print as ``\\n``, ``\\r``, ``\\t``, ``\\xNN``
or ``\\uNNNN``, so a message stays one line and writes no terminal escape sequence.
Backslashes are left as they are. A name embedded in a message goes through ``shown``,
which also shortens it.
"""
from __future__ import annotations

import unicodedata

# Categories never printed raw: controls (C0, DEL, C1), format characters (bidi
# overrides, zero-width), line/paragraph separators, lone surrogates (undecodable path bytes).
_HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs"}
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
NAME_LIMIT = 60


def escaped(value: object) -> str:
    """``str(value)`` with every character of ``_HIDDEN`` written as an escape."""
    text = str(value)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif unicodedata.category(ch) in _HIDDEN:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def shown(value: object, limit: int = NAME_LIMIT) -> str:
    """A name or value as a message prints it: escaped, and at most ``limit`` characters
    (the middle of a longer one replaced by "...")."""
    text = escaped(value)
    if len(text) <= limit:
        return text
    head = (limit - 3) * 2 // 3
    return text[:head] + "..." + text[len(text) - (limit - 3 - head):]


class PortingError(Exception):
    """Bad input (a file, a net, a weight blob). The CLI prints ``str(err)`` and exits 2.

    ``str(err)`` is ``path: place: problem`` (empty parts left out), each part escaped;
    the attributes keep what was given.
    """

    def __init__(self, problem: str, path: object = None, place: str | None = None):
        self.path, self.place, self.problem = path, place, problem
        parts = [p for p in (path, place) if p]
        super().__init__(": ".join(escaped(p) for p in parts + [problem]))


class UnsupportedLayers(PortingError):
    """The net uses layer types the port does not implement (listed all at once)."""
