"""Project-wide invariants: generated code, the imaging library, package layering."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_generated_protobuf_code_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, "scripts/protogen.py", "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_service_rpc_field_and_enum_of_the_api_is_documented(tmp_path: Path) -> None:
    """The .proto files are the whole API for a client in another language: each service,
    RPC, message field and enum carries a comment (units, ranges, defaults, errors)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    root = REPO / "protos"
    out = tmp_path / "api.pb"
    files = sorted(str(p.relative_to(root)) for p in (root / "percept" / "v1").glob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    assert protoc.main(["protoc", f"-I{root}", f"-I{well_known}", "--include_source_info",
                        f"--descriptor_set_out={out}", *files]) == 0
    undocumented = []
    for proto in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        documented = {tuple(at.path) for at in proto.source_code_info.location
                      if (at.leading_comments or at.trailing_comments).strip()}
        # descriptor paths: 4 message_type, 2 field; 5 enum_type; 6 service, 2 method
        for i, message in enumerate(proto.message_type):
            undocumented += [f"{message.name}.{field.name}" for j, field in
                             enumerate(message.field) if (4, i, 2, j) not in documented]
        undocumented += [f"enum {enum.name}" for i, enum in enumerate(proto.enum_type)
                         if (5, i) not in documented]
        for i, service in enumerate(proto.service):
            undocumented += [f"service {service.name}"] if (6, i) not in documented else []
            undocumented += [f"rpc {service.name}.{rpc.name}" for j, rpc in
                             enumerate(service.method) if (6, i, 2, j) not in documented]
    assert not undocumented, f"undocumented in protos/percept/v1: {undocumented}"


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
    printed = _fresh_python(code)
    assert printed == "", f"services imported trainer code: {printed}"


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
    assert _fresh_python(code) == "False"


def _fresh_python(code: str) -> str:
    """What ``code`` prints in a new interpreter (nothing imported yet) in the repo."""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_ci_entry_point_runs_make_test() -> None:
    text = (REPO / ".ci" / "run").read_text()
    assert "make test" in text


def test_an_xdist_group_runs_on_one_worker(tmp_path: Path) -> None:
    """`make test` runs --dist loadgroup so that the tests sharing one costly fixture (a live
    Prometheus and server) run in one worker, once. Some pytest/xdist pairs drop the group
    without a word (pytest 9.2 with xdist 3.8: pytest-xdist#1386); this notices that."""
    for name in ("a", "b"):
        (tmp_path / f"test_{name}.py").write_text(
            "import pytest\n"
            "pytestmark = pytest.mark.xdist_group('together')\n"
            "@pytest.mark.parametrize('i', range(4))\n"
            f"def test_{name}(i, worker_id):\n"
            f"    open('{tmp_path}/' + worker_id + '.seen', 'a').write('x')\n")
    (tmp_path / "test_free.py").write_text(
        "import pytest\n@pytest.mark.parametrize('i', range(8))\ndef test_free(i):\n    pass\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
         "-p", "no:cacheprovider", "-o", "addopts=", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    seen = {path.stem: len(path.read_text()) for path in tmp_path.glob("*.seen")}
    assert list(seen.values()) == [8], f"the group ran on {seen}"
