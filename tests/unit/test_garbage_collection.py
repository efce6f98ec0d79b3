"""`financing serve` collects garbage as a server whose lists build millions of objects
at once: fewer, cheaper collections, and nothing loaded at start-up walked again."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from financing.entrypoints.service import GC_THRESHOLDS, collect_as_a_server


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
