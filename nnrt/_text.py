"""Text from untrusted sources (model files, plugin metadata, exception messages),
made safe to print: control and format characters escaped."""

from __future__ import annotations

import unicodedata

__all__ = ["escape_controls"]

# control, format (bidi overrides), line/paragraph separators, surrogates, private
# use and unassigned code points
_ESCAPE_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"))


def escape_controls(text: object) -> str:
    """``str(text)`` with every control/format character escaped as Python would
    write it (``\\x1b``, ``\\n``, ``\\u202e``); printable text is unchanged, and
    escaping twice changes nothing more."""
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch == " " or unicodedata.category(ch) not in _ESCAPE_CATEGORIES:
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)
