"""Project-wide invariants: generated code, the imaging library, package layering."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_generated_protobuf_code_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, "scripts/protogen.py", "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_pil_in_use_is_pillow_simd() -> None:
    import PIL
    from PIL import features

    assert "post" in PIL.__version__, f"stock Pillow {PIL.__version__} replaced pillow-simd"
    from importlib.metadata import distribution

    assert distribution("Pillow-SIMD").version == PIL.__version__
    for codec in ("jpg", "zlib", "webp"):
        assert features.check(codec), f"pillow-simd was built without {codec}"


def test_services_never_import_trainer_code() -> None:
    """Services may use training.nets / training.perceptual / training.assets only."""
    code = (
        "import sys\n"
        "from services.common.server import SERVICE_CLASSES, build_modules\n"
        "import importlib\n"
        "for spec in SERVICE_CLASSES.values():\n"
        "    importlib.import_module(spec.partition(':')[0])\n"
        "import services.cli, services.client\n"
        "allowed = ('training.nets', 'training.perceptual', 'training.assets')\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m.startswith('training.') and not m.startswith(allowed))\n"
        "print(','.join(bad))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"services imported trainer code: {result.stdout}"


def test_a_search_process_that_embeds_remotely_never_imports_torch() -> None:
    """A search pod (--embed-target) needs FAISS, SQLite and gRPC, not torch: importing it
    costs start-up time and a few hundred MB of memory per pod."""
    code = (
        "import sys\n"
        "from services.common.config import ServerConfig\n"
        "from services.common.server import build_modules\n"
        "[search] = build_modules(ServerConfig(service='search', "
        "embed_target='127.0.0.1:1'))\n"
        "search._make_embedder()\n"
        "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_ci_entry_point_runs_make_test() -> None:
    text = (REPO / ".ci" / "run").read_text()
    assert "make test" in text
