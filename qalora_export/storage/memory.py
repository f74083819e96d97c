"""Keeping a streaming process's memory flat: glibc's malloc threshold fixed at start-up.

glibc serves allocations above its mmap threshold with their own mappings, returned to the system
when freed, and raises that threshold (up to 32 MiB) to the size of every such block freed. After
the first few layer-sized blocks, the row blocks that export and verify allocate and free per layer
(a few MB each) then come from the heap, which fragments and does not shrink: peak RSS grows with the
layer count although no layer is kept (measured on a GGUF export with its weight-level verify: +50 MiB
from 4 to 24 layers; flat with the threshold fixed; docs/scale.md). Fixing the threshold turns the
dynamic adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def fix_malloc_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Call glibc's ``mallopt(M_MMAP_THRESHOLD, threshold)``; False where there is no glibc (a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)))
    except (OSError, AttributeError):  # musl and others: no mallopt; memory only, never an error
        return False
