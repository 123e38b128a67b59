"""libtiff's error messages, taken off the process's stderr and given to the client.

libtiff, which Pillow decodes compressed TIFFs with, prints what it finds wrong in a file
to stderr ("ZIPDecode: Decoding error at scanline 0."), past Python's logging: every
damaged TIFF a client sent put a line that is not JSON into the server's JSON log, while
the client got only Pillow's "decoder error -2". :func:`route_libtiff_messages` installs
an error handler that keeps the last error of each thread instead, for the decoder's
error to quote (:func:`take_libtiff_error`). (Warnings need nothing: Pillow clears
libtiff's warning handler whenever it starts a TIFF decoder.)

The handler is libtiff's process-wide one, installed through ctypes into the libtiff
Pillow itself loaded. Where that library cannot be found (a Pillow built without libtiff,
or linked statically), nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

#: libtiff's TIFFErrorHandler: void (*)(const char *module, const char *fmt, va_list ap).
#: A va_list argument arrives as a pointer on x86-64 and arm64 Linux (an array type on
#: the one, a structure over 16 bytes passed by reference on the other), and vsnprintf
#: takes it the same way.
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
_MESSAGE_BYTES = 512

_vsnprintf: Any = None  # the C library's, once route_libtiff_messages() has found it
_last_error = threading.local()
_installed: list[object] = []  # the ctypes callback, kept alive while libtiff holds it
_lock = threading.Lock()


def _libtiff_path() -> str | None:
    """The file of the libtiff that Pillow's core module loaded (from the process's memory
    map, so that the handlers go to that copy), else the system's."""
    from PIL import _imaging  # noqa: F401  (loads libtiff when Pillow links it)
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libtiff" in path and ".so" in path:
                    return path
    except OSError:
        pass
    return ctypes.util.find_library("tiff")


def _format(fmt: bytes | None, args: int | None) -> str:
    buffer = ctypes.create_string_buffer(_MESSAGE_BYTES)
    _vsnprintf(buffer, _MESSAGE_BYTES, fmt or b"", args)
    return buffer.value.decode("utf-8", "replace")


def _message(module: bytes | None, fmt: bytes | None, args: int | None) -> str:
    text = _format(fmt, args)
    name = (module or b"").decode("utf-8", "replace")
    # Pillow reads from memory under the name "tempfile.tif", which says nothing
    return f"{name}: {text}" if name and name != "tempfile.tif" else text


def _on_error(module: bytes | None, fmt: bytes | None, args: int | None) -> None:
    _last_error.message = _message(module, fmt, args)


def take_libtiff_error() -> str | None:
    """The last error libtiff reported on this thread since the previous call, if any."""
    message = getattr(_last_error, "message", None)
    _last_error.message = None
    return message


def route_libtiff_messages() -> bool:
    """Installs the error handler (once; later calls do nothing). False where Pillow's
    libtiff or the C library's vsnprintf cannot be reached, and messages stay on stderr."""
    global _vsnprintf
    with _lock:
        if _installed:
            return True
        path = _libtiff_path()
        if path is None:
            return False
        try:
            libtiff = ctypes.CDLL(path)
            _vsnprintf = ctypes.CDLL(None).vsnprintf  # the C library the process runs on
            _vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                   ctypes.c_void_p]
            _vsnprintf.restype = ctypes.c_int
            callback = _HANDLER(_on_error)
            libtiff.TIFFSetErrorHandler.argtypes = [_HANDLER]
            libtiff.TIFFSetErrorHandler.restype = ctypes.c_void_p
            libtiff.TIFFSetErrorHandler(callback)
        except (OSError, AttributeError) as error:
            log.info("libtiff's messages stay on stderr: %s", error)
            return False
        _installed.append(callback)
        return True

