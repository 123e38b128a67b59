"""What counts as an empty query text (services.common.texts)."""

from __future__ import annotations

import pytest

from services.common.texts import is_blank


@pytest.mark.parametrize("text", ["", " ", "\t\n", "\u200b", "\ufeff", "\u00a0\u3000",
                                  "\u200e\u200f", "\u2028", "\x00\x07"])
def test_texts_that_show_nothing_are_blank(text: str) -> None:
    assert is_blank(text)


@pytest.mark.parametrize("text", ["a", " dog ", "\u200bcat", "🐕", "犬", "-", "0",
                                  "\u0301",  # a lone combining accent is a mark, shown
                                  "\U0001fae8"])  # an emoji of Unicode 15, newer than
# Python 3.11's data (unassigned there, category Cn): not taken for nothing
def test_texts_with_anything_to_see_are_not(text: str) -> None:
    assert not is_blank(text)
