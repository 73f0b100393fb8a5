"""Process memory tuning (glibc ``mallopt``), for loops that allocate and free large tensors.

With glibc, every freed block above the mmap threshold (e.g. a 50k×512 float activation, 100 MB)
is returned to the OS and page-faulted back on the next allocation, which can cost more than the
arithmetic of an elementwise op. :func:`reuse_freed_memory` keeps such blocks for reuse within a
block of code.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


@contextmanager
def reuse_freed_memory():
    """Within the block, glibc keeps freed large blocks for reuse (no mmap, no trimming); on exit
    the default values are set again (glibc's dynamic mmap threshold stays off, as after any
    ``mallopt``) and the kept memory is returned to the OS. No-op without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        libc, ok = None, False
    try:
        yield
    finally:
        if ok:
            for param, value in _GLIBC_DEFAULTS.items():
                libc.mallopt(param, value)
            libc.malloc_trim(0)
