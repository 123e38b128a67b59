"""The README's Gatys pictures (optimisation-based style transfer, `StylizeWithImage`):
the committed 256 px content photo stylised after Starry Night through a real style server
and the `percept stylize --style-image` command, once as is and once with its colour
preserved, at the service's defaults (300 L-BFGS iterations, 256 px). About 4 minutes a
picture on a 2-core CPU.

    .venv/bin/python scripts/gatys_figure.py [--iterations 300] [--out docs/images]

Writes gatys_style.png (the style image as the figure shows it, 256 x 256),
gatys_result.png and gatys_result_preserve_color.png; the content, gatys_content.png, is
their input and stays as it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from services import cli
from services.common.config import ServerConfig
from services.common.server import start_in_thread
from training.assets import style_image_path

REPO = Path(__file__).resolve().parents[1]
SIDE = 256


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    content = args.out / "gatys_content.png"
    style = style_image_path("starry-night")
    Image.open(style).convert("RGB").resize((SIDE, SIDE), Image.Resampling.LANCZOS).save(
        args.out / "gatys_style.png", optimize=True)
    server = start_in_thread(ServerConfig(service="style", host="127.0.0.1", port=0,
                                          metrics_port=0, log_format="text"), timeout=600)
    try:
        for name, extra in (("gatys_result.png", []),
                            ("gatys_result_preserve_color.png", ["--preserve-color"])):
            command = ["stylize", str(content), str(args.out / name), "--style-image",
                       str(style), "--iterations", str(args.iterations), "--max-size",
                       str(SIDE), "--target", server.target, *extra]
            print("percept " + " ".join(command), flush=True)
            if cli.main(command) != 0:
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
