"""glibc allocator tuning, applied explicitly when a CLI or worker process starts
(:func:`saesweep.cli.app.main`, :mod:`saesweep.sweep.worker_main`); importing saesweep changes
nothing in the host process."""

from __future__ import annotations

import ctypes
import os
import sys

from saesweep.settings import env

#: glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the OS every step (glibc).

    glibc serves big blocks (the ``[B, m]`` intermediates of a step) with fresh ``mmap`` calls
    and unmaps them on free, so every step pays page faults on tens of MB; with mmap disabled
    and no trimming, freed blocks are reused. Memory stays bounded by the peak working set (it
    is just not given back). Skipped when any ``MALLOC_*`` tuning variable is already set,
    when ``SAESWEEP_MALLOC_TUNE=0``, or when the C library is not glibc. Returns whether it
    applied.
    """
    if env("SAESWEEP_MALLOC_TUNE") == "0" or any(k in os.environ for k in _MALLOC_ENV):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
        return ok
    except (OSError, AttributeError):
        return False
