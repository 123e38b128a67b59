"""Folder runs for ``percept upscale`` and ``percept stylize --style``: every image of an
input folder into an output folder, a few requests in flight at once so that the server can
batch them.

What happens to each kind of failure:

- about one file (INVALID_ARGUMENT: not an image, over the pixel cap, a mask of another
  aspect ratio; RESOURCE_EXHAUSTED without a retry trailer: a message over the server's
  size limit; an unreadable or empty file, or one over the client's 64 MiB message limit,
  not sent): reported, skipped, and the run goes on;
- the server is busy (RESOURCE_EXHAUSTED with the ``grpc-retry-pushback-ms`` trailer) or
  unavailable for a while (a restart, a connection aged out): the request is retried with
  backoff, for up to ``--timeout`` seconds (one minute when unavailable);
- DEADLINE_EXCEEDED, INTERNAL, CANCELLED (not by this run), still busy or unavailable
  after that: reported and skipped; after :data:`a streak of them <STREAK>` with no
  success in between, the server gets a health check, and the run stops unless it
  answers SERVING;
- an output that cannot be written: reported and skipped; a streak of them (a full disk)
  stops the run;
- any other status (NOT_FOUND for an unknown style, UNIMPLEMENTED, ...) would fail every
  file the same way: the run stops at once.

Each output is written whole or not at all, so a stopped run resumes with
``--skip-existing``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from services.client import MAX_IMAGE_BYTES
from services.local_files import (
    Terminated,
    UsageError,
    atomic_output,
    read_image,
    signals_deferred,
)
from services.retries import RetriedTooLong, describe, retrying

#: The files a folder run reads (by extension, case-insensitively); hidden files are skipped.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: The output formats a folder run can write, by ``--format``.
OUTPUT_SUFFIXES = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
MAX_JOBS = 64
#: After this many failures in a row (or ``--jobs``, if more) of the kinds that say more
#: about the server or the disk than about the file, the run checks on the server (or
#: stops, for the disk).
STREAK = 3
#: The health check after a streak (seconds).
HEALTH_TIMEOUT_SECONDS = 5.0


class FolderRunStopped(Exception):
    """The run stopped early: a streak of failures that no file would escape."""


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
    unread_folders: int = 0
    stopped: bool = False


def _regular_or_dangling(path: str) -> bool:
    """A regular file (a pipe or device would block the read), or a link to nothing (read,
    it is reported as unreadable rather than silently left out)."""
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


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
        # a folder itself before a link to it, when both are here
        for name in sorted(folders, key=lambda n: (os.path.islink(os.path.join(root, n)), n)
                           ) if recursive else []:
            real = os.path.realpath(os.path.join(root, name))
            if name.startswith(".") or real in seen:  # a link loop, or a second way in
                continue
            seen.add(real)
            kept.append(name)
        folders[:] = sorted(kept)
        files.extend(Path(root, name) for name in names
                     if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
                     and _regular_or_dangling(os.path.join(root, name)))
    return sorted(files, key=lambda p: p.relative_to(folder).parts), problems


def plan_folder(source: Path, target: Path, output_format: str, recursive: bool) -> FolderPlan:
    """One job per image of ``source``: ``target/<relative path>`` with the format's
    extension. UsageError (nothing sent yet) for an output folder that is a file or is (with
    ``recursive``, inside) the input folder, for a folder without images, and for outputs
    that would overwrite an input, each other, or a folder."""
    if output_format not in OUTPUT_SUFFIXES:
        raise UsageError(f"--format must be one of {', '.join(OUTPUT_SUFFIXES)}, "
                         f"got {output_format!r}")
    if os.path.lexists(target) and not os.path.isdir(target):
        raise UsageError(f"{source} is a folder, so the output must be one too; {target} is "
                         "a file")
    if target.suffix.lower() in IMAGE_SUFFIXES and not os.path.isdir(target):
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
    real_source, real_target = Path(os.path.realpath(source)), Path(os.path.realpath(target))
    jobs: list[FileJob] = []
    sources: dict[Path, Path] = {}
    for path in files:
        output = target / path.relative_to(source).with_suffix(suffix)
        if output in sources:
            raise UsageError(f"{sources[output]} and {path} would both be written to {output}; "
                             "rename one of them")
        real = Path(os.path.realpath(output))
        overwritten = inputs.get(str(real))
        if overwritten is not None:
            raise UsageError(f"{path} would be written to {output}, over the input "
                             f"{overwritten}; write into another folder")
        unlinked = real_target / path.relative_to(source).with_suffix(suffix)
        if real != unlinked and real.is_relative_to(real_source):
            raise UsageError(f"{path} would be written to {output}, which a link in "
                             f"{target} leads into {source}; write into another folder")
        if os.path.isdir(output):
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


class _Stopped(Exception):
    """The run is stopping: this file is left alone."""


#: What one file's request returns: the call's future, whose result has ``.image``.
Start = Callable[[bytes], "grpc.Future"]


def _make_folders(jobs: Sequence[FileJob]) -> list[Path]:
    """Makes the output folders (once, here, so that the workers never race over them)
    and checks that each can be written into; returns those it made, shallowest first."""
    folders = sorted({job.target.parent for job in jobs})
    made = sorted({f for folder in folders for f in (folder, *folder.parents)
                   if not os.path.lexists(f)}, key=lambda p: len(p.parts))
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


#: Statuses about one file that say nothing about the server: skip it, and go on.
FILE_STATUSES = frozenset({grpc.StatusCode.INVALID_ARGUMENT,
                           grpc.StatusCode.RESOURCE_EXHAUSTED})  # without pushback: too large
#: Statuses about one file that may also mean a hung, overloaded or broken server.
SERVER_STATUSES = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
                             grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED})


@dataclass(frozen=True)
class _Failure:
    reason: str
    kind: str = "file"  # "file", "server" (a streak: a health check) or "disk" (stop)


class _Run:
    """The state of one folder run, shared by its worker threads (under ``lock``)."""

    def __init__(self, start: Start, report: FolderReport, bar: Any, *, patience: float,
                 streak_limit: int, check_health: Callable[[], grpc.Future]) -> None:
        self.start, self.report, self.bar = start, report, bar
        self.patience, self.streak_limit = patience, streak_limit
        self.check_health = check_health
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.in_flight: set[grpc.Future] = set()
        self.fatal: list[BaseException] = []
        self.streaks = {"server": 0, "disk": 0}  # failures of each kind in a row

    def stop(self, error: BaseException) -> None:
        """Records the first reason to stop, starts no more calls and cancels those in
        flight (the channel stays open, so no call can start on a closed one)."""
        with self.lock:
            if not self.stopping.is_set():
                self.fatal.append(error)
                self.stopping.set()
            for future in self.in_flight:  # again on a second call: one cut short by a
                future.cancel()  # signal may not have cancelled them all

    def tracked(self, begin: Callable[[], grpc.Future]) -> Any:
        """The result of the call that ``begin()`` starts; a stop cancels it (_Stopped)."""
        with self.lock:  # a stop either comes first, or sees this call and cancels it
            if self.stopping.is_set():
                raise _Stopped
            future = begin()
            self.in_flight.add(future)
        try:
            return future.result()
        except grpc.FutureCancelledError as error:
            raise _Stopped from error
        except grpc.RpcError:
            if self.stopping.is_set():
                raise _Stopped from None  # cancelled by the stop
            raise
        finally:
            with self.lock:
                self.in_flight.discard(future)

    def call_once(self, data: bytes) -> bytes:
        return bytes(self.tracked(lambda: self.start(data)).image)

    def server_serving(self) -> bool:
        """Whether the server answers its health check with SERVING (a server without the
        health service counts as serving); a stop cuts the check short (_Stopped)."""
        try:
            answer = self.tracked(self.check_health)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNIMPLEMENTED
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def call(self, data: bytes) -> bytes:
        """The call, retried with backoff while the server answers busy (for up to
        ``patience`` seconds) or unavailable (up to a minute of it): services/retries.py."""
        def wait(seconds: float) -> None:
            if self.stopping.wait(seconds):
                raise _Stopped

        return retrying(lambda: self.call_once(data), patience=self.patience,
                        retry_unavailable=True, wait=wait)

    def outcome(self, job: FileJob) -> _Failure | None:
        """None once ``job`` is written, else why it failed; raises _Stopped, or what
        should stop the run."""
        try:
            data = read_image(job.source, limit=MAX_IMAGE_BYTES)
        except UsageError as error:
            return _Failure(str(error))
        try:
            with atomic_output(job.target) as write:
                write(self.call(data))
        except UsageError as error:  # the output cannot be written
            return _Failure(str(error), "disk")
        except RetriedTooLong as error:
            return _Failure(str(error), "server")
        except grpc.RpcError as error:
            if error.code() in FILE_STATUSES:
                return _Failure(describe(error))
            if error.code() in SERVER_STATUSES:
                return _Failure(describe(error), "server")
            raise
        return None

    def record(self, job: FileJob, failure: _Failure | None) -> None:
        with self.lock:
            if failure is None:
                self.report.written += 1
                self.streaks = dict.fromkeys(self.streaks, 0)
            else:
                self.report.failures.append(f"{job.source}: {failure.reason}")
                self.bar.set_postfix(failed=len(self.report.failures), refresh=False)
            self.bar.update(1)
            streak = 0
            if failure is not None and failure.kind in self.streaks:
                self.streaks[failure.kind] += 1
                streak = self.streaks[failure.kind]
                if streak >= self.streak_limit:
                    self.streaks[failure.kind] = 0  # one check per streak
        if failure is None:
            return
        self.bar.write(f"warning: skipped {job.source}: {failure.reason}", file=sys.stderr)
        if streak < self.streak_limit:
            return
        if failure.kind == "disk":
            self.stop(FolderRunStopped(f"the last {streak} outputs could not be written "
                                       f"({failure.reason})"))
        elif not self.server_serving():
            self.stop(FolderRunStopped(
                f"the last {streak} files failed in a row ({failure.reason}), and the server "
                f"does not answer a health check with SERVING within "
                f"{HEALTH_TIMEOUT_SECONDS:g} s: it is down, hung or broken"))
        else:
            self.bar.write(f"note: the last {streak} files failed in a row, but the server "
                           "answers its health check, so the run goes on (a longer "
                           "--timeout may help)", file=sys.stderr)

    def one(self, job: FileJob) -> None:
        """A worker's whole job: nothing it raises is lost, all of it stops the run."""
        try:
            if not self.stopping.is_set():
                self.record(job, self.outcome(job))
        except _Stopped:
            return
        except BaseException as error:
            self.stop(error)


def run_folder(jobs: Sequence[FileJob], start: Start, report: FolderReport, *, workers: int,
               patience: float, skip_existing: bool, quiet: bool, desc: str,
               check_health: Callable[[], grpc.Future]) -> None:
    """Runs ``start`` (image bytes in, the call's future out) on every job with ``workers``
    requests in flight, under a progress bar, counting into ``report``. A status not about
    one file is raised, and so is FolderRunStopped after a streak of failures when the
    health check that ``check_health()`` starts (a future) does not answer SERVING;
    Ctrl-C (KeyboardInterrupt) and SIGTERM (Terminated) are raised too. Each first cancels
    the calls in flight, the health check included, and lets the workers end."""
    from tqdm import tqdm

    if not 1 <= workers <= MAX_JOBS:
        raise UsageError(f"--jobs must be from 1 to {MAX_JOBS}, got {workers}")
    pending = [job for job in jobs if not (skip_existing and os.path.lexists(job.target))]
    report.skipped = len(jobs) - len(pending)
    made = _make_folders(pending)
    with tqdm(total=len(jobs), initial=report.skipped, desc=desc, unit="img",
              disable=quiet, file=sys.stderr) as bar:
        run = _Run(start, report, bar, patience=patience, streak_limit=max(STREAK, workers),
                   check_health=check_health)
        queue = iter(pending)
        # Each worker sets its own event as it ends. (Not Thread.join: an exception raised
        # by a signal handler inside join() can leave a live thread marked as ended, and
        # the process would then exit under a worker with a temporary file open.)
        ended = [threading.Event() for _ in range(min(workers, len(pending)))]

        def work(done: threading.Event) -> None:
            try:
                while not run.stopping.is_set():
                    with run.lock:
                        job = next(queue, None)
                    if job is None:
                        return
                    run.one(job)
            finally:
                done.set()

        started: list[threading.Event] = []
        finished = False
        try:
            for i, done in enumerate(ended):
                started.append(done)  # before start(), which a signal may interrupt
                try:
                    threading.Thread(target=work, args=(done,), name=f"percept-job-{i}",
                                     daemon=True).start()
                except RuntimeError:  # "can't start new thread": none to wait for
                    done.set()
                    raise
            for done in started:
                while not done.wait(0.5):  # short waits: Ctrl-C is seen at once
                    pass
            finished = True
        except (KeyboardInterrupt, Terminated) as interrupt:
            run.stop(interrupt)  # recorded: it is raised again below
        finally:
            # a second Ctrl-C must not cut the cleanup short (or skip the stop)
            with signals_deferred():
                if not finished:
                    report.stopped = True
                    run.stop(KeyboardInterrupt())  # cancels what is still in flight
                for done in started:
                    done.wait()
                _remove_empty(made)  # those left empty
    if run.fatal:
        report.stopped = True
        raise run.fatal[0]


def summary(report: FolderReport, total: int, target: Path, verb: str) -> str:
    """``stylised 7 of 12 images into out (2 failed, 3 already there)``."""
    notes = []
    if report.failures:
        notes.append(f"{len(report.failures)} failed")
    if report.skipped:
        notes.append(f"{report.skipped} already there")
    if report.unread_folders:
        notes.append(f"{report.unread_folders} folder{'s' * (report.unread_folders > 1)} "
                     "not read")
    line = (f"{verb} {report.written} of {total} images into {target}"
            + (f" ({', '.join(notes)})" if notes else ""))
    return line + ("; stopped early: --skip-existing resumes" if report.stopped else "")
