"""`financing serve` collects garbage as a server whose lists build millions of objects
at once: fewer, cheaper collections, and nothing loaded at start-up walked again."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from financing.entrypoints import garbage
from financing.entrypoints.garbage import GC_THRESHOLDS, collect_as_a_server, collect_in_full
from tests.support.infra import wait_until


@pytest.fixture
def restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored")
def test_what_is_loaded_is_set_aside_and_collections_run_less_often() -> None:
    """Regression: sixteen lists of 150,000 invoices side by side ran 60 full collections
    that freed almost nothing, 20 s of 57, each holding the event loop up to 0.7 s."""
    gc.unfreeze()
    collect_as_a_server()

    assert gc.get_freeze_count() > 10_000  # the modules loaded, their classes and functions
    assert gc.get_threshold() == GC_THRESHOLDS
    young, _, full = GC_THRESHOLDS
    assert young >= 10 * 700 and full > 10  # CPython's (700, 10, 10)


class Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.mark.usefixtures("restored")
async def test_a_full_collection_runs_when_none_ran_for_a_period() -> None:
    """Regression: with full collections waiting for 25 of the middle generation's, none
    ran under a steady load, and the cycles each outage left in the oldest generation
    piled up (64,000 unreachable objects and 45 MB more after four outages)."""
    gc.unfreeze()
    collect_as_a_server()
    held = [Cycle()]
    gone = weakref.ref(held[0])
    gc.collect(1)
    gc.collect(1)  # survived twice: in the oldest generation, which only a full one walks
    held.clear()
    full = gc.get_stats()[2]["collections"]
    collecting = asyncio.create_task(collect_in_full(every=0.05))

    async def collected() -> bool:
        return gone() is None

    try:
        await wait_until(collected, timeout=5, what="the cycle collected")
    finally:
        collecting.cancel()
    assert gc.get_stats()[2]["collections"] > full


@pytest.mark.usefixtures("restored")
async def test_what_a_full_collection_freed_is_given_back_to_the_system() -> None:
    """Regression (a probe): an outage of the command database under load left the RSS
    ~14 MB higher for good, free heap the C library kept after the collection freed what
    the outage had built up."""
    trims: list[int] = []

    def trimmed(pad: int) -> int:
        trims.append(pad)
        return 1

    collecting = asyncio.create_task(collect_in_full(every=0.05, trim=trimmed))

    async def given_back() -> bool:
        return bool(trims)

    try:
        await wait_until(given_back, timeout=5, what="a trim after a full collection")
    finally:
        collecting.cancel()
    assert trims[0] == 0
    assert garbage.TRIM is not None  # glibc's, on this platform
