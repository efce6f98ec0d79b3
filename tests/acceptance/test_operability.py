"""What generic gRPC and Prometheus tools see: health checking, reflection, metrics.

Driven with foreign clients: grpcio's health-checking and reflection clients
(tests.support.foreign_grpc), and a plain HTTP scrape parsed by
prometheus_client's parser.
"""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

from financing import release
from financing.adapters.postgres import schema
from tests.acceptance.driver import Financing
from tests.acceptance.system import Address, System
from tests.support import foreign_grpc, infra
from tests.support.metrics import Samples, scrape, value

pytestmark = pytest.mark.acceptance


async def check(address: Address, service: str) -> dict[str, object]:
    return await foreign_grpc.run("check", str(address), service)


@pytest.mark.parametrize(
    ("port", "service"),
    [("command", ""), ("command", "Commands"), ("query", ""), ("query", "Queries")],
)
async def test_each_port_reports_its_service_and_itself_serving(
    system: System, port: str, service: str
) -> None:
    address = system.command_address if port == "command" else system.query_address
    assert await check(address, service) == {"code": "OK", "status": "SERVING"}


@pytest.mark.parametrize("service", ["Queries", "Nope", "grpc.health.v1.Health"])
async def test_a_service_the_commands_port_does_not_serve_is_not_found(
    system: System, service: str
) -> None:
    assert await check(system.command_address, service) == {"code": "NOT_FOUND"}


async def test_reflection_describes_the_commands_service(system: System) -> None:
    described = await foreign_grpc.run("describe", str(system.command_address), "Commands")
    # Regression (a probe): the reflection services did not list themselves, as grpc-go's
    # and grpcio's servers do (`grpcurl list`).
    assert described["services"] == [
        "Commands",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    assert described["methods"] == [
        "ApproveFinancing",
        "BidOnInvoice",
        "ReverseFinancing",
        "SellInvoice",
    ]


@pytest.mark.parametrize(
    ("port", "method", "types"),
    [
        ("command", "Commands.SellInvoice", ("SellInvoiceCommand", "UUID")),
        ("query", "Queries.AllInvoices", ("google.protobuf.Empty", "AllInvoicesReply")),
        ("command", "grpc.health.v1.Health.Check", ("grpc.health.v1.HealthCheckRequest",)),
    ],
)
async def test_reflection_finds_a_method_by_its_full_name(
    system: System, port: str, method: str, types: tuple[str, ...]
) -> None:
    """Regression: grpcurl's `describe Commands.SellInvoice` asks for the file containing
    the method's name, which was answered NOT_FOUND."""
    address = system.command_address if port == "command" else system.query_address
    described = await foreign_grpc.run("method", str(address), method)
    assert described["found"] is True, described
    assert (described["input"], described["output"])[: len(types)] == types
    missing = await foreign_grpc.run("method", str(address), "Commands.NoSuchMethod")
    assert missing == {"found": False}


@pytest.mark.parametrize(
    ("symbol", "files"),
    [
        ("Commands", ["financing.proto", "google/protobuf/empty.proto"]),
        ("grpc.health.v1.Health", ["grpc/health/v1/health.proto"]),
    ],
)
async def test_reflection_answers_a_file_with_the_files_it_imports(
    system: System, symbol: str, files: list[str]
) -> None:
    """Regression (a probe): the file of `Commands` came without the file it imports
    (`google/protobuf/empty.proto`), which a client had to ask for again, where grpc-go
    answers both; and health's file was named `grpclib/health/v1/health.proto`."""
    answered = await foreign_grpc.run("files", str(system.command_address), symbol)
    assert answered == {"files": files}


async def test_a_streaming_call_is_counted_under_its_kind(system: System) -> None:
    """Regression: every call was counted as `unary`, reflection's bidirectional stream
    and health's Watch included."""
    await foreign_grpc.run("describe", str(system.command_address), "Commands")

    async def counted() -> float:
        samples = await asyncio.to_thread(scrape_every_process, system)
        return value(
            samples,
            "grpc_server_handled_total",
            grpc_type="bidi_stream",
            grpc_method="ServerReflectionInfo",
            grpc_code="OK",
        )

    await infra.wait_until(counted, what="the reflection call counted as a bidi_stream")


async def test_reflection_describes_the_queries_service_and_its_messages(system: System) -> None:
    described = await foreign_grpc.run("describe", str(system.query_address), "Queries", "Invoice")
    assert described["methods"] == ["AllInvestors", "AllInvoices", "AllIssuers"]
    assert described["fields"] == ["id", "issuer_id", "asking_price", "status", "winning_bid"]


def scrape_every_process(system: System) -> Samples:
    """The samples of every process of the deployment together (a split deployment counts
    each component's work in the process that runs it)."""
    samples: Samples = {}
    for address in system.metrics_addresses:
        for name, found in scrape(address).items():
            samples.setdefault(name, []).extend(found)
    return samples


async def test_a_financing_saga_shows_in_the_metrics(system: System, financing: Financing) -> None:
    await financing.finance_invoice(asking_price=10, bid=15)

    async def projected() -> Samples | None:
        samples = await asyncio.to_thread(scrape_every_process, system)
        return samples if value(samples, "financing_projection_delay_seconds_count") >= 4 else None

    samples = await infra.wait_until(projected, what="the saga's events to be projected")
    assert (
        value(
            samples,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service="Commands",
            grpc_method="BidOnInvoice",
            grpc_code="OK",
        )
        >= 1
    )
    assert (
        value(samples, "grpc_server_handling_seconds_count", grpc_service="Commands") >= 2
    )  # SellInvoice and BidOnInvoice at least
    assert value(samples, "financing_messages_total", queue="BidOnInvoice", outcome="processed")
    assert value(
        samples,
        "financing_messages_total",
        queue="events_BidOnInvoicePlacedEvent",
        outcome="processed",
    )
    # Each consumer receives only the names it handles: nothing to ignore.
    ignored = value(
        samples,
        "financing_messages_total",
        queue="events_BidOnInvoicePlacedEvent",
        outcome="ignored",
    )
    assert ignored == 0
    assert value(samples, "financing_message_handling_seconds_count", queue="BidOnInvoice")
    assert value(samples, "financing_events_appended_total") >= 4
    assert value(samples, "financing_events_relayed_total") >= 4
    assert value(samples, "financing_projection_delay_seconds_count") >= 4
    # Every process that uses the broker is connected; one serving queries alone uses none.
    connected = [amount for _, amount in samples.get("financing_broker_connected", [])]
    assert connected and set(connected) == {1.0}, connected
    assert value(samples, "financing_pool_connections", state="max") > 0
    for gauge in ("financing_relayer_lag_events", "financing_relayer_lag_seconds"):
        assert gauge in samples, f"{gauge} is not exported"


async def test_the_health_endpoint_beside_the_metrics_answers_healthy(system: System) -> None:
    def health(address: Address) -> int:
        with urllib.request.urlopen(f"http://{address}/health", timeout=5) as reply:
            return int(reply.status)

    for address in system.metrics_addresses:
        assert await asyncio.to_thread(health, address) == 200, address


async def test_every_process_says_its_release_and_schema_versions_in_its_metrics(
    system: System,
) -> None:
    """Regression: nothing in `/metrics` said which release an instance ran, which an
    operator rolling out a release that migrates a schema must know of every instance."""
    expected = {
        "release": release(),
        "commands_schema": str(schema.latest("commands")),
        "queries_schema": str(schema.latest("queries")),
    }
    for address in system.metrics_addresses:
        samples = await asyncio.to_thread(scrape, address)
        assert samples["financing_build_info"] == [(expected, 1.0)], address


async def test_the_queues_read_and_the_dead_letters_waiting_are_exported(
    system: System,
) -> None:
    """Regression: nothing of the service exported a queue's depth or readers: dead
    letters left waiting, and a queue whose component no process ran, went unseen by
    any alert rule (docs/deployment.md, "What to alert on")."""
    consumed = ("SellInvoice", "events_financing_projector", "events_InvoiceFinancedEvent")

    async def every_queue_read() -> bool:
        readings: dict[str, float] = {}
        for address in system.metrics_addresses:
            samples = await asyncio.to_thread(scrape, address)
            for labels, amount in samples.get("financing_queue_consumers", []):
                readings[labels["queue"]] = max(amount, readings.get(labels["queue"], 0))
            if not samples.get("financing_queue_messages_ready"):
                continue
            dead = [
                labels
                for labels, _ in samples["financing_queue_messages_ready"]
                if labels["queue"] == "financing_dead_letters"
            ]
            assert dead, f"{address} reads queues but not the dead letters'"
        return all(readings.get(queue, 0) >= 1 for queue in consumed)

    await infra.wait_until(every_queue_read, timeout=30, what="each consumed queue read")


async def test_the_counters_the_alert_rules_take_increases_of_are_exported_from_zero(
    system: System,
) -> None:
    """Regression: `financing_dead_letters_published_total{queue}` and the APIs'
    `grpc_server_handled_total` by status were born at their first value, which
    Prometheus's `increase` and `rate` do not count: a queue's first dead letters and a
    process's first refusals never fired docs/deployment.md's rules."""
    samples = await asyncio.to_thread(scrape_every_process, system)

    def exported(name: str, **labels: str) -> bool:
        return any(
            all(found.get(key) == wanted for key, wanted in labels.items())
            for found, _ in samples.get(name, [])
        )

    for method in ("SellInvoice", "BidOnInvoice", "ApproveFinancing", "ReverseFinancing"):
        for code in ("UNAVAILABLE", "INTERNAL", "INVALID_ARGUMENT"):
            assert exported(
                "grpc_server_handled_total",
                grpc_type="unary",
                grpc_service="Commands",
                grpc_method=method,
                grpc_code=code,
            ), (method, code)
    for method in ("AllInvoices", "AllInvestors", "AllIssuers"):
        assert exported("grpc_server_handled_total", grpc_service="Queries", grpc_method=method), (
            method
        )
    for service, method in [("Commands", "SellInvoice"), ("Queries", "AllInvoices")]:
        assert exported("financing_grpc_busy_total", grpc_service=service, grpc_method=method), (
            method
        )
        assert exported("financing_grpc_calls_waiting", grpc_service=service), service
    for method in ("AllInvoices", "AllInvestors", "AllIssuers"):
        assert exported("financing_list_reply_bytes_count", grpc_method=method), method
        assert exported("financing_list_reply_bytes_held", grpc_method=method), method
    for queue in ("SellInvoice", "events_financing_projector", "events_InvoiceFinancedEvent"):
        assert exported("financing_dead_letters_published_total", queue=queue), queue
        # A first cancel counted on a series born at 1 was alerted by the rule's other
        # half alone, which a restart of the process ended (a probe).
        assert exported("financing_consumers_cancelled_total", queue=queue), queue
