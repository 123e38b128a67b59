"""glibc malloc settings for a serving process (``--retain-memory``, on by default): memory a
forward pass frees stays in the process for the next request, instead of going back to the
kernel and being faulted back in, page by page, on the next pass.

By default glibc serves allocations over a threshold (128 kB, raised as such blocks are
freed, to 32 MB at most) with a fresh mmap each time, hands free memory at the top of the
heap back to the kernel, and gives every thread that allocates an arena of its own whose
heaps (64 MB each) are unmapped again once they empty. A style or super-resolution pass
allocates and frees its activations on every request: tens of MB at 256 px, about 1 GB for
a 1024 px style image. With the defaults, each page of them is zero-filled by the kernel on
first touch, on every request. The served style net at 1024 px in the batcher thread
(2-core AVX2 CPU) took 174,000 page faults and 750 ms a pass with the defaults, and 13 page
faults and 499 ms with these settings. They make plain eager PyTorch faster too: 1,523 ms
(497,000 faults) against 855 ms.

The settings: one arena for every thread (``M_ARENA_MAX``), no mmap below 1 GiB
(``M_MMAP_THRESHOLD``) and no trimming until 2 GiB are free at the top of the heap
(``M_TRIM_THRESHOLD``). The cost is that the process keeps its peak memory, bounded by the
tile and batch caps, instead of shrinking between requests, and peaks somewhat higher: a
2048x2048 -> 8192x8192 upscale peaked at 2,145 MB against 1,866 MB, and took 18.2 s
against 28.3 s.

They must be applied before other threads first allocate (a thread keeps the arena it got),
so ``percept serve`` applies them first thing; an in-process server (tests, benchmarks)
does not, and leaves that process's allocator alone.

What the settings keep is meant to be a forward pass's working set, reused by the next
pass. A burst of large requests leaves more: 60 concurrent 60 MiB requests (refused as
bad images) raised a server from 1.3 to 6.5 GB for good, the freed blocks below the top of
the heap, where the trim threshold never looks. So once no call whose request message was
large is in progress, the server calls :func:`release_free_memory` (glibc's
``malloc_trim(0)``: every free page of the heap goes back to the kernel, wherever it lies;
services/common/server.py, WorkCalls). The next forward pass faults its activations in
again, once: a small cost beside receiving and decoding a request that large.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("percept.allocator")

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD_BYTES = 1 << 30
TRIM_THRESHOLD_BYTES = 2 << 30

#: Whether :func:`retain_freed_memory` applied its settings to this process.
_retaining = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has gnu_get_libc_version, mallopt and
    malloc_trim); looked up once (find_library may run a subprocess)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Applies the settings above to this process. False where the C library is not glibc
    (nothing changed) or refused one of them (the others stay applied; logged)."""
    libc = _glibc()
    if libc is None:
        log.info("not glibc: the allocator keeps its defaults")
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    refused = [param for param, value in settings if libc.mallopt(param, value) != 1]
    version = libc.gnu_get_libc_version().decode()
    if refused:
        log.warning("glibc %s refused mallopt %s", version, refused)
        return False
    global _retaining
    _retaining = True
    log.info("glibc %s: one arena, no mmap below 1 GiB, no trim below 2 GiB", version)
    return True


def retaining() -> bool:
    """Whether this process keeps freed memory (:func:`retain_freed_memory` applied)."""
    return _retaining


def release_free_memory() -> bool:
    """Gives every free page of the heap back to the kernel (glibc ``malloc_trim(0)``),
    wherever it lies, not only at the top. Blocks the allocator while it runs (tens of ms
    for gigabytes): call it off the event loop, and rarely. False where the C library is
    not glibc or nothing could be released."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1
