"""Folder runs for ``percept upscale`` and ``percept stylize --style``: every image of an
input folder into an output folder, a few requests in flight at once so that the server can
batch them.

A file the server refuses (INVALID_ARGUMENT: not an image, too large; DEADLINE_EXCEEDED)
or that cannot be read or written is reported and skipped; RESOURCE_EXHAUSTED (the server
is busy) is retried with backoff; any other status (UNAVAILABLE, NOT_FOUND for an unknown
style, ...) would fail every file the same way, so it stops the run. Each output is written
whole or not at all, so an interrupted run can be resumed with ``--skip-existing``.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.local_files import UsageError, atomic_output, read_input

#: The files a folder run reads (by extension, case-insensitively); hidden files are skipped.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: The output formats a folder run can write, by ``--format``.
OUTPUT_SUFFIXES = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
#: Statuses that concern one file: reported, and the run goes on.
PER_FILE_STATUSES = frozenset({grpc.StatusCode.INVALID_ARGUMENT,
                               grpc.StatusCode.DEADLINE_EXCEEDED})
#: Waits before the retries of a request refused as RESOURCE_EXHAUSTED (seconds, +-25%).
BUSY_BACKOFF_SECONDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MAX_JOBS = 64


@dataclass(frozen=True)
class FileJob:
    source: Path
    target: Path


@dataclass
class FolderReport:
    written: int = 0
    skipped: int = 0  # --skip-existing
    failures: list[str] = field(default_factory=list)


def image_files(folder: Path, recursive: bool) -> list[Path]:
    """The image files of ``folder`` (and its subfolders when ``recursive``), sorted; hidden
    files and folders (a name starting with ".") are left out."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern)
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def plan_folder(source: Path, target: Path, output_format: str,
                recursive: bool) -> list[FileJob]:
    """One job per image of ``source``: ``target/<relative path>`` with the format's
    extension. UsageError for an output folder that is a file or is (inside) the input
    folder, for an empty folder, and for two inputs that would write the same output."""
    if output_format not in OUTPUT_SUFFIXES:
        raise UsageError(f"--format must be one of {', '.join(OUTPUT_SUFFIXES)}, "
                         f"got {output_format!r}")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{source} is a folder, so the output must be one too; {target} is "
                         "a file")
    if target.suffix.lower() in (*OUTPUT_SUFFIXES.values(), ".jpeg") and not target.exists():
        raise UsageError(f"{source} is a folder, so the output must be one too, not "
                         f"{target}; --format picks the files' format (default png)")
    inside = target.resolve().is_relative_to(source.resolve())
    if target.resolve() == source.resolve() or (recursive and inside):
        raise UsageError(f"write into a folder outside {source}, not {target}: the outputs "
                         "would mix with the inputs")
    files = image_files(source, recursive)
    if not files:
        raise UsageError(f"no images in {source} ({', '.join(IMAGE_SUFFIXES)}"
                         f"{'' if recursive else '; --recursive descends into subfolders'})")
    suffix = OUTPUT_SUFFIXES[output_format]
    jobs: list[FileJob] = []
    seen: dict[Path, Path] = {}
    for path in files:
        output = target / path.relative_to(source).with_suffix(suffix)
        if output in seen:
            raise UsageError(f"{seen[output]} and {path} would both be written to {output}; "
                             "rename one of them")
        seen[output] = path
        jobs.append(FileJob(path, output))
    return jobs


def _call_when_not_busy(call: Callable[[bytes], bytes], data: bytes,
                        stopping: threading.Event) -> bytes:
    for wait_seconds in (*BUSY_BACKOFF_SECONDS, None):
        try:
            return call(data)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or wait_seconds is None:
                raise
        if stopping.wait(wait_seconds * random.uniform(0.75, 1.25)):
            raise InterruptedError
    raise AssertionError("unreachable")


def _describe(error: grpc.RpcError) -> str:
    return f"{error.code().name}: {error.details()}"


def run_folder(jobs: Sequence[FileJob], call: Callable[[bytes], bytes], *, workers: int,
               skip_existing: bool, quiet: bool, desc: str,
               on_stop: Callable[[], None] = lambda: None) -> FolderReport:
    """Runs ``call`` (image bytes in, output bytes out) on every job with ``workers``
    requests in flight, under a progress bar. A status that is not about one file is
    raised once the requests in flight have ended; Ctrl-C likewise, after ``on_stop`` (which
    should cancel the calls in flight, e.g. by closing their channel)."""
    from tqdm import tqdm

    if not 1 <= workers <= MAX_JOBS:
        raise UsageError(f"--jobs must be from 1 to {MAX_JOBS}, got {workers}")
    report = FolderReport()
    pending = [job for job in jobs if not (skip_existing and job.target.exists())]
    report.skipped = len(jobs) - len(pending)
    folders = {job.target.parent for job in pending}
    made = sorted({f for folder in folders for f in (folder, *folder.parents) if not f.exists()},
                  key=lambda p: len(p.parts))
    for folder in sorted(folders):  # made here, once, not raced over by the workers
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot make {folder}: {error.strerror or error}") from error
    stopping = threading.Event()
    lock = threading.Lock()

    with tqdm(total=len(jobs), initial=report.skipped, desc=desc, unit="img",
              disable=quiet, file=sys.stderr) as bar:

        def fail(job: FileJob, reason: str) -> None:
            with lock:
                report.failures.append(f"{job.source}: {reason}")
                bar.set_postfix(failed=len(report.failures), refresh=False)
            bar.write(f"warning: skipped {job.source}: {reason}", file=sys.stderr)

        def one(job: FileJob) -> None:
            if stopping.is_set():
                return
            try:
                data = read_input(job.source)
                with atomic_output(job.target) as write:
                    write(_call_when_not_busy(call, data, stopping))
            except UsageError as error:
                fail(job, str(error))
            except grpc.RpcError as error:
                if stopping.is_set() or error.code() not in PER_FILE_STATUSES:
                    raise
                fail(job, _describe(error))
            else:
                with lock:
                    report.written += 1
            bar.update(1)  # not for a job that stops the run

        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="percept-job")
        futures: list[Future[None]] = []
        try:
            futures = [executor.submit(one, job) for job in pending]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                stopping.set()
                executor.shutdown(wait=True, cancel_futures=True)
                raise errors[0]  # type: ignore[misc]
        except KeyboardInterrupt:
            stopping.set()
            executor.shutdown(wait=False, cancel_futures=True)
            on_stop()
            executor.shutdown(wait=True)
            raise
        finally:
            executor.shutdown(wait=True)
            for folder in reversed(made):  # deepest first: those left empty go again
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return report


def summary(report: FolderReport, total: int, target: Path, verb: str) -> str:
    """``stylised 10 of 12 images into out/ (2 failed, 3 already there)``."""
    notes = []
    if report.failures:
        notes.append(f"{len(report.failures)} failed")
    if report.skipped:
        notes.append(f"{report.skipped} already there")
    return (f"{verb} {report.written} of {total} images into {target}"
            + (f" ({', '.join(notes)})" if notes else ""))

