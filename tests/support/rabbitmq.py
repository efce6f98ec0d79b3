"""Broker-side helpers for tests: private vhosts, queue inspection, raw publishing."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import ChannelNotFoundEntity

from tests.support import infra


@dataclass(frozen=True)
class Vhost:
    name: str
    url: str


@asynccontextmanager
async def private_vhost(prefix: str = "fin_rmq") -> AsyncIterator[Vhost]:
    """A vhost of one's own: for tests that inspect or disturb the whole vhost."""
    name = infra.unique_name(prefix)
    url = await asyncio.to_thread(infra.create_vhost, name)
    try:
        yield Vhost(name, url)
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


async def publish_raw(
    connection: AbstractConnection,
    queue: str,
    body: bytes,
    headers: Mapping[str, Any],
    *,
    message_id: str | None = None,
) -> None:
    """Publish exactly these headers (of any AMQP type) to `queue`, confirmed."""
    channel = await connection.channel()
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                headers=dict(headers),
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
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


async def grant_permissions(vhost: str) -> None:
    """Give guest every permission on `vhost` (again)."""
    await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
        timeout=60,
    )


async def queue_settled(vhost: str, queue: str) -> bool:
    """Whether `queue` holds no message, neither ready nor delivered and unacked."""
    row = (await list_queues(vhost)).get(queue)
    return row is not None and row["messages_ready"] == 0 and row["messages_unacknowledged"] == 0


class BrokerProxy:
    """A TCP relay to the broker that a test can cut, as a network partition would:
    the connections through it drop, and new ones are accepted but never answered."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._cut = False
        self._sockets: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)

    def url(self, vhost: str) -> str:
        assert self._server is not None, "start() first"
        port = self._server.sockets[0].getsockname()[1]
        return f"amqp://guest:guest@127.0.0.1:{port}/{vhost}"

    @property
    def connections(self) -> int:
        """Client connections open through it (answered or, once cut, left hanging)."""
        return len(self._sockets)

    async def cut(self) -> None:
        """Drop every relayed connection; from now on connections hang unanswered."""
        self._cut = True
        for writer in list(self._sockets):
            writer.close()
        for pipe in list(self._pipes):
            pipe.cancel()

    async def close(self) -> None:
        await self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._sockets.add(writer)
        try:
            if self._cut:
                while await reader.read(65536):
                    pass  # swallowed: the client waits for an answer that never comes
                return
            up_reader, up_writer = await asyncio.open_connection(infra.AMQP_HOST, infra.AMQP_PORT)
            self._sockets.add(up_writer)
            pipes = [
                asyncio.create_task(self._pipe(reader, up_writer)),
                asyncio.create_task(self._pipe(up_reader, writer)),
            ]
            self._pipes.update(pipes)
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for pipe in pipes:
                pipe.cancel()
                self._pipes.discard(pipe)
            up_writer.close()
            self._sockets.discard(up_writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._sockets.discard(writer)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError, OSError):
            while data := await source.read(65536):
                target.write(data)
                await target.drain()
