"""Gauges a process exports only once the part that sets them runs: the broker's
connection, the relayer's lag."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

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
