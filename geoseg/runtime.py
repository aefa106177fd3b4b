"""Process-wide settings that the command line applies once, at start-up.

Library code never applies these to a process it did not start: like logging, they belong to
whoever owns the process. Worker processes that geoseg starts itself get them too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MALLOC_ENV", "allocator_wanted", "cpu_cores", "tune_allocator"]

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# The same settings as environment variables, for worker processes started elsewhere
# (``dask worker``, a batch system): glibc reads them when a process starts.
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}


def allocator_wanted() -> bool:
    """Whether geoseg may set the allocator: glibc's Linux, and the user set neither a
    ``MALLOC_*`` variable (their settings win) nor ``GEOSEG_TUNE_MALLOC=0``."""
    if os.environ.get("GEOSEG_TUNE_MALLOC", "1") == "0":
        return False
    return sys.platform.startswith("linux") and not any(k.startswith("MALLOC_") for k in os.environ)


def tune_allocator() -> bool:
    """Keep freed memory for reuse instead of handing it back to the kernel after every chunk.

    A U-Net forward pass allocates activation tensors of tens to hundreds of MiB and frees them
    a moment later. glibc serves blocks over 32 MiB with ``mmap`` and gives them back on
    ``free``, so every chunk pays for hundreds of thousands of page faults and for zeroing the
    fresh pages (on a 2-core CPU: 0.58 s → 0.70–0.90 s per 640² px resnet18 forward, with
    about 400,000 minor faults per pass). With one arena, no ``mmap`` for large blocks and a
    high trim threshold, the heap keeps the pages of the largest pass and reuses them; the
    peak stays that of one forward pass.

    Returns True when applied: glibc only, and only where :func:`allocator_wanted`.
    """
    if not allocator_wanted():
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
    ok = ok and mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    return bool(ok)


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
