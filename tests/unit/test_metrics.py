"""Gauges a process exports only once the part that sets them runs: the broker's
connection, the relayer's lag; and no series beside the service's own."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from financing import metrics
from financing.metrics import SetGauge


def test_a_process_without_a_broker_exports_no_broker_gauge() -> None:
    registry = CollectorRegistry()
    registry.register(SetGauge("financing_broker_connected", ""))

    assert registry.get_sample_value("financing_broker_connected") is None


def test_a_process_with_a_broker_exports_whether_it_is_connected() -> None:
    registry = CollectorRegistry()
    gauge = SetGauge("financing_broker_connected", "")
    registry.register(gauge)

    gauge.set(0)
    assert registry.get_sample_value("financing_broker_connected") == 0.0
    gauge.set(1)
    assert registry.get_sample_value("financing_broker_connected") == 1.0


def test_counters_and_histograms_export_no_created_series() -> None:
    """Regression: each counter and histogram exported a `*_created` gauge per label set
    beside its own series, which the README's table did not list."""
    metrics.MESSAGES.labels("q", "processed").inc()
    metrics.GRPC_HANDLING.labels("unary", "S", "M").observe(0.1)

    exported = generate_latest(REGISTRY).decode()

    assert 'financing_messages_total{outcome="processed",queue="q"}' in exported
    assert "_created" not in exported
