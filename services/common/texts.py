"""What counts as an empty query text, for every service that takes one."""

from __future__ import annotations

import unicodedata

#: Unicode categories that show nothing: separators (spaces, line and paragraph breaks),
#: controls, format characters (zero-width space and joiners, the byte order mark, bidi
#: marks) and surrogates. Not unassigned code points (Cn): a character newer than this
#: Python's Unicode data (an emoji of Unicode 15 under Python 3.11) is one of them.
_INVISIBLE = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cs"})


def is_blank(text: str) -> bool:
    """Whether ``text`` holds nothing a reader would see: str.strip() keeps a zero-width
    space or a byte order mark, and a text of those alone was embedded as if it said
    something. Reads every character of a text of nothing but those: check a text's
    length first (whitespace alone is stripped in C)."""
    return all(unicodedata.category(char) in _INVISIBLE for char in text.strip())
