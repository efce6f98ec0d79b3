"""`financing serve` with TLS on its gRPC ports: grpcio's and grpclib's clients served,
this host's probe asking over TLS, and files that cannot be used stopping start-up."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import uuid4

import pytest
import trustme
from grpclib.client import Channel
from grpclib.config import Configuration

from financing.config import Database
from financing.generated import CommandsStub, Money, SellInvoiceCommand, Uuid
from tests.support import foreign_grpc, infra, rabbitmq
from tests.support.deployment import service_env
from tests.support.service import ServiceProcess, free_port, run_cli

NAME = "financing.test"


@pytest.fixture
async def amqp_url() -> AsyncIterator[str]:
    """A vhost of its own: what its service relays stays apart from other tests'."""
    async with rabbitmq.private_vhost("fin_tls") as vhost:
        yield vhost.url


@pytest.fixture
async def databases() -> AsyncIterator[tuple[Database, Database]]:
    async with (
        infra.fresh_database("fin_tls_c") as commands,
        infra.fresh_database("fin_tls_q") as queries,
    ):
        yield commands, queries


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_env(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    leaf = ca.issue_cert(NAME)
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "server.pem")
    leaf.private_key_pem.write_to_path(tmp_path / "server.key")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    return {
        "GRPC_TLS_CERT_FILE": str(tmp_path / "server.pem"),
        "GRPC_TLS_KEY_FILE": str(tmp_path / "server.key"),
    }


async def test_the_grpc_ports_serve_tls_to_foreign_and_own_clients(
    databases: tuple[Database, Database],
    amqp_url: str,
    ca: trustme.CA,
    tls_env: dict[str, str],
    tmp_path: Path,
) -> None:
    command, query, metrics = (("127.0.0.1", free_port()) for _ in range(3))
    env = {**service_env(*databases, amqp_url, command, query, metrics), **tls_env}
    service = ServiceProcess(env, tmp_path / "service.log")
    await service.start()
    try:
        trusting = {"FOREIGN_GRPC_CA": str(tmp_path / "ca.pem"), "FOREIGN_GRPC_NAME": NAME}
        for (host, port), name in ((command, "Commands"), (query, "Queries")):
            answer = await foreign_grpc.run("check", f"{host}:{port}", name, env=trusting)
            assert answer == {"code": "OK", "status": "SERVING"}
        at = f"{command[0]}:{command[1]}"
        described = await foreign_grpc.run("describe", at, "Commands", env=trusting)
        assert "Commands" in described["services"]  # type: ignore[operator]
        assert (await foreign_grpc.run("check", at, "Commands"))["code"] == "UNAVAILABLE"
        client = ssl.create_default_context()
        client.set_alpn_protocols(["h2"])
        ca.configure_trust(client)
        channel = Channel(*command, ssl=client, config=Configuration(ssl_target_name_override=NAME))
        try:
            reply = await CommandsStub(channel).sell_invoice(
                SellInvoiceCommand(
                    issuer_id=Uuid(value=str(uuid4())), asking_price=Money(amount=10.0)
                ),
                timeout=10,
            )
        finally:
            channel.close()
        assert reply.value
        probed = await run_cli(env, "health-check")
        assert probed.exit_code == 0, probed.describe()
        without_tls = {key: value for key, value in env.items() if key not in tls_env}
        refused = await run_cli(without_tls, "health-check")
        assert refused.exit_code == 1, refused.describe()
        assert "Commands" in refused.stderr and "Queries" in refused.stderr
    finally:
        assert await service.stop() == 0


async def test_a_key_that_cannot_be_used_stops_start_up_naming_it(
    databases: tuple[Database, Database],
    amqp_url: str,
    tls_env: dict[str, str],
    tmp_path: Path,
) -> None:
    command, query, metrics = (("127.0.0.1", free_port()) for _ in range(3))
    env = {**service_env(*databases, amqp_url, command, query, metrics), **tls_env}
    trustme.CA().issue_cert(NAME).private_key_pem.write_to_path(tls_env["GRPC_TLS_KEY_FILE"])
    started = await run_cli(env, "serve", within=30)
    assert started.exit_code == 2, started.describe()
    assert "start-up failed" in started.stdout + started.stderr
    assert "GRPC_TLS_KEY_FILE" in started.stdout + started.stderr
