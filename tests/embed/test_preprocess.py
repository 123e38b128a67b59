"""The embedding input: resize the shortest side to 224 and centre-crop, in bounded memory
whatever the aspect ratio."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from services.embed.preprocess import INPUT_SIZE, preprocess
from tests.conftest import REPO


def test_it_is_resize_shortest_side_then_centre_crop() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (300, 451, 3), np.uint8)  # chelsea.png's size
    out = preprocess(rgb)
    assert out.shape == (INPUT_SIZE, INPUT_SIZE, 3) and out.dtype == np.uint8
    square = Image.fromarray(rgb[:, 75:375])  # the centred 300 x 300 square
    expected = np.asarray(square.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC,
                                        reducing_gap=3.0))
    assert out.tolist() == expected.tolist()
    assert preprocess(rgb[:224, :224]).tolist() == rgb[:224, :224].tolist()  # as it is


def test_a_long_strip_is_cropped_before_it_is_resized() -> None:
    """A 1 x 100,000 strip (a PNG of a few hundred bytes, 0.1 MP: far under the pixel cap)
    is its middle pixel, in a process whose address space is capped at 1 GiB: resizing the
    whole strip first would need 224 x 22,400,000 pixels (15 GB)."""
    program = textwrap.dedent("""
        import resource
        import numpy as np
        from services.embed.preprocess import preprocess
        strip = np.zeros((1, 100_000, 3), np.uint8)
        strip[0, 49_999] = (200, 100, 50)  # the middle one: (100,000 - 1) // 2
        limit = 1 << 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        out = preprocess(strip)
        assert out.shape == (224, 224, 3), out.shape
        assert (out == (200, 100, 50)).all(), out[0, 0]
        tall = preprocess(np.full((100_000, 2, 3), 7, np.uint8))
        assert tall.shape == (224, 224, 3) and (tall == 7).all()
        print("bounded")
    """)
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "bounded", result.stderr
