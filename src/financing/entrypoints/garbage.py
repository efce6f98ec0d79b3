"""Garbage collection as `financing serve` runs it (`collect_as_a_server`, then the
`collect_in_full` worker)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
from collections.abc import Callable

# Garbage collection for a long-running process whose Queries lists build millions of
# objects that live until their reply is written. With CPython's thresholds (700, 10,
# 10), sixteen lists of 150,000 invoices side by side ran 60 full collections that found
# almost nothing to free: 20 s of 57, up to 0.7 s each, holding the event loop (and the
# health probes with it, which took that for outages). Young collections a fourteenth
# as often, full ones a thirty-fifth: 2 s in all, the lists done in 40 s. Rarer full
# collections still (a threshold of 100: 0.3 s) let the cycles of cancelled lists live
# on: 16 lists cut by their callers' deadlines, six times, took the process to 910 MB,
# where this holds it near 400 MB (and CPython's own near 350 MB).
GC_THRESHOLDS = (10_000, 10, 25)


# A full collection at least this often (seconds). With the thresholds above, one waits
# for 25 of the middle generation's, and under a steady load none ran after start-up:
# the cycles outages leave (failed connections, calls cut by their deadlines, retries,
# each held by its exception's traceback) piled up in the oldest generation. After four
# 20-s outages of the command database whose clients saw calls fail, 64,000 unreachable
# objects were held and the process's RSS had gone 54 -> 91 MB (57 -> 102 MB in another
# run); with CPython's thresholds it stayed near 70 MB. With this, 2,000-3,000 are held
# between collections, where 12,000-34,000 were after outages whose calls did not fail
# (RSS near 70 MB either way). A collection takes 5-40 ms on a quiet machine, up to a
# quarter of a second on a loaded one (a middle-generation collection stalls as long).
FULL_COLLECTION_EVERY = 60.0


def collect_as_a_server() -> None:
    """Garbage collection as `financing serve` runs it: what is loaded at start-up (the
    modules, their classes and functions) is set aside for good, so that no full
    collection walks it again, and collections run less often (GC_THRESHOLDS)."""
    gc.collect()  # what start-up left to free goes now, not frozen with the rest
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _malloc_trim() -> Callable[[int], object] | None:
    """glibc's `malloc_trim`, where the C library has it."""
    try:
        trim: Callable[[int], object] = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


# What a full collection freed is given back to the system: glibc kept it. An outage of
# the command database under load built up ~60 tasks and ~35,000 objects, all freed
# once it was over, and the process's RSS stayed ~14 MB higher for good (60 -> 90 MB in
# a soak), ~9 MB of it free heap the C library kept.
TRIM = _malloc_trim()


async def collect_in_full(
    every: float = FULL_COLLECTION_EVERY, trim: Callable[[int], object] | None = TRIM
) -> None:
    """Until cancelled: a full collection whenever none ran for `every` seconds, and what
    it freed given back to the system (`trim`)."""
    while True:
        before = gc.get_stats()[2]["collections"]
        await asyncio.sleep(every)  # the period
        if gc.get_stats()[2]["collections"] == before:
            gc.collect()
            if trim is not None:
                trim(0)
