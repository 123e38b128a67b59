"""Folder runs for ``percept upscale`` and ``percept stylize --style``: every image of an
input folder into an output folder, a few requests in flight at once so that the server can
batch them.

What happens to each kind of failure:

- about one file (INVALID_ARGUMENT: not an image, over the pixel cap, a mask of another
  aspect ratio; RESOURCE_EXHAUSTED without a retry trailer: a message over the size limit;
  an unreadable file): reported, skipped, and the run goes on;
- the server is busy (RESOURCE_EXHAUSTED with the ``grpc-retry-pushback-ms`` trailer): the
  request is retried with backoff for up to ``--timeout`` seconds;
- DEADLINE_EXCEEDED, still busy after ``--timeout``, an output that cannot be written:
  reported and skipped, but :data:`a run of them <STREAK>` with no success in between
  means a hung or overloaded server, or a full disk, so the run stops;
- any other status (UNAVAILABLE, NOT_FOUND for an unknown style, ...) would fail every
  file the same way: the run stops at once.

Each output is written whole or not at all, so a stopped run resumes with
``--skip-existing``.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.local_files import Terminated, UsageError, atomic_output, read_input

#: The files a folder run reads (by extension, case-insensitively); hidden files are skipped.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: The output formats a folder run can write, by ``--format``.
OUTPUT_SUFFIXES = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
MAX_JOBS = 64
#: The trailer of a busy answer (services.common.errors.RETRY_PUSHBACK_KEY).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
#: The longest wait between two tries of a busy request (seconds; the first is 0.25 s).
MAX_BACKOFF_SECONDS = 5.0
#: A run stops after this many failures in a row (or ``--jobs``, if more) of the kinds that
#: say more about the server or the disk than about the file.
STREAK = 3


class FolderRunStopped(Exception):
    """The run stopped early: a run of failures that no file would escape."""


@dataclass(frozen=True)
class FileJob:
    source: Path
    target: Path


@dataclass
class FolderPlan:
    jobs: list[FileJob]
    #: subfolders that could not be read (reported; the run exits 1)
    problems: list[str] = field(default_factory=list)


@dataclass
class FolderReport:
    written: int = 0
    skipped: int = 0  # --skip-existing
    failures: list[str] = field(default_factory=list)
    stopped: bool = False


def image_files(folder: Path, recursive: bool) -> tuple[list[Path], list[str]]:
    """The image files of ``folder`` (and of its subfolders when ``recursive``; a link to a
    folder is followed, each folder read once) sorted, and the subfolders that could not
    be read. Hidden files and folders (a name starting with ".") are left out."""
    problems: list[str] = []

    def unreadable(error: OSError) -> None:
        if Path(error.filename) == folder:
            raise UsageError(f"cannot read {folder}: {error.strerror or error}")
        problems.append(f"cannot read folder {error.filename}: {error.strerror or error}")

    files: list[Path] = []
    seen = {os.path.realpath(folder)}
    for root, folders, names in os.walk(folder, onerror=unreadable, followlinks=True):
        kept = []
        for name in sorted(folders) if recursive else []:
            path = Path(root, name)
            real = os.path.realpath(path)
            if name.startswith("."):
                continue
            if real in seen:  # a link loop, or a second way into the same folder
                continue
            seen.add(real)
            kept.append(name)
        folders[:] = kept
        files.extend(Path(root, name) for name in names
                     if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(files, key=lambda p: p.relative_to(folder).parts), problems


def plan_folder(source: Path, target: Path, output_format: str, recursive: bool) -> FolderPlan:
    """One job per image of ``source``: ``target/<relative path>`` with the format's
    extension. UsageError (nothing sent yet) for an output folder that is a file or is (with
    ``recursive``, inside) the input folder, for a folder without images, and for outputs
    that would overwrite an input, each other, or a folder."""
    if output_format not in OUTPUT_SUFFIXES:
        raise UsageError(f"--format must be one of {', '.join(OUTPUT_SUFFIXES)}, "
                         f"got {output_format!r}")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{source} is a folder, so the output must be one too; {target} is "
                         "a file")
    if target.suffix.lower() in IMAGE_SUFFIXES and not target.exists():
        raise UsageError(f"{source} is a folder, so the output must be one too, not "
                         f"{target}; --format picks the files' format (default png)")
    if target.resolve() == source.resolve() or (
            recursive and target.resolve().is_relative_to(source.resolve())):
        raise UsageError(f"write into a folder outside {source}, not {target}: the outputs "
                         "would mix with the inputs")
    files, problems = image_files(source, recursive)
    if not files:
        raise UsageError(f"no images in {source} ({', '.join(IMAGE_SUFFIXES)}"
                         f"{'' if recursive else '; --recursive descends into subfolders'})"
                         + "".join(f"; {problem}" for problem in problems))
    suffix = OUTPUT_SUFFIXES[output_format]
    inputs = {os.path.realpath(path): path for path in files}
    jobs: list[FileJob] = []
    sources: dict[Path, Path] = {}
    for path in files:
        output = target / path.relative_to(source).with_suffix(suffix)
        if output in sources:
            raise UsageError(f"{sources[output]} and {path} would both be written to {output}; "
                             "rename one of them")
        overwritten = inputs.get(os.path.realpath(output))
        if overwritten is not None:
            raise UsageError(f"{path} would be written to {output}, over the input "
                             f"{overwritten}; write into another folder")
        if output.is_dir():
            raise UsageError(f"{path} would be written to {output}, which is a folder")
        sources[output] = path
        jobs.append(FileJob(path, output))
    for output, path in sources.items():
        for parent in output.parents:
            if parent == target:
                break
            if parent in sources:
                raise UsageError(f"{sources[parent]} would be written to {parent}, which "
                                 f"{path} needs as a folder; rename one of them")
    return FolderPlan(jobs, problems)


def _pushback_seconds(error: grpc.RpcError) -> float | None:
    """The server's retry pushback, when ``error`` is a busy answer; else None."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_PUSHBACK_KEY:
            with contextlib.suppress(ValueError):
                return max(0.0, int(value) / 1000)
    return None


class _BusyTooLong(Exception):
    pass


def _call_when_not_busy(call: Callable[[bytes], bytes], data: bytes, patience: float,
                        stopping: threading.Event) -> bytes:
    """``call(data)``, retried while the server answers busy, for up to ``patience``
    seconds: then _BusyTooLong."""
    started, backoff = time.monotonic(), 0.25
    while True:
        try:
            return call(data)
        except grpc.RpcError as error:
            pushback = _pushback_seconds(error)
            if pushback is None:
                raise
            waited = time.monotonic() - started
            if waited >= patience:
                raise _BusyTooLong(f"{error.code().name}: {error.details()} (still busy "
                                   f"after {waited:.0f} s)") from error
        delay = min(max(pushback, backoff) * random.uniform(0.75, 1.25),
                    patience - waited)
        backoff = min(2 * backoff, MAX_BACKOFF_SECONDS)
        if stopping.wait(delay):
            raise InterruptedError("the run stopped")


def _describe(error: grpc.RpcError) -> str:
    return f"{error.code().name}: {error.details()}"


def _make_folders(jobs: Sequence[FileJob]) -> list[Path]:
    """Makes the output folders (once, here, so that the workers never race over them)
    and checks that each can be written into; returns those it made, shallowest first."""
    folders = sorted({job.target.parent for job in jobs})
    made = sorted({f for folder in folders for f in (folder, *folder.parents) if not f.exists()},
                  key=lambda p: len(p.parts))
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            _remove_empty(made)
            raise UsageError(f"cannot make {folder}: {error.strerror or error}") from error
        if not os.access(folder, os.W_OK | os.X_OK):
            _remove_empty(made)
            raise UsageError(f"cannot write into {folder}: permission denied")
    return made


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in reversed(folders):  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


def run_folder(jobs: Sequence[FileJob], call: Callable[[bytes], bytes], report: FolderReport,
               *, workers: int, patience: float, skip_existing: bool, quiet: bool, desc: str,
               on_stop: Callable[[], None] = lambda: None) -> None:
    """Runs ``call`` (image bytes in, output bytes out) on every job with ``workers``
    requests in flight, under a progress bar, counting into ``report``. A status not about
    one file is raised, and a streak of failures raises FolderRunStopped; Ctrl-C
    (KeyboardInterrupt) and SIGTERM (Terminated) are raised too. Each calls ``on_stop``
    first, which should cancel the calls in flight (e.g. by closing their channel)."""
    from tqdm import tqdm

    if not 1 <= workers <= MAX_JOBS:
        raise UsageError(f"--jobs must be from 1 to {MAX_JOBS}, got {workers}")
    pending = [job for job in jobs if not (skip_existing and job.target.exists())]
    report.skipped = len(jobs) - len(pending)
    made = _make_folders(pending)
    stopping = threading.Event()
    lock = threading.Lock()
    streak_limit = max(STREAK, workers)
    streak = 0
    fatal: list[BaseException] = []

    def stop(error: BaseException) -> None:
        with lock:
            if stopping.is_set():
                return
            fatal.append(error)
            stopping.set()
        on_stop()

    with tqdm(total=len(jobs), initial=report.skipped, desc=desc, unit="img",
              disable=quiet, file=sys.stderr) as bar:

        def done(job: FileJob, failure: str | None = None, systemic: bool = False) -> None:
            nonlocal streak
            with lock:
                if failure is None:
                    report.written += 1
                    streak = 0
                else:
                    report.failures.append(f"{job.source}: {failure}")
                    bar.set_postfix(failed=len(report.failures), refresh=False)
                    streak = streak + 1 if systemic else streak
                bar.update(1)
                too_many = streak >= streak_limit
            if failure is not None:
                bar.write(f"warning: skipped {job.source}: {failure}", file=sys.stderr)
            if too_many:
                stop(FolderRunStopped(
                    f"the last {streak} files failed in a row ({failure}): the server may be "
                    "hung or overloaded (a longer --timeout, fewer --jobs), or the output "
                    "folder unwritable"))

        def one(job: FileJob) -> None:
            if stopping.is_set():
                return
            try:
                data = read_input(job.source)
            except UsageError as error:
                return done(job, str(error))
            try:
                with atomic_output(job.target) as write:
                    result = _call_when_not_busy(call, data, patience, stopping)
                    write(result)
            except UsageError as error:  # the output cannot be written
                return done(job, str(error), systemic=True)
            except _BusyTooLong as error:
                return done(job, str(error), systemic=True)
            except grpc.RpcError as error:
                if stopping.is_set():
                    return None  # cancelled by the stop
                code = error.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return done(job, _describe(error), systemic=True)
                if code in (grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.RESOURCE_EXHAUSTED):  # not busy: too large
                    return done(job, _describe(error))
                stop(error)
                return None
            except InterruptedError:
                return None
            except BaseException as error:
                stop(error)
                raise
            return done(job)

        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="percept-job")
        try:
            futures: list[Future[None]] = [executor.submit(one, job) for job in pending]
            while not stopping.is_set():
                _, running = wait(futures, timeout=0.5, return_when=FIRST_EXCEPTION)
                if not running:
                    break
        except (KeyboardInterrupt, Terminated) as interrupt:
            stop(interrupt)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            _remove_empty(made)  # those left empty
    if fatal:
        report.stopped = True
        raise fatal[0]


def summary(report: FolderReport, total: int, target: Path, verb: str) -> str:
    """``stylised 10 of 12 images into out (2 failed, 3 already there)``."""
    notes = []
    if report.failures:
        notes.append(f"{len(report.failures)} failed")
    if report.skipped:
        notes.append(f"{report.skipped} already there")
    line = (f"{verb} {report.written} of {total} images into {target}"
            + (f" ({', '.join(notes)})" if notes else ""))
    return line + ("; stopped early: --skip-existing resumes" if report.stopped else "")
