"""TLS on the gRPC ports: served over HTTP/2, client certificates asked for when a client CA
is set, the files read again when they change, and files that cannot be used named."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.service import Health
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from financing.config import (
    ConfigError,
    GrpcTls,
    Settings,
    parse_grpc_tls,
)
from financing.entrypoints.cli.health_check import health_check
from financing.entrypoints.grpc import edge, tls_watch
from financing.entrypoints.grpc.codec import RequestCodec
from financing.entrypoints.grpc.edge import GrpcServer, _handshake
from financing.entrypoints.grpc.tls import server_context
from financing.entrypoints.grpc.tls_watch import ServerTls
from financing.tls_files import UnusableFiles, certificate_expiry
from tests.support import infra

NAME = "financing.test"
# Clients connect to 127.0.0.1 and check the certificate for the service's name.
NAMED = Configuration(ssl_target_name_override=NAME)


class Files:
    """A CA, and the files a deployment gives the service: certificate, key, client CA."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.tls = GrpcTls(
            str(folder / "server.pem"), str(folder / "server.key"), str(folder / "clients.pem")
        )
        self.issue(self.ca)
        self.trust_clients_of(self.ca)

    @property
    def server_only(self) -> GrpcTls:
        """The files without a client CA: any client may connect."""
        return GrpcTls(self.tls.cert_file, self.tls.key_file)

    def issue(self, ca: trustme.CA) -> None:
        """A certificate and key `ca` issued, written where the service reads them."""
        leaf = ca.issue_cert(NAME, "127.0.0.1")
        leaf.private_key_pem.write_to_path(self.tls.key_file)
        leaf.cert_chain_pems[0].write_to_path(self.tls.cert_file)

    def trust_clients_of(self, ca: trustme.CA) -> None:
        assert self.tls.client_ca_file is not None
        ca.cert_pem.write_to_path(self.tls.client_ca_file)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def _client(trusted: trustme.CA, certified_by: trustme.CA | None = None) -> ssl.SSLContext:
    """A client trusting `trusted`, presenting a certificate `certified_by` issued."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.set_alpn_protocols(["h2"])
    trusted.configure_trust(context)
    if certified_by is not None:
        certified_by.issue_cert("client@financing.test").configure_cert(context)
    return context


@asynccontextmanager
async def _serving(tls: ServerTls | None, connections: int | None = None) -> AsyncIterator[int]:
    """A gRPC server with health checking, served with `tls`, holding at most
    `connections` connections, until the block ends: its port."""
    async with _server(tls, connections) as server:
        yield server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@asynccontextmanager
async def _server(
    tls: ServerTls | None, connections: int | None = None
) -> AsyncIterator[GrpcServer]:
    server = GrpcServer(
        [Health()],
        codec=RequestCodec(),
        tls=None if tls is None else tls.current,
        connections=connections,
    )
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


async def _check(port: int, context: ssl.SSLContext | None) -> str:
    """One health check on a new connection: SERVING, or how it failed."""
    channel = Channel("127.0.0.1", port, ssl=context, config=NAMED)
    try:
        async with asyncio.timeout(5):
            reply = await HealthStub(channel).Check(HealthCheckRequest())
    except (OSError, StreamTerminatedError, GRPCError) as error:
        return type(error).__name__
    finally:
        channel.close()
    return HealthCheckResponse.ServingStatus.Name(reply.status)


def _closed(reason: str) -> float:
    found = REGISTRY.get_sample_value("financing_grpc_connections_closed_total", {"reason": reason})
    return found or 0.0


def _reloads(outcome: str) -> float:
    found = REGISTRY.get_sample_value("financing_grpc_tls_reloads_total", {"outcome": outcome})
    return found or 0.0


async def test_a_client_trusting_the_ca_is_served_over_tls(files: Files) -> None:
    tls = ServerTls(files.server_only)
    async with _serving(tls) as port:
        assert await _check(port, _client(files.ca)) == "SERVING"


async def test_a_plaintext_client_is_not_served_on_a_tls_port(files: Files) -> None:
    tls = ServerTls(files.server_only)
    async with _serving(tls) as port:
        assert await _check(port, None) != "SERVING"


async def test_http2_is_chosen_by_alpn(files: Files) -> None:
    """gRPC's clients refuse a TLS server that does not choose `h2`."""
    tls = ServerTls(files.server_only)
    async with _serving(tls) as port:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=_client(files.ca), server_hostname=NAME
        )
        try:
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        finally:
            writer.close()


async def test_with_a_client_ca_a_client_without_its_certificate_is_refused(
    files: Files,
) -> None:
    tls = ServerTls(files.tls)
    stranger = trustme.CA()
    async with _serving(tls) as port:
        assert await _check(port, _client(files.ca)) != "SERVING"
        assert await _check(port, _client(files.ca, certified_by=stranger)) != "SERVING"
        assert await _check(port, _client(files.ca, certified_by=files.ca)) == "SERVING"


async def _alert(port: int, context: ssl.SSLContext) -> str:
    """OpenSSL's reason for what the server said to a client connecting with `context`
    that sends the HTTP/2 preface: the alert it was refused with, or what it read."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=NAME
        )
        try:
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            read = await asyncio.wait_for(reader.read(9), 5)
        finally:
            writer.close()
    except ssl.SSLError as error:
        return str(error.reason)
    return f"read {read!r}"


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
async def test_a_client_refused_for_its_certificate_is_told_why(
    files: Files, version: ssl.TLSVersion
) -> None:
    """Regression: the connection was closed with TLS's alert unsent, and a client read
    only that it was lost (grpcurl: "connection closed"), whatever was wrong."""
    async with _serving(ServerTls(files.tls)) as port:
        without = _client(files.ca)
        stranger = _client(files.ca, certified_by=trustme.CA())
        for context in (without, stranger):
            context.maximum_version = version
        refused = "HANDSHAKE_FAILURE" if version is ssl.TLSVersion.TLSv1_2 else "REQUIRED"
        assert refused in await _alert(port, without)
        assert "UNKNOWN_CA" in await _alert(port, stranger)


@pytest.mark.parametrize("protocols", [["http/1.1"], []], ids=["http1.1", "none"])
async def test_a_client_that_does_not_choose_http2_by_alpn_is_closed_at_once(
    files: Files, monkeypatch: pytest.MonkeyPatch, protocols: list[str]
) -> None:
    """Regression (a probe): a client that chose HTTP/1.1 by ALPN, or nothing, completed
    its handshake and was served HTTP/2 all the same (or held its connection until its
    preface was due, 10 s): gRPC over TLS is HTTP/2 chosen by ALPN, as grpc-go's servers
    require."""
    monkeypatch.setattr(edge, "_SENT_AWAY", edge.Warnings(10.0))
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    files.ca.configure_trust(context)
    if protocols:
        context.set_alpn_protocols(protocols)
    closed_before = _closed("tls_handshake")
    async with _serving(ServerTls(files.server_only)) as port:
        with capture_logs() as logs:
            assert await _alert(port, context) == "read b''"  # closed, nothing served
    assert _closed("tls_handshake") == closed_before + 1
    [said] = [line for line in logs if "ALPN" in str(line["event"])]
    assert str(said["peer"]).startswith("127.0.0.1:"), said


async def test_handshakes_failed_for_different_reasons_are_each_said(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: every failed handshake was one kind of warning, written once every
    10 s with the last one's reason: clients refused because a CA was taken out of the
    file hid behind clients that present no certificate, counted as theirs."""
    monkeypatch.setattr(edge, "_SENT_AWAY", edge.Warnings(10.0))
    async with _serving(ServerTls(files.tls)) as port:
        with capture_logs() as logs:
            for _ in range(3):
                await _alert(port, _client(files.ca))
            await _alert(port, _client(files.ca, certified_by=trustme.CA()))

            def said() -> list[dict[str, object]]:
                return [line for line in logs if "handshake" in str(line["event"])]

            await infra.wait_until(lambda: infra.holds(len(said()) >= 2), what="both reasons said")
    # Each said as it came, none counted as another's.
    first, second = said()[:2]
    assert "did not return a certificate" in str(first["event"]), said()
    assert "certificate verify failed" in str(second["event"]), said()
    assert "more_since_the_last_line" not in second, said()
    # Regression (a probe): no line named the client, whom an operator could not find.
    assert all(str(line["peer"]).startswith("127.0.0.1:") for line in said()), said()


async def test_renewed_files_serve_new_connections_and_open_ones_keep_going(
    files: Files,
) -> None:
    tls = ServerTls(files.server_only)
    renewed_by = trustme.CA()
    loaded = _reloads("loaded")
    async with _serving(tls) as port:
        open_one = Channel("127.0.0.1", port, ssl=_client(files.ca), config=NAMED)
        try:
            await HealthStub(open_one).Check(HealthCheckRequest(), timeout=5)
            files.issue(renewed_by)
            with capture_logs() as logs:
                assert tls.reload()
            assert await _check(port, _client(renewed_by)) == "SERVING"
            assert await _check(port, _client(files.ca)) != "SERVING"
            reply = await HealthStub(open_one).Check(HealthCheckRequest(), timeout=5)
            assert reply.status == HealthCheckResponse.SERVING
        finally:
            open_one.close()
    assert [line["log_level"] for line in logs] == ["info"], logs
    assert _reloads("loaded") == loaded + 1
    assert not tls.reload()  # nothing changed since


async def test_a_new_client_ca_is_the_only_one_trusted_once_read(files: Files) -> None:
    tls = ServerTls(files.tls)
    successor = trustme.CA()
    async with _serving(tls) as port:
        files.trust_clients_of(successor)
        assert tls.reload()
        assert await _check(port, _client(files.ca, certified_by=files.ca)) != "SERVING"
        assert await _check(port, _client(files.ca, certified_by=successor)) == "SERVING"


async def test_connections_opened_before_the_client_cas_changed_connect_again(
    files: Files,
) -> None:
    """Regression (a probe): a client CA removed to cut its clients off left the
    connections they had open served for as long as they kept them (gRPC clients keep
    theirs for good). A renewed server certificate alone leaves them be."""
    tls = ServerTls(files.tls)
    successor = trustme.CA()
    async with _server(tls) as server:
        tls.when_trust_changes(server.renew_trust)
        port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        kept = Channel(
            "127.0.0.1", port, ssl=_client(files.ca, certified_by=files.ca), config=NAMED
        )

        async def check_kept() -> str:
            try:
                async with asyncio.timeout(5):
                    reply = await HealthStub(kept).Check(HealthCheckRequest())
            except (OSError, StreamTerminatedError, GRPCError) as error:
                return type(error).__name__
            return HealthCheckResponse.ServingStatus.Name(reply.status)

        try:
            assert await check_kept() == "SERVING"
            files.issue(files.ca)  # the server's certificate renewed, same client CA
            assert tls.reload()
            assert await check_kept() == "SERVING"
            with capture_logs() as logs:
                files.trust_clients_of(successor)
                assert tls.reload()

            async def refused() -> bool:
                return await check_kept() != "SERVING"

            await infra.wait_until(refused, timeout=10, what="the kept connection's end")
        finally:
            kept.close()
    said = [line for line in logs if "client CAs changed" in line["event"]]
    assert [line["connections"] for line in said] == [1], logs


async def test_files_that_cannot_be_used_leave_the_previous_ones_serving_said_once(
    files: Files,
) -> None:
    tls = ServerTls(files.server_only)
    renewed_by = trustme.CA()
    refused = _reloads("refused")
    async with _serving(tls) as port:
        # The renewal's certificate written, its key not yet.
        renewed = renewed_by.issue_cert(NAME, "127.0.0.1")
        renewed.cert_chain_pems[0].write_to_path(files.tls.cert_file)
        with capture_logs() as logs:
            assert not tls.reload()
            assert not tls.reload()
        assert await _check(port, _client(files.ca)) == "SERVING"
        renewed.private_key_pem.write_to_path(files.tls.key_file)
        assert tls.reload()
        assert await _check(port, _client(renewed_by)) == "SERVING"
    [warning] = logs
    assert warning["log_level"] == "warning"
    assert "GRPC_TLS_KEY_FILE" in warning["error"]
    assert "is not the one of the certificate" in warning["error"]
    assert _reloads("refused") == refused + 1


async def test_a_client_that_never_completes_its_handshake_is_let_go(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge, "PREFACE_TIMEOUT", 0.5)
    tls = ServerTls(files.server_only)
    async with _serving(tls) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # closed by the server
        finally:
            writer.close()


def _unusable(tls: GrpcTls) -> str:
    with pytest.raises(UnusableFiles) as refused:
        server_context(tls)
    return str(refused.value)


def test_a_missing_file_is_named_with_its_variable(files: Files, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.pem")
    said = _unusable(GrpcTls(missing, files.tls.key_file))
    assert said.startswith("GRPC_TLS_CERT_FILE: cannot read") and missing in said
    said = _unusable(GrpcTls(files.tls.cert_file, missing))
    assert said.startswith("GRPC_TLS_KEY_FILE: cannot read") and missing in said
    said = _unusable(GrpcTls(files.tls.cert_file, files.tls.key_file, missing))
    assert said.startswith("GRPC_TLS_CLIENT_CA_FILE: cannot read") and missing in said


def test_files_of_the_wrong_kind_are_named(files: Files, tmp_path: Path) -> None:
    cert, key = files.tls.cert_file, files.tls.key_file
    assert _unusable(GrpcTls(key, key)).startswith("GRPC_TLS_CERT_FILE:")
    assert "holds no PEM private key of the certificate" in _unusable(GrpcTls(cert, cert))
    other = trustme.CA().issue_cert(NAME)
    other.private_key_pem.write_to_path(tmp_path / "other.key")
    assert "is not the one of the certificate" in _unusable(
        GrpcTls(cert, str(tmp_path / "other.key"))
    )
    # A client CA file holding a certificate that cannot issue others accepts no client.
    assert "holds no CA certificate" in _unusable(GrpcTls(cert, key, cert))


def test_an_encrypted_key_is_refused_not_asked_for(files: Files, tmp_path: Path) -> None:
    key = tmp_path / "encrypted.key"
    leaf = files.ca.issue_cert(NAME)
    private = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "leaf.pem")
    said = _unusable(GrpcTls(str(tmp_path / "leaf.pem"), str(key)))
    assert said.startswith("GRPC_TLS_KEY_FILE:") and "encrypted" in said


def test_tls_needs_both_the_certificate_and_its_key() -> None:
    assert parse_grpc_tls(None, None, None) is None
    with pytest.raises(ConfigError, match="GRPC_TLS_CERT_FILE is set and GRPC_TLS_KEY_FILE"):
        parse_grpc_tls("c.pem", None, None)
    with pytest.raises(ConfigError, match="GRPC_TLS_KEY_FILE is set and GRPC_TLS_CERT_FILE"):
        parse_grpc_tls(None, "k.pem", None)
    with pytest.raises(ConfigError, match="GRPC_TLS_CLIENT_CA_FILE"):
        parse_grpc_tls(None, None, "ca.pem")


def test_the_environment_sets_tls() -> None:
    env = {"GRPC_TLS_CERT_FILE": "c.pem", "GRPC_TLS_KEY_FILE": "k.pem"}
    assert Settings.from_env(env).grpc_tls == GrpcTls("c.pem", "k.pem")
    with pytest.raises(ConfigError, match="GRPC_TLS_KEY_FILE is set"):
        Settings.from_env({**env, "GRPC_TLS_CERT_FILE": ""})  # empty: unset
    assert Settings.from_env({}).grpc_tls is None


@pytest.mark.parametrize("mutual", [False, True])
async def test_the_probe_asks_over_tls(files: Files, mutual: bool) -> None:
    given = files.tls if mutual else files.server_only
    tls = ServerTls(given)
    async with _serving(tls) as port:
        settings = Settings(
            command_address=("127.0.0.1", port), metrics_address=None, grpc_tls=given
        )
        # Health() serves the "" service only: Commands' check reaches it and says so.
        [problem] = await health_check(settings, ["commands-api"])
        assert "Commands" in problem and "NOT_FOUND" in problem, problem
        plain = Settings(command_address=("127.0.0.1", port), metrics_address=None)
        [refused] = await health_check(plain, ["commands-api"])
        assert "NOT_FOUND" not in refused, refused


async def test_the_probe_says_where_its_tls_settings_disagree_with_the_ports(
    files: Files,
) -> None:
    """Told only "Connection lost", an operator could not tell a probe without the TLS
    variables from a service that does not answer."""

    async def problem(tls: GrpcTls | None, port: int) -> str:
        settings = Settings(command_address=("127.0.0.1", port), metrics_address=None, grpc_tls=tls)
        [found] = await health_check(settings, ["commands-api"])
        return found

    async with _serving(ServerTls(files.server_only)) as port:
        found = await problem(None, port)
        assert "serves TLS" in found and "GRPC_TLS_CERT_FILE" in found, found
    async with _serving(None) as port:
        found = await problem(files.server_only, port)
        assert "serves plaintext" in found, found
    async with _serving(ServerTls(files.tls)) as port:
        found = await problem(None, port)
        assert "serves mutual TLS" in found and "GRPC_TLS_CLIENT_CA_FILE" in found, found
        found = await problem(files.server_only, port)
        assert "CERTIFICATE_REQUIRED" in found, found
        assert "GRPC_TLS_CLIENT_CA_FILE for the probe" in found, found
        files.trust_clients_of(trustme.CA())  # the probe's certificate of another CA
        refused = ServerTls(files.tls)
    async with _serving(refused) as port:
        found = await problem(files.tls, port)
        assert "UNKNOWN_CA" in found, found
        assert "refuses the certificate the probe presents" in found, found
    async with _serving(None) as port:
        # A port that answers as it should is not said to disagree.
        found = await problem(None, port)
        assert "NOT_FOUND" in found and ";" not in found, found


async def test_the_probe_says_the_certificate_it_presents_has_expired(files: Files) -> None:
    """Regression (a probe): with the service's certificate expired, the probe, which
    presents it under mutual TLS, was told to mend the client CA file; new certificate
    files mend it (a restart does not)."""
    now = datetime.now(UTC)
    leaf = files.ca.issue_cert(
        NAME, "127.0.0.1", not_before=now - timedelta(days=2), not_after=now - timedelta(days=1)
    )
    leaf.private_key_pem.write_to_path(files.tls.key_file)
    leaf.cert_chain_pems[0].write_to_path(files.tls.cert_file)
    async with _serving(ServerTls(files.tls)) as port:
        settings = Settings(
            command_address=("127.0.0.1", port), metrics_address=None, grpc_tls=files.tls
        )
        [found] = await health_check(settings, ["commands-api"])
    assert "CERTIFICATE_EXPIRED" in found, found
    assert "has expired: give the service new certificate files" in found, found
    assert "GRPC_TLS_CLIENT_CA_FILE" not in found, found


def _expiry_exported(tls: GrpcTls) -> float | None:
    return REGISTRY.get_sample_value(
        "financing_grpc_tls_certificate_expiry_timestamp_seconds", {"file": tls.cert_file}
    )


@pytest.mark.parametrize("year", [2049, 2061])  # UTCTime until 2049, GeneralizedTime after
def test_the_certificates_expiry_is_read_from_its_file(files: Files, year: int) -> None:
    not_after = datetime(year, 7, 1, 12, 30, 15, tzinfo=UTC)
    leaf = files.ca.issue_cert(NAME, not_after=not_after)
    leaf.cert_chain_pems[0].write_to_path(files.tls.cert_file)
    assert certificate_expiry(files.tls.cert_file) == not_after.timestamp()


def test_the_certificate_expiring_is_exported_and_said_once_soon_and_once_expired(
    files: Files,
) -> None:
    in_three_days = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    leaf = files.ca.issue_cert(NAME, not_after=in_three_days)
    leaf.private_key_pem.write_to_path(files.tls.key_file)
    leaf.cert_chain_pems[0].write_to_path(files.tls.cert_file)
    with capture_logs() as logs:
        tls = ServerTls(files.server_only)
        tls.look_at_expiry()
        later = in_three_days.timestamp() + 1
        tls.look_at_expiry(now=later)
        tls.look_at_expiry(now=later + 3600)
    assert _expiry_exported(files.server_only) == in_three_days.timestamp()
    said = [entry["event"] for entry in logs if "expire" in entry["event"]]
    assert len(said) == 2 and "expires soon" in said[0] and "has expired" in said[1], said
    files.issue(files.ca)  # renewed: trustme's certificates last years
    with capture_logs() as logs:
        assert tls.reload()
    assert not [entry for entry in logs if "expire" in entry["event"]], logs
    renewed = _expiry_exported(files.server_only)
    assert renewed is not None and renewed > in_three_days.timestamp() + 300 * 86400


async def test_a_secret_updated_by_swapping_a_link_is_read_again(tmp_path: Path) -> None:
    """As Kubernetes updates a mounted secret: the files are links through `..data`, a
    link to a folder of this version's files, swapped for one to the next folder."""
    cas = trustme.CA(), trustme.CA()
    for version, ca in enumerate(cas):
        folder = tmp_path / f"..version{version}"
        folder.mkdir()
        leaf = ca.issue_cert(NAME, "127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(folder / "tls.crt")
        leaf.private_key_pem.write_to_path(folder / "tls.key")
    (tmp_path / "..data").symlink_to("..version0")
    for name in ("tls.crt", "tls.key"):
        (tmp_path / name).symlink_to(f"..data/{name}")
    tls = ServerTls(GrpcTls(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")))
    async with _serving(tls) as port:
        assert await _check(port, _client(cas[0])) == "SERVING"
        (tmp_path / "..data_tmp").symlink_to("..version1")
        (tmp_path / "..data_tmp").rename(tmp_path / "..data")
        assert tls.reload()
        assert await _check(port, _client(cas[1])) == "SERVING"


async def test_the_watch_reads_changed_files_by_itself(files: Files) -> None:
    tls = ServerTls(files.server_only)
    renewed_by = trustme.CA()
    async with _serving(tls) as port:
        watching = asyncio.create_task(tls.watch(every=0.05))
        try:
            files.issue(renewed_by)

            async def served() -> bool:
                return await _check(port, _client(renewed_by)) == "SERVING"

            await infra.wait_until(served, timeout=5, what="the renewed certificate served")
        finally:
            watching.cancel()


async def test_connections_still_shaking_hands_count_against_the_servers_connections(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: served by the listener, a TLS connection counted only once its
    handshake was over: connections that never began theirs took every file descriptor
    of the process, both ports and `/health` dark, for as long as they came."""
    monkeypatch.setattr(edge, "PREFACE_TIMEOUT", 60.0)  # no help from the handshake's end
    tls = ServerTls(files.server_only)
    async with _server(tls, connections=4) as server:
        port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
        try:
            reads = [asyncio.create_task(reader.read()) for reader, _ in silent]

            async def six_closed() -> bool:
                return sum(read.done() and read.result() == b"" for read in reads) >= 6

            # Closed to make room as the others came: not after the handshake's 60 s.
            await infra.wait_until(six_closed, timeout=10, what="six silent ones closed")
            # A client that shakes hands is served, making room among the silent ones.
            assert await _check(port, _client(files.ca)) == "SERVING"
        finally:
            for _, writer in silent:
                writer.close()
            for read in reads:
                read.cancel()

        async def all_left() -> bool:
            return not server._edge_connections.held()

        await infra.wait_until(all_left, what="every connection gone from the count")


def _resumed(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bool, ssl.SSLSession | None]:
    """A connection with `context` offering `session`: whether it was resumed, and the
    session it ends with (tickets are read with the server's first bytes)."""
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname=NAME, session=session) as tls,
    ):
        tls.settimeout(5)
        tls.recv(100)  # the server's SETTINGS, and any ticket before them
        return tls.session_reused, tls.session


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_with_a_client_ca_no_session_is_resumed(
    files: Files, version: ssl.TLSVersion
) -> None:
    """Regression: a resumed session skips the client's certificate, and a client whose
    CA was taken out of the file went on being served on tickets the first context had
    issued."""
    client = _client(files.ca, certified_by=files.ca)
    client.minimum_version = client.maximum_version = version
    async with _serving(ServerTls(files.tls)) as port:
        _, session = await asyncio.to_thread(_resumed, port, client, None)
        resumed, _ = await asyncio.to_thread(_resumed, port, client, session)
    assert not resumed


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"]
)
async def test_sessions_of_files_read_before_are_not_resumed(
    files: Files, version: ssl.TLSVersion
) -> None:
    """Regression: sessions were resumed on the first files' tickets for the life of the
    process, so a client that trusted only the CA of a certificate served no more went
    on connecting, on the old trust, after the files had changed."""
    client = _client(files.ca)
    client.minimum_version = client.maximum_version = version
    tls = ServerTls(files.server_only)
    async with _serving(tls) as port:
        _, session = await asyncio.to_thread(_resumed, port, client, None)
        resumed, session = await asyncio.to_thread(_resumed, port, client, session)
        assert resumed  # the same files: resumed, as TLS lets it
        other = trustme.CA()
        files.issue(other)
        assert tls.reload()
        fresh = _client(other)
        fresh.minimum_version = fresh.maximum_version = version
        resumed, _ = await asyncio.to_thread(_resumed, port, fresh, None)
        assert not resumed
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
            await asyncio.to_thread(_resumed, port, client, session)


async def test_files_refused_for_a_passing_reason_are_tried_again_unchanged(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: files renewed while the process could open no file (every descriptor
    taken for a moment) were said unusable once and never read again: the old
    certificate was served until it expired."""
    tls = ServerTls(files.server_only)
    renewed_by = trustme.CA()
    files.issue(renewed_by)
    unusable = True

    def passing(given: GrpcTls) -> ssl.SSLContext:
        nonlocal unusable
        if unusable:
            unusable = False
            raise UnusableFiles("GRPC_TLS_CERT_FILE: cannot read it: Too many open files")
        return server_context(given)

    monkeypatch.setattr(tls_watch, "server_context", passing)
    async with _serving(tls) as port:
        with capture_logs() as logs:
            assert not tls.reload()
            assert tls.reload()  # the same files, readable now
        assert await _check(port, _client(renewed_by)) == "SERVING"
    assert [line["log_level"] for line in logs] == ["warning", "info"]


def test_a_key_of_another_type_than_the_certificate_is_named_as_not_its(
    files: Files, tmp_path: Path
) -> None:
    other = trustme.CA(key_type=trustme.KeyType.ECDSA).issue_cert(NAME)
    other.private_key_pem.write_to_path(tmp_path / "ecdsa.key")
    other.cert_chain_pems[0].write_to_path(tmp_path / "ecdsa.pem")
    for cert, key in (
        (files.tls.cert_file, str(tmp_path / "ecdsa.key")),
        (str(tmp_path / "ecdsa.pem"), files.tls.key_file),
    ):
        said = _unusable(GrpcTls(cert, key))
        assert said.startswith("GRPC_TLS_KEY_FILE:"), said
        assert f"of the certificate in {cert}" in said, said


def test_a_handshake_past_its_timeout_or_reset_by_its_client_is_said_so() -> None:
    """Regression (a probe): a handshake ended by asyncio past the timeout was said
    "ConnectionAbortedError", and one a client reset "ConnectionResetError", alone."""

    timed_out = ConnectionAbortedError(
        "SSL handshake is taking longer than 10.0 seconds: aborting the connection"
    )
    assert _handshake(timed_out) == "not over within 10 s"
    assert _handshake(ConnectionResetError(104, "Connection reset by peer")) == (
        "the client reset the connection, as one that does not trust the certificate does"
    )
    assert _handshake(ConnectionAbortedError()) == "ConnectionAbortedError"
