"""The command line's local files: inputs read with a clear error, outputs written whole
or not at all (a temporary file beside the target, renamed into place)."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType


class UsageError(Exception):
    """A problem with the command line or local files (exit code 2)."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (see :func:`sigterm_raises`; exit code 143)."""


SignalHandler = Callable[[int, FrameType | None], None]


@contextlib.contextmanager
def _handling(signals: tuple[signal.Signals, ...], handler: SignalHandler) -> Iterator[None]:
    """``handler`` for ``signals`` within the block, the previous handlers restored after.
    Only the main thread may set handlers: elsewhere, a no-op. A signal that is ignored
    stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in signals
                if signal.getsignal(number) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for number, earlier in previous.items():
            # None: a handler installed from C, which Python cannot restore; the default
            signal.signal(number, signal.SIG_DFL if earlier is None else earlier)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread, as Ctrl-C raises
    KeyboardInterrupt, so that the temporary files of unfinished outputs are removed
    rather than left behind by the default action (an immediate exit)."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    with _handling((signal.SIGTERM,), terminate):
        yield


def read_input(path: str | Path, what: str = "input") -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read {what} {path}: {error.strerror or error}") from error


def size_text(size: int) -> str:
    """A file size as the CLI's messages give it: ``65.0 MiB``, or bytes when small."""
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size:,} bytes"


def read_image(path: str | Path, what: str = "input", *, limit: int) -> bytes:
    """An image file to send, refused (UsageError, nothing sent) when it cannot be read,
    is empty (an empty image field means "none" on the wire) or is over ``limit`` bytes
    (gRPC would refuse the whole request: its message-size limit). A large file is
    refused from its size, before it is read."""
    try:
        with open(path, "rb") as file:
            status = os.fstat(file.fileno())
            regular = stat.S_ISREG(status.st_mode)
            # a pipe or device has no size: read at most one byte past the limit
            data = b"" if regular and status.st_size > limit else file.read(limit + 1)
    except OSError as error:
        raise UsageError(f"cannot read {what} {path}: {error.strerror or error}") from error
    if len(data) > limit or (regular and status.st_size > limit):
        size = size_text(status.st_size) if regular else f"more than {size_text(limit)}"
        raise UsageError(f"{what} {path} is {size}, over the {limit / 2**20:.0f} MiB a "
                         "message may carry")
    if not data:
        raise UsageError(f"{what} {path} is an empty file")
    return data


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Read once, at import: os.umask() can only be read by setting it, which would race with
#: the threads of a folder run creating files.
_UMASK = _current_umask()


@contextlib.contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """Within the block, SIGINT and SIGTERM are noted (in the yielded list), not raised, so
    that cleanup (cancelling calls, removing temporary files, closing a channel: grpc can
    hang on a channel whose closing was interrupted) runs to its end; the caller raises
    afterwards. Outside the main thread, a no-op."""
    noted: list[int] = []
    with _handling((signal.SIGINT, signal.SIGTERM), lambda signum, frame: noted.append(signum)):
        yield noted


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Callable[[bytes], None]]:
    """Opens a temporary file beside ``path`` (making its folders) before the request is
    sent, so an unwritable output fails at once, not after the server's work; yields the
    function that writes the result and renames it into place. The target, which may be
    the input itself, is never left half written; a symbolic link is written through."""
    target = Path(os.path.realpath(path))
    if os.path.isdir(target):
        raise UsageError(f"cannot write {path}: it is a folder")
    made = []  # the folders this makes, removed again if nothing is written
    folder = target.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise UsageError(f"cannot write {path}: {folder} is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                             suffix=".partial")
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from error

    file = os.fdopen(handle, "wb")
    # mkstemp makes the file private; give it what a plain open() would (or the mode of
    # the file it replaces)
    try:
        mode = target.stat().st_mode & 0o7777
    except OSError:  # a new file
        mode = 0o666 & ~_UMASK

    def write(data: bytes) -> None:
        try:
            with file:
                file.write(data)
            os.chmod(temporary, mode)
            os.replace(temporary, target)
        except OSError as error:
            raise UsageError(f"cannot write {path}: {error.strerror or error}") from error

    try:
        yield write
    finally:
        file.close()  # a no-op once written
        with contextlib.suppress(OSError):  # gone, or its folder made read-only meanwhile
            os.unlink(temporary)  # left only when the call or the write failed
        if not os.path.lexists(target):
            for empty in made:  # deepest first
                with contextlib.suppress(OSError):
                    empty.rmdir()
