"""The broker over TLS (an amqps:// URL): the service connects with the URL's CA and
client certificate, refuses a broker whose certificate it does not trust, and says so
when that is what keeps an outage going.

Against the real RabbitMQ, behind a TLS endpoint of the test's own (the machine's broker
speaks plaintext): each connection's TLS is ended there and its bytes carried on to the
broker, with the certificate of the moment, which a test may change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trustme
from prometheus_client import REGISTRY
from structlog.testing import capture_logs
from yarl import URL

from financing.adapters.rabbitmq.connection import BROKER, Broker
from financing.application.errors import AwaitingOperator, Refused, Unavailable
from financing.application.retry import Outages
from financing.config import parse_amqp_urls
from tests.support.infra import holds, wait_until

NAME = "localhost"


@dataclass
class TlsEndpoint:
    """TLS in front of the broker at `upstream`: the server certificate of the moment
    (`serve_with`), client certificates required from `client_ca`."""

    upstream: tuple[str, int]
    client_ca: trustme.CA
    context: ssl.SSLContext = field(init=False)
    port: int = 0
    _open: set[asyncio.StreamWriter] = field(default_factory=set)

    def serve_with(self, ca: trustme.CA) -> None:
        """New handshakes present a certificate for NAME that `ca` issued."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(NAME).configure_cert(context)
        self.client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
        self.context = context

    def cut(self) -> None:
        """End every connection, as a broker restarting does."""
        for writer in list(self._open):
            writer.transport.abort()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            await writer.start_tls(self.context)
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except (OSError, ssl.SSLError):
            writer.transport.abort()
            self._open.discard(writer)
            return

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        try:
            await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))
        finally:
            self._open.discard(writer)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        server = await asyncio.start_server(self._carry, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield
        finally:
            self.cut()
            server.close()
            await server.wait_closed()


@dataclass
class Files:
    ca: trustme.CA  # the CA the service trusts
    client_ca: trustme.CA
    cafile: Path
    certfile: Path
    keyfile: Path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    ca, client_ca = trustme.CA(), trustme.CA()
    client = client_ca.issue_cert("financing")
    made = Files(
        ca, client_ca, tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key"
    )
    ca.cert_pem.write_to_path(made.cafile)
    client.cert_chain_pems[0].write_to_path(made.certfile)
    client.private_key_pem.write_to_path(made.keyfile)
    return made


@pytest.fixture
async def endpoint(amqp_url: str, files: Files) -> AsyncIterator[TlsEndpoint]:
    parts = urlsplit(amqp_url)
    endpoint = TlsEndpoint((parts.hostname or "127.0.0.1", parts.port or 5672), files.client_ca)
    endpoint.serve_with(files.ca)
    async with endpoint.serving():
        yield endpoint


@contextlib.asynccontextmanager
async def broker_at(url: str, outages: Outages | None = None) -> AsyncIterator[Broker]:
    """A broker connection manager for `url`, closed at the end."""
    broker = Broker([url], Outages() if outages is None else outages)
    try:
        yield broker
    finally:
        await broker.close()


async def connected(broker: Broker) -> bool:
    try:
        await broker.connection()
    except Unavailable:  # held off for a moment after the last refusal
        return False
    return True


def tls_url(amqp_url: str, endpoint: TlsEndpoint, files: Files) -> str:
    """`amqp_url` over TLS through `endpoint`, with RabbitMQ's names for the files."""
    url = URL(amqp_url).with_scheme("amqps").with_host(NAME).with_port(endpoint.port)
    return str(
        url.with_query(
            cacertfile=str(files.cafile), certfile=str(files.certfile), keyfile=str(files.keyfile)
        )
    )


async def test_a_broker_over_tls_is_reached_with_the_urls_ca_and_client_certificate(
    amqp_url: str, endpoint: TlsEndpoint, files: Files
) -> None:
    url = parse_amqp_urls(tls_url(amqp_url, endpoint, files))  # its files read at start-up
    async with broker_at(url) as broker:
        channel = await broker.channel()
        queue = await channel.declare_queue(exclusive=True)  # the broker behind it answers
        assert queue.name
        await channel.close()


async def test_the_client_certificates_expiry_is_exported_as_read_at_each_connection(
    amqp_url: str, endpoint: TlsEndpoint, files: Files
) -> None:
    """Regression (a probe): the gRPC ports' certificate had an expiry metric, and the
    certificate the service presents to the broker none: its expiry was learnt from the
    broker's refusal."""

    def issue(not_after: datetime) -> float:
        client = files.client_ca.issue_cert("financing", not_after=not_after)
        client.cert_chain_pems[0].write_to_path(files.certfile)
        client.private_key_pem.write_to_path(files.keyfile)
        return not_after.timestamp()

    def exported() -> float | None:
        return REGISTRY.get_sample_value(
            "financing_broker_tls_certificate_expiry_timestamp_seconds",
            {"file": str(files.certfile)},
        )

    first = issue(datetime(2049, 7, 1, 12, 30, 15, tzinfo=UTC))
    async with broker_at(tls_url(amqp_url, endpoint, files)) as broker:
        await broker.connection()
        assert exported() == first
        renewed = issue(datetime(2061, 1, 2, 3, 4, 5, tzinfo=UTC))  # a renewal, in place
        endpoint.cut()

        async def read_again() -> bool:
            return await connected(broker) and exported() == renewed

        await wait_until(read_again, what="the renewed certificate's expiry")


async def test_a_broker_whose_certificate_is_not_trusted_is_refused_at_once(
    amqp_url: str, endpoint: TlsEndpoint, files: Files
) -> None:
    """Regression: a broker certificate the service does not trust was an outage, retried
    for the whole start-up budget (30 s) before start-up gave up."""
    endpoint.serve_with(trustme.CA())
    async with broker_at(tls_url(amqp_url, endpoint, files)) as broker:
        async with asyncio.timeout(10):
            with pytest.raises(Refused, match="not one the service trusts"):
                await broker.connection()


async def test_a_broker_whose_certificate_is_not_verified_is_reached_and_warned_of(
    amqp_url: str, endpoint: TlsEndpoint, files: Files
) -> None:
    """`verify=verify_none` reaches a broker whose certificate the service does not trust,
    and the service says, once as it starts, that anyone between them can read and change
    what they say."""
    endpoint.serve_with(trustme.CA())
    url = str(URL(tls_url(amqp_url, endpoint, files)).update_query(verify="verify_none"))
    with capture_logs() as logs:
        async with broker_at(url) as broker:
            async with asyncio.timeout(10):
                await broker.connection()
    warned = [line for line in logs if "certificate is not verified" in line["event"]]
    assert [line["broker"] for line in warned] == [
        f"amqps://{NAME}:{endpoint.port}{URL(amqp_url).path}"
    ], logs


async def test_a_certificate_found_untrusted_after_a_restart_is_said_once(
    amqp_url: str, endpoint: TlsEndpoint, files: Files
) -> None:
    """Regression: a broker restarted with a certificate the service does not trust was
    said only to have restarted (`CONNECTION_FORCED`), for as long as it lasted: the
    refused certificate was named by nothing but `financing status`."""
    outages = Outages()
    async with broker_at(tls_url(amqp_url, endpoint, files), outages) as broker:
        await broker.connection()
        with capture_logs() as logs:
            endpoint.serve_with(trustme.CA())  # another CA's certificate, then the restart
            endpoint.cut()
            await wait_until(lambda: holds(not broker.connected), what="the connection lost")
            outages.failed(Unavailable(BROKER, "connection reset"), connection_lost=True)
            for _ in range(3):  # as the loops that need the broker try again
                with pytest.raises(AwaitingOperator) as refused:
                    await broker.connection()
                outages.failed(refused.value)
            endpoint.serve_with(files.ca)
            await wait_until(lambda: connected(broker), what="the broker reached again")

    said = [(line["event"], line.get("error")) for line in logs if line["log_level"] == "warning"]
    assert [event for event, _ in said] == [
        "broker unavailable",
        "broker still unavailable",
        "broker reconnected",
    ]
    assert "not one the service trusts" in str(said[1][1])


async def test_an_amqps_url_to_a_plaintext_port_is_refused_saying_so(amqp_url: str) -> None:
    """Regression: `amqps://` to the broker's plaintext port was an outage, retried for the
    whole start-up budget, said as OpenSSL's `WRONG_VERSION_NUMBER` alone."""
    async with broker_at(str(URL(amqp_url).with_scheme("amqps"))) as broker:
        async with asyncio.timeout(10):
            with pytest.raises(Refused, match="the port does not answer in TLS"):
                await broker.connection()
