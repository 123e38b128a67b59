"""`pip install` of the project is the client: the wheel built from the tracked sources,
installed in a new virtual environment that holds only the dependencies it declares (and
theirs), runs every client command and the README's Python example against real servers,
from outside the checkout; the commands that need the checkout say so.

The environment is made without the network: each declared distribution's files are linked
from the one running these tests. ``PERCEPT_CLIENT_PYTHON`` names another environment's
Python instead (one with percept and the lowest versions pyproject.toml admits, say), for
the client tests to run against.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from PIL import Image

from services.common.server import RunningServer
from tests.conftest import REPO, encode, pixel_budget_full, rejections
from tests.fixtures.certificates import SecretFiles

# one client install per run: the tests share it on one worker
pytestmark = pytest.mark.xdist_group("client-install")

#: Distributions the checkout replaces by another that provides the same modules
#: (scripts/setup.sh builds pillow-simd in place of pillow).
STAND_INS = {"pillow": "pillow-simd"}
#: What a client install is built from: the files the wheel needs.
SOURCES = ("pyproject.toml", "README.md", "services", "training", "protos")


def _tracked_sources(into: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", *SOURCES], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())


def build_wheel(root: Path) -> Path:
    """The project's wheel, built from a copy of its tracked files (no build/ or egg-info
    left in the checkout)."""
    source, out = root / "source", root / "wheel"
    _tracked_sources(source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(source)], check=True,
                   capture_output=True)
    (wheel,) = out.glob("percept-*.whl")
    return wheel


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        fields = Parser().parsestr(archive.read(name).decode())
    return [Requirement(text) for text in fields.get_all("Requires-Dist") or []]


def _applies(requirement: Requirement) -> bool:
    """Whether ``requirement`` applies to a plain install (no extras) on this Python."""
    return requirement.marker is None or requirement.marker.evaluate({"extra": ""})


def installed_closure(requirements: list[Requirement]) -> list[metadata.Distribution]:
    """The installed distributions that satisfy ``requirements`` and theirs, transitively;
    AssertionError where one is missing or at a version the requirement refuses."""
    found: dict[str, metadata.Distribution] = {}
    todo = [r for r in requirements if _applies(r)]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            distribution = metadata.distribution(STAND_INS[name])
        version = Version(distribution.version)
        assert requirement.specifier.contains(version, prereleases=True), \
            f"{name} {version} is installed, but {requirement} is declared"
        found[name] = distribution
        todo.extend(r for r in map(Requirement, distribution.requires or []) if _applies(r))
    return list(found.values())


def link_distribution(distribution: metadata.Distribution, site: Path) -> None:
    """Links each file of ``distribution`` that lives in site-packages into ``site``."""
    for file in distribution.files or []:
        if file.parts[0] == "..":  # a script in bin/: not needed, nothing imports it
            continue
        target = site / file
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(Path(str(distribution.locate_file(file))).resolve())


def _environment() -> dict[str, str]:
    """The test process's environment without what would change a client's behaviour."""
    return {name: value for name, value in os.environ.items()
            if not name.startswith(("PERCEPT_", "PYTHON", "VIRTUAL_ENV"))}


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a client install (see the module's docstring)."""
    given = os.environ.get("PERCEPT_CLIENT_PYTHON")
    if given:
        return Path(given)
    root = tmp_path_factory.mktemp("client-install")
    wheel = build_wheel(root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c",
                                "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for distribution in installed_closure(wheel_requirements(wheel)):
        link_distribution(distribution, site)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", "--no-compile", str(wheel)], check=True,
                   capture_output=True)
    return python


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """A working directory outside the checkout."""
    path = tmp_path / "work"
    path.mkdir()
    return path


def percept(python: Path, *args: str, cwd: Path, timeout: float = 180
            ) -> subprocess.CompletedProcess[str]:
    """The client install's ``percept`` command."""
    return subprocess.run([str(python.parent / "percept"), *args], cwd=cwd,
                          env=_environment(), capture_output=True, text=True,
                          timeout=timeout)


def succeeds(python: Path, *args: str, cwd: Path) -> str:
    done = percept(python, *args, cwd=cwd)
    assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stderr)
    return done.stdout


def test_the_client_has_nothing_that_serves(client_python: Path, workdir: Path) -> None:
    """The install is the client's: no torch, no FAISS, and percept from the wheel."""
    probe = ("import importlib.util, services\n"
             "print(services.__file__)\n"
             "print([m for m in ('torch', 'faiss', 'grpc_reflection', 'prometheus_client') "
             "if importlib.util.find_spec(m)])\n")
    done = subprocess.run([str(client_python), "-c", probe], cwd=workdir, env=_environment(),
                          capture_output=True, text=True, check=True)
    where, serving = done.stdout.splitlines()
    assert not where.startswith(str(REPO)) and serving == "[]", done.stdout


def test_every_client_command_runs_in_a_client_install(
        client_python: Path, all_server: RunningServer, small_photo: np.ndarray,
        photo: np.ndarray, workdir: Path) -> None:
    target = ["--target", all_server.target]
    folder = workdir / "photos"
    folder.mkdir()
    (folder / "cat.png").write_bytes(encode(small_photo))
    (folder / "coffee.jpg").write_bytes(encode(photo, "JPEG"))
    cat = str(folder / "cat.png")
    assert re.fullmatch(r"percept \S+\n", succeeds(client_python, "--version", cwd=workdir))
    assert succeeds(client_python, "health", *target, cwd=workdir) == "SERVING\n"
    assert "percept.v1.ImageSearch" in succeeds(client_python, "info", *target, cwd=workdir)
    assert "the-scream" in succeeds(client_python, "styles", *target, cwd=workdir)
    succeeds(client_python, "upscale", cat, "big.png", *target, cwd=workdir)
    height, width = small_photo.shape[:2]
    with Image.open(workdir / "big.png") as image:
        assert image.size == (4 * width, 4 * height)
    succeeds(client_python, "stylize", cat, "scream.jpg", "--style", "the-scream",
             "--strength", "0.5", *target, cwd=workdir)
    with Image.open(workdir / "scream.jpg") as image:
        assert image.format == "JPEG" and image.size == (width, height)
    succeeds(client_python, "upscale", str(folder), "big", "--quiet", *target, cwd=workdir)
    assert sorted(p.name for p in (workdir / "big").iterdir()) == ["cat.png", "coffee.png"]
    assert '"wnid"' in succeeds(client_python, "label", cat, "--json", *target, cwd=workdir)
    try:
        succeeds(client_python, "index", str(folder), *target, cwd=workdir)
        assert cat in succeeds(client_python, "search", "--image", cat, *target, cwd=workdir)
        succeeds(client_python, "search", "a cat", "--sheet", "sheet.jpg", *target,
                 cwd=workdir)
        with Image.open(workdir / "sheet.jpg") as sheet:
            assert sheet.format == "JPEG"
        assert cat in succeeds(client_python, "images", "--prefix", str(folder), *target,
                               cwd=workdir)
    finally:
        succeeds(client_python, "delete", "--prefix", str(folder), "--yes", *target,
                 cwd=workdir)
    broken = folder / "broken.png"
    broken.write_bytes(encode(small_photo)[:100])
    failed = percept(client_python, "upscale", str(broken), "x.png", *target, cwd=workdir)
    assert failed.returncode == 1 and failed.stderr.startswith("INVALID_ARGUMENT: "), \
        failed.stderr


def test_mutual_tls_works_from_a_client_install(
        client_python: Path, mtls_superres: tuple[RunningServer, SecretFiles, SecretFiles],
        workdir: Path) -> None:
    """The client's certificate and key are read and checked (cryptography) before the
    call."""
    running, server, mine = mtls_superres
    tls = ["--target", running.target, "--tls-ca", str(server.ca)]
    assert succeeds(client_python, "health", *tls, "--tls-client-cert", str(mine.cert),
                    "--tls-client-key", str(mine.key), cwd=workdir) == "SERVING\n"
    refused = percept(client_python, "health", *tls, "--tls-client-cert", str(mine.cert),
                      "--tls-client-key", str(server.key), cwd=workdir)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "--tls-client-key" in refused.stderr


def readme_python_example() -> str:
    """The code of README's "Calling percept from Python"."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Calling percept from Python\n", 1)[1].split("\n### ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def test_the_readme_python_example_runs_in_a_client_install_and_waits_out_a_busy_server(
        client_python: Path, all_server: RunningServer, photo: np.ndarray,
        workdir: Path) -> None:
    """Against a server whose pixel budget is full until the example's first call has
    been refused busy: the example waits as it was asked to, then does the rest."""
    (workdir / "example.py").write_text(readme_python_example())
    (workdir / "photo.jpg").write_bytes(encode(photo, "JPEG"))
    busy_before = rejections()
    process: subprocess.Popen[str] | None = None
    try:
        with pixel_budget_full(all_server):
            process = subprocess.Popen(
                [str(client_python), "example.py"], cwd=workdir, text=True,
                env={**_environment(), "PERCEPT_TARGET": all_server.target},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 60
            while (rejections() == busy_before and process.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            if rejections() == busy_before:
                process.kill()
                pytest.fail("the example's first call was not refused busy; it printed "
                            f"{process.communicate()}")
        stdout, stderr = process.communicate(timeout=180)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        _delete(all_server, "photo.jpg")
    assert process.returncode == 0, stderr
    lines = stdout.splitlines()
    height, width = photo.shape[:2]
    assert lines[0].startswith(f"photo-4x.png: {4 * width}x{4 * height} (")
    with Image.open(workdir / "photo-4x.png") as image:
        assert image.size == (4 * width, 4 * height)
    assert all(re.fullmatch(r"\d\.\d{3} \S.* \(n\d{8}\): .+", line) for line in lines[1:4])
    assert lines[4] == "indexed ['photo.jpg']"
    # the hits: among other tests' images in this index, so only their form is known
    hits = lines[5:-1]
    assert 1 <= len(hits) <= 3 and all(re.fullmatch(r"-?\d\.\d{3} \S.*", h) for h in hits)
    assert lines[-1].startswith("INVALID_ARGUMENT IMAGE_UNDECODABLE - not a decodable image")


def _delete(server: RunningServer, image_id: str) -> None:
    from services import client

    with client.connect(server.target) as channel:
        client.delete_images(channel, [image_id])


@pytest.mark.parametrize("command", [
    ["serve", "superres"], ["run", "--no-demo"], ["data", "photos"], ["data", "prepare"],
    ["train", "style", "--style", "the-scream"], ["eval", "search"]])
def test_what_runs_from_the_source_tree_says_so_in_a_client_install_and_exits_2(
        client_python: Path, workdir: Path, command: list[str]) -> None:
    """Whatever else the environment holds (torch, scikit-image): nothing is written, no
    server or download is started, wherever the install's paths would have pointed."""
    site = Path(subprocess.run([str(client_python), "-c", "import services; print("
                                "services.__file__)"], cwd=workdir, env=_environment(),
                               check=True, capture_output=True, text=True).stdout
                ).parent.parent

    def listing() -> list[Path]:  # bytecode that imports write is not the command's doing
        return sorted(path for path in site.iterdir() if path.name != "__pycache__")

    before = listing()
    failed = percept(client_python, *command, cwd=workdir)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    (line,) = failed.stderr.splitlines()
    assert line == (f"error: percept {command[0]} runs from percept's source tree: a checkout "
                    "of the repository (make setup installs what it needs) or the container "
                    f"image (deploy/README.md). This percept is installed in {site}, with "
                    "the client commands only")
    assert listing() == before and list(workdir.iterdir()) == []


def test_cluster_status_without_its_extra_says_what_to_install(
        client_python: Path, workdir: Path) -> None:
    done = subprocess.run([str(client_python), "-c", "import kubernetes"],
                          env=_environment(), capture_output=True)
    if done.returncode == 0:
        pytest.skip("this client environment has the cluster extra (PERCEPT_CLIENT_PYTHON)")
    failed = percept(client_python, "cluster", "status", cwd=workdir)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    (line,) = failed.stderr.splitlines()
    assert re.fullmatch(r"error: percept cluster needs the Python module '\S+', which is not "
                        r"installed here: install percept with its 'cluster' extra \(pip "
                        r"install 'path/to/percept\[cluster\]'; a checkout's make setup "
                        r"installs it too\)", line), line


def test_a_missing_module_is_named_whole_and_percept_s_own_is_not_explained_away() -> None:
    """In the source tree a missing dependency is the environment's (make setup); in a
    client command, or of percept itself, a bug: shown whole."""
    from services.cli import missing_dependency_text, source_tree_refusal

    assert source_tree_refusal("serve") is None  # this checkout
    missing = ModuleNotFoundError("No module named 'faiss.loader'", name="faiss.loader")
    assert missing_dependency_text("serve", missing) == (
        "percept serve needs the Python module 'faiss.loader', which is not installed in "
        "this environment: make setup installs what the checkout's commands need "
        "(requirements.txt)")
    assert missing_dependency_text("upscale", missing) is None
    own = ModuleNotFoundError("No module named 'services.gone'", name="services.gone")
    assert missing_dependency_text("serve", own) is None


# -- what pyproject.toml declares -------------------------------------------------------
def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [text for texts in project.get("optional-dependencies", {}).values()
              for text in texts]
    return [Requirement(text) for text in [*project["dependencies"], *extras]]


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("#")[0].split("==")
            pins[str(canonicalize_name(name))] = Version(version.strip())
    setup = (REPO / "scripts" / "setup.sh").read_text()
    simd = re.search(r"pillow-simd==(\S+)", setup)
    assert simd is not None
    pins["pillow"] = Version(simd.group(1))  # what the checkout runs in pillow's place
    return pins


def test_the_declared_versions_admit_the_pinned_ones() -> None:
    pins = _pins()
    for requirement in _declared():
        pinned = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(pinned, prereleases=True), \
            f"{requirement} refuses the pinned {pinned}"


def _lowest(requirement: Requirement) -> Version:
    (lowest,) = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    return lowest


def test_grpc_and_protobuf_are_declared_at_least_at_the_generated_codes_versions() -> None:
    """The generated code refuses runtimes older than the generator (and protobuf's of
    another major version): the declared lowest versions must be at least the
    generator's."""
    declared = {str(canonicalize_name(r.name)): r for r in _declared()}
    generated = REPO / "protos" / "percept" / "v1"
    grpc_versions = {Version(v) for f in generated.glob("*_pb2_grpc.py") for v in
                     re.findall(r"GRPC_GENERATED_VERSION = '([^']+)'", f.read_text())}
    protobuf_versions = {Version(".".join(v)) for f in generated.glob("*_pb2.py") for v in
                         re.findall(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
                                    f.read_text())}
    assert len(grpc_versions) == 1 and len(protobuf_versions) == 1
    (grpc_version,), (protobuf_version,) = grpc_versions, protobuf_versions
    for name in ("grpcio", "grpcio-health-checking", "grpcio-status"):
        assert _lowest(declared[name]) >= grpc_version, declared[name]
    protobuf = declared["protobuf"]
    assert _lowest(protobuf) >= protobuf_version
    assert not protobuf.specifier.contains(Version(f"{protobuf_version.major + 1}.0")), \
        "protobuf's next major version refuses this generated code"
