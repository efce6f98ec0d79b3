"""Prometheus metrics: what the service counts and measures.

The gRPC metrics carry the names and labels of the gRPC ecosystem's Prometheus
interceptors, so existing dashboards work; the others are the service's own
(`financing_*`). `entrypoints/observability.py` feeds the gRPC and pool
metrics and serves them all at `/metrics` on `METRICS_ADDRESS`. The README
lists every metric with its labels.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

# No `*_created` series beside each counter and histogram (the client library's default
# exports one per label set, with the family's help: 101 of 574 samples after a day's
# traffic), which Prometheus ingests as gauges of their own and no dashboard reads.
disable_created_metrics()  # type: ignore[no-untyped-call]  # the library's, unannotated

# Seconds: from a millisecond to a minute.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)

GRPC_STARTED = Counter(
    "grpc_server_started_total",
    "Total number of RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Response latency of RPCs handled by the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=_LATENCY,
)
GRPC_BUSY = Counter(
    "financing_grpc_busy_total",
    "Calls answered UNAVAILABLE because the service was busy: no turn came within the"
    " busy wait, nothing done (counted in grpc_server_handled_total as well).",
    ["grpc_service", "grpc_method"],
)
GRPC_CALLS_WAITING = Gauge(
    "financing_grpc_calls_waiting",
    "Calls waiting for their turn, as last read: beyond the commands one process queues at"
    " once, or the list replies it holds; each is answered busy after the busy wait.",
    ["grpc_service"],
)
LIST_REPLY_BYTES = Histogram(
    "financing_list_reply_bytes",
    "Sizes of the Queries API's list replies, as built.",
    ["grpc_method"],
    buckets=tuple(float(4**power * 1024) for power in range(10)),  # 1 KiB to 256 MiB
)
LIST_REPLY_BYTES_HELD = Gauge(
    "financing_list_reply_bytes_held",
    "Bytes of the Queries API's list replies built and not yet taken in by their callers,"
    " as last read.",
    ["grpc_method"],
)
GRPC_TLS_RELOADS = Counter(
    "financing_grpc_tls_reloads_total",
    "Changes of the gRPC ports' TLS files, by outcome: loaded (new connections are served"
    " with them), refused (they cannot be used: the previous ones still serve).",
    ["outcome"],
)
GRPC_TLS_CERTIFICATE_EXPIRY = Gauge(
    "financing_grpc_tls_certificate_expiry_timestamp_seconds",
    "When the first certificate to expire of the chain the gRPC ports serve expires"
    " (Unix time), by the file it is read from; absent without TLS.",
    ["file"],
)
LOG_LINES_DROPPED = Counter(
    "financing_log_lines_dropped_total",
    "Log lines dropped whole: the log took none of each (its reader behind or gone, its disk"
    " full).",
)
BROKER_TLS_CERTIFICATE_EXPIRY = Gauge(
    "financing_broker_tls_certificate_expiry_timestamp_seconds",
    "When the first certificate to expire of the chain the service presents to the broker"
    " (an amqps:// URL's certfile) expires (Unix time), by the file it is read from, as read"
    " at the last connection; absent without a client certificate.",
    ["file"],
)
MESSAGES = Counter(
    "financing_messages_total",
    "Deliveries by queue and outcome: processed, unchanged (a rule said there was"
    " nothing to do), duplicate, ignored, dead_lettered, deferred (put aside to wait for an"
    " aggregate), abandoned (left for redelivery), and retried (one per retry of a delivery).",
    ["queue", "outcome"],
)
HANDLING = Histogram(
    "financing_message_handling_seconds",
    "From a delivery's arrival to its settlement, by queue.",
    ["queue"],
    buckets=_LATENCY,
)
EVENTS_APPENDED = Counter("financing_events_appended_total", "Events appended to the event store.")
EVENTS_RELAYED = Counter(
    "financing_events_relayed_total",
    "Events published to `events` by the relayer, confirmed; an event published again (its"
    " checkpoint not recorded, another relayer taking over) counts again.",
)
BUILD_INFO = Gauge(
    "financing_build_info",
    "1, labelled with the release this process runs and the schema versions that release"
    " migrates the databases to.",
    ["release", "commands_schema", "queries_schema"],
)
PROJECTION_DELAY = Histogram(
    "financing_projection_delay_seconds",
    "From an event's commit in the event store to its projection in the read models.",
    buckets=_LATENCY,
)


class SetGauge:
    """A gauge exported only once the process sets it: a process without the part that
    sets it (one serving queries alone has no broker, one without the relayer no lag)
    exports none, so that an alert on its value never reads a 0 nothing measured."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self._documentation = documentation
        self._value: float | None = None

    def set(self, value: float) -> None:
        self._value = value

    def collect(self) -> Iterator[Metric]:
        if self._value is not None:
            yield GaugeMetricFamily(self.name, self._documentation, value=self._value)


def _registered(gauge: SetGauge) -> SetGauge:
    REGISTRY.register(gauge)
    return gauge


BROKER_CONNECTED = _registered(
    SetGauge("financing_broker_connected", "1 while the broker connection is open.")
)
RELAYER_LAG_EVENTS = _registered(
    SetGauge(
        "financing_relayer_lag_events",
        "Events committed and not yet behind the relayer's checkpoint, which moves past"
        " confirmed publishes a batch of them at a time.",
    )
)
RELAYER_LAG_SECONDS = _registered(
    SetGauge(
        "financing_relayer_lag_seconds",
        "Age of the oldest event committed and not yet behind the relayer's checkpoint.",
    )
)
APPENDING_PACED = _registered(
    SetGauge(
        "financing_appending_paced",
        "1 while the consumers that append handle one delivery at a time each, too many"
        " events waiting to be relayed; 0 otherwise.",
    )
)
QUEUE_MESSAGES_READY = Gauge(
    "financing_queue_messages_ready",
    "Messages ready to be delivered in each queue of the service's topology (those"
    " delivered and not yet acked are not counted), as last read.",
    ["queue"],
)
QUEUE_CONSUMERS = Gauge(
    "financing_queue_consumers",
    "Consumers the broker counts on each queue of the service's topology, as last read.",
    ["queue"],
)
DEPENDENCY_UP = Gauge(
    "financing_dependency_up",
    "1 while a dependency works for this process, 0 during its outage (from the failure"
    " that starts it to the check that ends it): the broker, each database, each queue"
    " the process consumes, as the outage lines of the log name them.",
    ["dependency"],
)
POOL_CONNECTIONS = Gauge(
    "financing_pool_connections", "Connections of each database pool.", ["database", "state"]
)
GRPC_CONNECTIONS_CLOSED = Counter(
    "financing_grpc_connections_closed_total",
    "gRPC connections the service closed at the HTTP/2 edge, by reason.",
    ["reason"],
)
EVENT_LOOP_LAG = Histogram(
    "financing_event_loop_lag_seconds",
    "How late the process's event loop ran a task due every half second: the time the"
    " process was stopped (SIGSTOP, a paused VM), starved of CPU, or blocked.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
DATABASE_CLOCK_OFFSET = Gauge(
    "financing_database_clock_offset_seconds",
    "The database server's clock minus this host's, as last measured (every minute).",
    ["database"],
)
TOPOLOGY_RESTORED = Counter(
    "financing_topology_restored_total",
    "Queues nobody consumes (financing_dead_letters, financing_deferred) found deleted"
    " under the service, and declared again, by queue.",
    ["queue"],
)
CONSUMERS_CANCELLED = Counter(
    "financing_consumers_cancelled_total",
    "Consumers of this process the broker cancelled (their queue deleted, with what it"
    " held, or the node holding it down), or whose queue was missing as the process"
    " started though their records say it was consumed before, by queue: what was"
    " published to the queue until it was consumed again may have missed it.",
    ["queue"],
)
DEAD_LETTERS = Counter(
    "financing_dead_letters_published_total",
    "Messages dead-lettered to financing_dead_letters, by source queue.",
    ["queue"],
)


def settled(queue: str, outcome: str, seconds: float, events: int = 0) -> None:
    """One delivery of `queue` settled with `outcome` after `seconds`, having appended `events`."""
    MESSAGES.labels(queue, outcome).inc()
    HANDLING.labels(queue).observe(seconds)
    if events:
        EVENTS_APPENDED.inc(events)
