"""What counts as an empty query text, for every service that takes one."""

from __future__ import annotations

import unicodedata

#: Unicode categories that show nothing: separators (spaces, line and paragraph breaks),
#: controls, format characters (zero-width space and joiners, the byte order mark, bidi
#: marks), unassigned code points and surrogates.
_INVISIBLE = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cn", "Cs"})


def is_blank(text: str) -> bool:
    """Whether ``text`` holds nothing a reader would see: str.strip() keeps a zero-width
    space or a byte order mark, and a text of those alone was embedded as if it said
    something."""
    return all(unicodedata.category(char) in _INVISIBLE for char in text)
