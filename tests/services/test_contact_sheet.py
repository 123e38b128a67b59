"""services/contact_sheet.py: captioned pictures in rows, a file that is no image left out
where the caller asks for that."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.contact_sheet import render_sheet


def test_an_unreadable_file_is_left_out_and_named_or_raised(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.full((30, 60, 3), 200, np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    unreadable: list[Path] = []
    sheet = render_sheet([("good", good), ("bad", bad), ("good again", good)], height=40,
                         per_row=2, unreadable=unreadable)
    assert unreadable == [bad]
    assert sheet is not None and sheet.size == (80 + 4 + 80, 40 + 18)  # one row of two
    with pytest.raises(Exception, match="cannot identify"):
        render_sheet([("bad", bad)])
    assert render_sheet([("bad", bad)], unreadable=[]) is None
