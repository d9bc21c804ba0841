"""Give freed heap memory back to the operating system after a big job."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

_libc: Any = None
if sys.platform.startswith("linux"):
    try:
        try:
            _libc = ctypes.CDLL("libc.so.6")  # (find_library would run ldconfig at every start)
        except OSError:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"))
        _libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        _libc = None


def release_free_memory() -> bool:
    """``malloc_trim(0)`` where glibc is the allocator: a backup's part buffers and zlib state,
    freed in worker threads, stay in glibc's per-thread arenas (counted in RSS) until trimmed.
    Returns whether anything was done. Safe to call from any thread."""
    if _libc is None:
        return False
    _libc.malloc_trim(0)
    return True
