"""`financing health-check`: whether the components running here are healthy (a container probe).

`python -m financing.entrypoints.cli.health_check` does the same while
importing only what it needs: the container runs it every few seconds.

It asks what an orchestrator would: the gRPC Health Checking Protocol of each
gRPC component selected (`Commands` on COMMAND_SERVER_ADDRESS, `Queries` on
QUERY_SERVER_ADDRESS), and the `/health` of the metrics endpoint
(METRICS_ADDRESS), which covers every component: every consumer consumes and
no dependency is down. The components are those `financing serve` runs with
the same environment (FINANCING_COMPONENTS, all by default). Where the gRPC ports
serve TLS (GRPC_TLS_CERT_FILE), it asks over TLS (`tls.client_context`); a connection
lost or refused is looked at once more (`_disagreement`) for the one mistake a probe can
name: its TLS settings are not the service's (a port serving TLS asked in plaintext, or
the other way round, or the probe's certificate refused under mutual TLS), which
otherwise reads "Connection lost".
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from grpclib.client import Channel
from grpclib.exceptions import StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from financing.config import (
    COMMAND_SERVER_ADDRESS,
    COMPONENTS_VARIABLE,
    GRPC_TLS_VARIABLES,
    METRICS_ADDRESS,
    QUERY_SERVER_ADDRESS,
    ConfigError,
    GrpcTls,
    Settings,
)
from financing.entrypoints.grpc.tls import client_context
from financing.entrypoints.listening import unspecified
from financing.tls_files import UnusableFiles

TIMEOUT = 3.0
# Bytes of the metrics endpoint's answer to /health read: its status, headers and the one
# line saying what is not healthy.
HEALTH_ANSWER_BYTES = 16 * 1024
# What the probe reads (in either form: `financing health-check`, or this module run).
HEALTH_CHECK_VARIABLES = (
    COMPONENTS_VARIABLE,
    COMMAND_SERVER_ADDRESS,
    QUERY_SERVER_ADDRESS,
    METRICS_ADDRESS,
    *GRPC_TLS_VARIABLES,
)


async def health_check(settings: Settings, components: Iterable[str]) -> list[str]:
    """What is not healthy: empty when every check passed."""
    selected = set(components)
    checks = []
    if "commands-api" in selected:
        checks.append(_grpc_health(settings.command_address, "Commands", settings.grpc_tls))
    if "queries-api" in selected:
        checks.append(_grpc_health(settings.query_address, "Queries", settings.grpc_tls))
    if settings.metrics_address is not None:
        checks.append(_http_health(settings.metrics_address))
    if not checks:
        # Passing would say a process is healthy that nothing was asked of.
        return ["nothing to check: no gRPC component is selected and METRICS_ADDRESS is empty"]
    return [problem for problem in await asyncio.gather(*checks) if problem]


async def probe(settings: Settings) -> int:
    """Say what is not healthy on stderr; the exit code: 0 when everything is."""
    problems = await health_check(settings, settings.components)
    for problem in problems:
        print(f"not healthy: {problem}", file=sys.stderr)
    return 1 if problems else 0


def reachable(address: tuple[str, int]) -> tuple[str, int]:
    """Where a listener on `address` answers on this host: one on the unspecified address,
    however written, takes IPv4 and IPv6 alike (`listening.wildcard_socket`), and is
    asked on IPv4's loopback, which a listener on IPv6 alone would have refused."""
    host, port = address
    return ("127.0.0.1" if not host or unspecified(host) else host), port


async def _grpc_health(address: tuple[str, int], service: str, tls: GrpcTls | None) -> str:
    host, port = reachable(address)
    try:
        channel = Channel(host, port, ssl=None if tls is None else client_context(tls))
    except UnusableFiles as error:
        return f"{service} at {host}:{port}: {error}"
    try:
        reply = await HealthStub(channel).Check(
            HealthCheckRequest(service=service), timeout=TIMEOUT
        )
    except Exception as error:  # any failure to answer is unhealthy, whatever it is
        problem = f"{service} at {host}:{port}: {_failure(error)}"
        # A port that did not answer in time is no question of TLS (TimeoutError is an
        # OSError): asked on a frozen instance, its plaintext port read a TLS handshake
        # once it ran again, a breach of HTTP/2 logged for each probe made meanwhile.
        if isinstance(error, StreamTerminatedError | OSError) and not isinstance(
            error, TimeoutError
        ):  # ssl.SSLError is an OSError too
            why = await _disagreement(host, port, tls)
            if why:
                return f"{problem}; {why}"
        return problem
    finally:
        channel.close()
    if reply.status != HealthCheckResponse.SERVING:
        name = HealthCheckResponse.ServingStatus.Name(reply.status)
        return f"{service} at {host}:{port}: {name}"
    return ""


def _failure(error: BaseException) -> str:
    """The error's type and text; a timeout (with no text, or grpclib's "Deadline
    exceeded") said as what it is."""
    if isinstance(error, TimeoutError):
        return f"no answer within {TIMEOUT:g} s"
    return f"{type(error).__name__}: {error}"


# The client's first bytes of HTTP/2 (RFC 9113 section 3.4): the preface and an empty
# SETTINGS frame; a server of HTTP/2 answers with a SETTINGS frame of its own (type 4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS = 4


async def _disagreement(host: str, port: int, tls: GrpcTls | None) -> str:
    """How the probe's TLS settings (`tls`) and what the port serves disagree, asked on
    connections of its own: "" when they do not, or the port cannot tell."""
    if tls is None:
        try:
            await _first_frame(host, port, client_context(None))
        except ssl.SSLError as error:
            # Shaken hands, then refused: under TLS 1.3 a server asking for a client
            # certificate says so after the handshake (its alert).
            if "ALERT" not in str(getattr(error, "reason", None) or ""):
                return ""
            return (
                f"the port serves mutual TLS ({error.reason}), which this probe does not"
                " ask for: set GRPC_TLS_CERT_FILE, GRPC_TLS_KEY_FILE and"
                " GRPC_TLS_CLIENT_CA_FILE for it as for the service"
            )
        except (OSError, TimeoutError):  # not even a TLS handshake: some other trouble
            return ""
        return (
            "the port serves TLS, which this probe does not ask for: set"
            " GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE for it as for the service"
        )
    try:
        header = await _first_frame(host, port, None)
        if len(header) == 9 and header[3] == _SETTINGS:
            return (
                "the port serves plaintext, and GRPC_TLS_CERT_FILE is set for this probe:"
                " the service runs without it"
            )
    except (OSError, TimeoutError):
        pass
    try:
        if await _first_frame(host, port, client_context(tls)):
            return ""
        # Closed before a word of HTTP/2, its reason unsaid (its alert lost).
        refused = "the port closed the connection after its TLS handshake: perhaps"
    except ssl.SSLError as error:
        # Under TLS 1.3 a server judges the client's certificate after the handshake,
        # and its alert is what the first read meets.
        alert = str(getattr(error, "reason", None) or "")
        if "ALERT" not in alert:
            return ""
        refused = f"the port refused this probe after its TLS handshake ({alert}):"
    except (OSError, TimeoutError, UnusableFiles):
        return ""
    if tls.client_ca_file is None:
        return (
            f"{refused} it asks for a client certificate (mutual TLS); set"
            " GRPC_TLS_CLIENT_CA_FILE for the probe as for the service"
        )
    if "CERTIFICATE_EXPIRED" in refused:
        # The probe presents the service's own certificate, which every client refuses
        # too once it has expired: new files mend it, a restart does not.
        return (
            f"{refused} the certificate the probe presents (GRPC_TLS_CERT_FILE's, the one"
            " the service serves) has expired: give the service new certificate files"
        )
    return (
        f"{refused} it refuses the certificate the probe presents (GRPC_TLS_CERT_FILE's),"
        " whose issuer the service's GRPC_TLS_CLIENT_CA_FILE must hold, allowing client"
        " authentication"
    )


async def _first_frame(host: str, port: int, context: ssl.SSLContext | None) -> bytes:
    """The header of the first HTTP/2 frame the port answers the preface with (over TLS
    with `context`, else plaintext): fewer than 9 bytes when it closed the connection
    first. Raises when the connection (or its TLS handshake) fails, or nothing comes
    within the timeout."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port, ssl=context)
        try:
            writer.write(_HTTP2_PREFACE)
            return await reader.readexactly(9)
        except asyncio.IncompleteReadError as closed:
            return closed.partial
        except ConnectionResetError:  # closed with the preface unread
            return b""
        finally:
            writer.close()


async def _http_health(address: tuple[str, int]) -> str:
    host, port = reachable(address)
    answer = await health_answer(address)
    if answer.status == 200 and answer.ours:
        return ""
    if answer.status is not None and not answer.ours:  # another program listens there
        return f"metrics endpoint at {host}:{port}: not the service's answer ({answer.said})"
    return f"metrics endpoint at {host}:{port}: {answer.said}"


@dataclass(frozen=True)
class HealthAnswer:
    """What the metrics endpoint's /health answered: its HTTP status (None: it could not be
    asked), and what it said, or why it could not be asked."""

    status: int | None
    said: str
    # Whether it answered as the service's /health does ("healthy", "not healthy: ..."),
    # not as another program listening there.
    ours: bool = False


async def health_answer(address: tuple[str, int]) -> HealthAnswer:
    """Ask the metrics endpoint at `address` (as `reachable` says) for /health."""
    host, port = reachable(address)
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            answer = b""  # the endpoint closes the connection after its answer
            while len(answer) < HEALTH_ANSWER_BYTES and (more := await reader.read(4096)):
                answer += more
            writer.close()
    except (OSError, TimeoutError) as error:
        return HealthAnswer(None, _failure(error))
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    words = status_line.split()
    status = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
    # The endpoint names what is not healthy on its answer's one line.
    first = body.split(b"\n", 1)[0]
    ours = (status == 200 and first == b"healthy") or (
        status == 503 and first.startswith(b"not healthy: ")
    )
    said = first.removeprefix(b"not healthy: ") if status == 503 else b""  # the probe says it
    text = b": ".join(part for part in (status_line.strip(), said.strip()) if part)
    return HealthAnswer(status or 0, _printable(text), ours)


# How much of another program's answer is shown.
HEALTH_SAID_BYTES = 200


def _printable(said: bytes) -> str:
    """What a program answered, its bytes that are no printable text escaped: a gRPC port
    named as METRICS_ADDRESS answered HTTP/2 frames, printed raw onto the terminal."""
    text = said[:HEALTH_SAID_BYTES].decode(errors="backslashreplace")
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return shown + ("..." if len(said) > HEALTH_SAID_BYTES else "")


def main() -> None:
    if sys.argv[1:]:
        # Arguments (`--help`, or a mistake) are the command line's to answer: the probe
        # takes none, and ran regardless, whatever they asked.
        from financing.entrypoints.cli import main as command_line

        command_line(["health-check", *sys.argv[1:]])
        return
    try:
        settings = Settings.from_env(reads=HEALTH_CHECK_VARIABLES)
    except ConfigError as error:
        print(f"financing health-check: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(probe(settings)))


if __name__ == "__main__":
    main()
