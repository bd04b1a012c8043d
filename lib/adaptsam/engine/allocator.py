"""glibc malloc settings for a process that runs the model.

Measured on the 2-core machine (LiteMedSAM, one 256 px slice): with glibc's defaults an encoder
pass took 1.7-2.0 s and ~600,000 minor page faults - its large intermediate tensors are mmapped
and unmapped on every allocation, so every pass faults ~2 GB of fresh pages in again. Keeping
freed memory for reuse (no mmap below 1 GiB, no trimming below 1 GiB) brings that to 0 faults
and 1.1-1.2 s per pass; a decoder pass in a server worker thread went from ~2,400 faults to 0.
One arena for all threads matters for the server: each worker thread otherwise gets its own
arena, whose small heaps mmap large blocks anyway.

It must run before other threads allocate: a thread that allocated earlier keeps its own arena,
and with the arena limit reached later threads are spread over the existing arenas again (a
background encoder measured 1.2-1.4 s per slice instead of 1.0 s when the settings came after
the model had been loaded). So processes we start get the same settings from the environment
(`MALLOC_ENV`: `make serve`, the Dockerfile, the tests' and benchmarks' servers), and the app
module, the trainer and the Runtime call `keep_freed_memory()` for processes started otherwise
(a no-op the second time). The price: up to `keep_bytes` of freed
memory stays with the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

_done = False

# The same settings for a process's environment, read by glibc before the first allocation.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def keep_freed_memory(keep_bytes: int = 1 << 30, mmap_from: int = 1 << 30) -> bool:
    """Configure glibc malloc once per process; False where it is not glibc (nothing changes)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(p, v) == 1 for p, v in ((M_ARENA_MAX, 1), (M_TRIM_THRESHOLD, keep_bytes), (M_MMAP_THRESHOLD, mmap_from)))
    _done = ok
    logger.info("malloc: one arena, freed memory kept up to %d MB, mmap from %d MB: %s", keep_bytes >> 20, mmap_from >> 20, ok)
    return ok
