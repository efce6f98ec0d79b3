"""The bench's account of the CPU PostgreSQL and RabbitMQ spent during a run."""

from __future__ import annotations

from scripts.bench_common import servers_cpu_spent


def test_each_server_is_charged_what_its_processes_alive_at_both_readings_spent() -> None:
    before = {10: ("PostgreSQL", 1.0), 11: ("PostgreSQL", 2.0), 20: ("RabbitMQ", 5.0)}
    after = {10: ("PostgreSQL", 1.5), 11: ("PostgreSQL", 2.25), 20: ("RabbitMQ", 6.0)}

    assert servers_cpu_spent(before, after) == {"PostgreSQL": 0.75, "RabbitMQ": 1.0}


def test_a_process_that_started_or_ended_between_the_readings_is_left_out() -> None:
    before = {10: ("PostgreSQL", 1.0), 12: ("PostgreSQL", 9.0)}
    after = {10: ("PostgreSQL", 1.5), 13: ("PostgreSQL", 4.0)}

    assert servers_cpu_spent(before, after) == {"PostgreSQL": 0.5, "RabbitMQ": 0.0}
