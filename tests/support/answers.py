"""gRPC calls whose answer's metadata matters: the reply and the response's initial metadata.

betterproto's stubs return the reply only; this makes the same unary call on the
stub's channel (grpclib) and keeps what the server sent before the reply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import betterproto
from betterproto.grpc.grpclib_client import ServiceStub
from grpclib.const import Cardinality

from tests.support.raw_h2 import RawConnection

R = TypeVar("R", bound=betterproto.Message)

CORRELATION_METADATA = "correlation-id"


async def call(
    stub: ServiceStub,
    route: str,
    request: betterproto.Message,
    reply_type: type[R],
    *,
    metadata: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
) -> tuple[R, dict[str, str]]:
    """`route` (e.g. "/Commands/SellInvoice") called with `metadata` (pairs, for a key sent
    more than once): (reply, initial metadata)."""
    async with stub.channel.request(
        route,
        Cardinality.UNARY_UNARY,
        type(request),
        reply_type,
        timeout=stub.timeout,
        metadata=list(metadata.items() if isinstance(metadata, Mapping) else metadata or ()),
    ) as stream:
        await stream.send_message(request, end=True)
        reply = await stream.recv_message()
        initial = stream.initial_metadata
    assert reply is not None, f"{route} answered no reply"
    assert initial is not None, f"{route} answered no initial metadata"
    return reply, {key: str(value) for key, value in initial.items()}


async def answer_fields(
    address: tuple[str, int],
    route: str,
    request: betterproto.Message,
    *,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """`route` called at `address` from a raw HTTP/2 connection: every field the server
    ended the call with, headers and trailers (gRPC's clients keep the `grpc-*` ones
    to themselves)."""
    body = bytes(request)
    framed = b"\x00" + len(body).to_bytes(4, "big") + body
    fields = [(key.encode(), value.encode()) for key, value in (metadata or {}).items()]
    async with RawConnection.open(address) as connection:
        stream = connection.call(route.encode(), framed, metadata=fields)
        answer = await connection.answered(stream)
    return {key.decode(): value.decode() for key, value in answer.items()}


def correlation_of(metadata: Mapping[str, str]) -> str:
    """The `correlation-id` an answer carries (the assertion names what came instead)."""
    assert CORRELATION_METADATA in metadata, f"no {CORRELATION_METADATA} in {dict(metadata)}"
    return metadata[CORRELATION_METADATA]


async def call_with_grpcio(
    target: str,
    route: str,
    request: betterproto.Message,
    reply_type: type[R],
    *,
    metadata: Mapping[str, str] | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - the call's own deadline, as grpcio takes it
) -> tuple[R, dict[str, str]]:
    """The same call from grpcio (another client, which may send what grpclib refuses to,
    such as an empty metadata value) at `target` ("host:port")."""
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        method = channel.unary_unary(
            route,
            request_serializer=bytes,
            response_deserializer=lambda data: reply_type().parse(data),
        )
        answer = method(request, metadata=tuple((metadata or {}).items()), timeout=timeout)
        reply = await answer
        initial = await answer.initial_metadata()
    return reply, {str(key): str(value) for key, value in (initial or ())}
