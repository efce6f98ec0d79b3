"""Broker-side helpers for tests: private vhosts, queue inspection, raw publishing (and
publishing frame by frame, as a publisher that sets no message-id property does)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import pamqp.body
import pamqp.commands
import pamqp.exceptions
import pamqp.frame
import pamqp.header
import pamqp.heartbeat
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import ChannelNotFoundEntity

from tests.support import infra
from tests.support.relay import Relay


@dataclass(frozen=True)
class Vhost:
    name: str
    url: str


@asynccontextmanager
async def private_vhost(prefix: str = "fin_rmq") -> AsyncIterator[Vhost]:
    """A vhost of one's own: for tests that inspect or disturb the whole vhost."""
    name = await asyncio.to_thread(infra.made_vhost, prefix)
    try:
        yield Vhost(name, infra.amqp_url(name))
    finally:
        await asyncio.to_thread(infra.delete_vhost, name)


def _rabbitmqctl_json(*args: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args, "--formatter", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows: list[dict[str, Any]] = json.loads(done.stdout or "[]")
    return rows


async def list_queues(vhost: str) -> dict[str, dict[str, Any]]:
    """Every queue of `vhost` as the broker reports it, by name."""
    rows = await asyncio.to_thread(
        _rabbitmqctl_json,
        "list_queues",
        "-p",
        vhost,
        "name",
        "durable",
        "type",
        "arguments",
        "messages_ready",
        "messages_unacknowledged",
        "consumers",
    )
    return {row["name"]: row for row in rows}


async def connection_names(vhost: str) -> list[str]:
    """The names the client connections of `vhost` gave themselves (one per connection).
    `list_connections` lists every vhost's, whatever `-p` says: each is filtered here."""
    rows = await asyncio.to_thread(
        _rabbitmqctl_json, "list_connections", "vhost", "client_properties"
    )
    # Each property as [key, type, value].
    return [
        next(
            (str(value) for key, _, value in row["client_properties"] if key == "connection_name"),
            "",
        )
        for row in rows
        if row["vhost"] == vhost
    ]


async def list_exchanges(vhost: str) -> dict[str, dict[str, Any]]:
    rows = await asyncio.to_thread(
        _rabbitmqctl_json, "list_exchanges", "-p", vhost, "name", "type", "durable"
    )
    return {row["name"]: row for row in rows}


async def list_bindings_with_arguments(vhost: str) -> list[tuple[str, str, str, str]]:
    """(source, destination, routing key, the `name` a headers binding matches or "") of
    every binding except the default exchange's."""
    rows = await asyncio.to_thread(
        _rabbitmqctl_json,
        "list_bindings",
        "-p",
        vhost,
        "source_name",
        "destination_name",
        "routing_key",
        "arguments",
    )
    return [
        (
            row["source_name"],
            row["destination_name"],
            row["routing_key"],
            next((arg[2] for arg in row["arguments"] if arg[0] == "name"), ""),
        )
        for row in rows
        if row["source_name"]
    ]


async def queue_state(connection: AbstractConnection, queue: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of a queue, by passive declaration; None if it does not exist."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except ChannelNotFoundEntity:
        return None  # the broker closed the channel
    result = declared.declaration_result
    await channel.close()
    return result.message_count or 0, result.consumer_count or 0


class RawText(str):
    """Text that goes on the wire as exactly these bytes, UTF-8 or not, as a foreign
    publisher can send it: pamqp encodes a `str` (a header's value or name, a property)
    through `.encode("utf-8")`, and aio-pika passes properties through `str()`."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawText:
        text = super().__new__(cls, raw.decode("latin-1"))
        text.raw = raw
        return text

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw

    def __str__(self) -> str:
        return self


async def publish_raw(
    connection: AbstractConnection,
    queue: str,
    body: bytes,
    headers: Mapping[str, Any],
    **properties: Any,
) -> None:
    """Publish exactly these headers and properties (of any AMQP type, or RawText) to
    `queue`, confirmed."""
    channel = await connection.channel()
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                headers=dict(headers),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                **properties,
            ),
            routing_key=queue,
        )
    finally:
        await channel.close()


async def drain(
    connection: AbstractConnection, queue: str, *, expected: int
) -> list[AbstractIncomingMessage]:
    """Take (and ack) `expected` messages from `queue`, in queue order."""
    channel = await connection.channel(publisher_confirms=False)
    taken: list[AbstractIncomingMessage] = []
    try:
        declared = await channel.declare_queue(queue, passive=True)

        async def take() -> bool:
            while len(taken) < expected:
                message = await declared.get(no_ack=True, fail=False)
                if message is None:
                    return False
                taken.append(message)
            return True

        await infra.wait_until(take, what=f"{expected} messages on {queue}")
    finally:
        await channel.close()
    return taken


async def close_connections(vhost: str) -> None:
    """Make the broker drop every client connection of `vhost`, as a restart would."""
    await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "closed by a test"],
        check=True,
        capture_output=True,
        timeout=60,
    )


async def revoke_permissions(vhost: str) -> None:
    """Take guest's permissions on `vhost` away: open connections stay, every operation
    on a resource (declare, publish, consume) is refused and closes its channel."""
    await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "clear_permissions", "-p", vhost, "guest"],
        check=True,
        capture_output=True,
        timeout=60,
    )


async def grant_permissions(vhost: str, *, write: str = ".*") -> None:
    """Give guest every permission on `vhost` (again), writing only where `write` matches."""
    await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", write, ".*"],
        check=True,
        capture_output=True,
        timeout=60,
    )


@asynccontextmanager
async def limited_user(vhost: str, limits: Mapping[str, int]) -> AsyncIterator[str]:
    """The URL of `vhost` for a user of one's own with every permission on it and the
    broker's per-user `limits` (`max-channels`, `max-connections`); the user is deleted
    afterwards."""
    name = infra.unique_name("fin_limited")
    for args in (
        ["add_user", name, name],
        ["set_permissions", "-p", vhost, name, ".*", ".*", ".*"],
        ["set_user_limits", name, json.dumps(dict(limits))],
    ):
        await asyncio.to_thread(_rabbitmqctl, *args)
    try:
        yield f"amqp://{name}:{name}@{infra.AMQP_HOST}:{infra.AMQP_PORT}/{vhost}"
    finally:
        await asyncio.to_thread(_rabbitmqctl, "delete_user", name)


@asynccontextmanager
async def publishes_refused(vhost: str, queue: str) -> AsyncIterator[None]:
    """Every publish to `queue` of `vhost` refused (nacked) while in the block, by a policy
    of the vhost: a command sent to it waits on its confirm and tries again."""
    policy = f"refuse_{queue}"
    definition = json.dumps({"max-length": 0, "overflow": "reject-publish"})
    await asyncio.to_thread(
        _rabbitmqctl,
        "set_policy",
        "-p",
        vhost,
        "--apply-to",
        "queues",
        policy,
        f"^{queue}$",
        definition,
    )
    try:
        yield
    finally:
        await asyncio.to_thread(_rabbitmqctl, "clear_policy", "-p", vhost, policy)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


async def rabbitmqctl(*args: str) -> None:
    """`rabbitmqctl ARGS`, an operator's command (failing the test if it fails)."""
    await asyncio.to_thread(_rabbitmqctl, *args)


async def queue_settled(vhost: str, queue: str) -> bool:
    """Whether `queue` holds no message, neither ready nor delivered and unacked."""
    row = (await list_queues(vhost)).get(queue)
    return row is not None and row["messages_ready"] == 0 and row["messages_unacknowledged"] == 0


class BrokerProxy(Relay):
    """A relay to the broker (tests.support.relay), with the URL of a vhost through it."""

    def __init__(self) -> None:
        super().__init__(infra.AMQP_HOST, infra.AMQP_PORT)

    def url(self, vhost: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"


async def vhost_made_again(vhost: str) -> None:
    """Delete `vhost`, with everything it holds, and make it again, empty, for guest: a
    broker that lost its data."""
    await asyncio.to_thread(_rabbitmqctl, "delete_vhost", vhost)
    await asyncio.to_thread(_rabbitmqctl, "add_vhost", vhost)
    await asyncio.to_thread(_rabbitmqctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


async def publish_without_properties(
    host: str,
    port: int,
    vhost: str,
    *,
    exchange: str,
    routing_key: str,
    body: bytes,
    headers: Mapping[str, Any],
) -> None:
    """Publish with no AMQP property but the headers, confirmed, as Go's amqp client can.

    aio-pika always fills in a message-id property; a publisher that sets none
    is spoken to here directly, frame by frame.
    """
    reader, writer = await asyncio.open_connection(host, port)
    buffer = b""

    async def expect(kind: type[Any]) -> Any:
        nonlocal buffer
        while True:
            if buffer:
                try:
                    used, _, frame = pamqp.frame.unmarshal(buffer)
                except pamqp.exceptions.UnmarshalingException:
                    used = 0
                if used:
                    buffer = buffer[used:]
                    if isinstance(frame, kind):
                        return frame
                    if not isinstance(frame, pamqp.heartbeat.Heartbeat):
                        raise AssertionError(f"expected {kind.__name__}, the broker sent {frame!r}")
                    continue
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                raise AssertionError(f"the broker closed the connection before {kind.__name__}")
            buffer += chunk

    def send(frame: Any, channel: int) -> None:
        writer.write(pamqp.frame.marshal(frame, channel))

    try:
        writer.write(pamqp.header.ProtocolHeader().marshal())
        await expect(pamqp.commands.Connection.Start)
        send(pamqp.commands.Connection.StartOk(response="\0guest\0guest"), 0)
        tune = await expect(pamqp.commands.Connection.Tune)
        send(pamqp.commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0), 0)
        send(pamqp.commands.Connection.Open(virtual_host=vhost), 0)
        await expect(pamqp.commands.Connection.OpenOk)
        send(pamqp.commands.Channel.Open(), 1)
        await expect(pamqp.commands.Channel.OpenOk)
        send(pamqp.commands.Confirm.Select(), 1)
        await expect(pamqp.commands.Confirm.SelectOk)
        properties = pamqp.commands.Basic.Properties(headers=dict(headers), delivery_mode=2)
        send(pamqp.commands.Basic.Publish(exchange=exchange, routing_key=routing_key), 1)
        send(pamqp.header.ContentHeader(0, len(body), properties), 1)
        send(pamqp.body.ContentBody(body), 1)
        await expect(pamqp.commands.Basic.Ack)
        send(pamqp.commands.Connection.Close(200, "done", 0, 0), 0)
        await expect(pamqp.commands.Connection.CloseOk)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
