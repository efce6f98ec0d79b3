"""A TCP relay between the service and a server, which a test can fail as a network would.

- `cut()`: every relayed connection drops, and new ones are accepted but never
  answered (a partition whose far side is gone);
- `silence()`: nothing goes through any more, in either direction, yet every
  connection stays open and new ones are accepted (a server that stops
  answering: frozen, or behind a partition that drops packets); `restore()`
  lets the held bytes through and relays again;
- `strand()`: the connections open now go silent for good, while new ones
  are relayed (a server replaced behind the same address, which never heard
  of the old connections: the client is not told they are dead).
"""

from __future__ import annotations

import asyncio
from contextlib import suppress


class Relay:
    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._server: asyncio.Server | None = None
        self._cut = False
        self._silent = False
        # Per connection: set while its bytes may go through.
        self._flows: set[asyncio.Event] = set()
        self._sockets: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        """Client connections open through it (answered or, once cut, left hanging)."""
        return len(self._sockets)

    async def cut(self) -> None:
        """Drop every relayed connection; from now on connections hang unanswered."""
        self._cut = True
        await self._end_handlers()

    def silence(self) -> None:
        """Hold every byte from now on, both ways, keeping every connection open."""
        self._silent = True
        for flow in self._flows:
            flow.clear()

    def restore(self) -> None:
        """Let what was held through, and relay again."""
        self._silent = False
        for flow in self._flows:
            flow.set()

    def strand(self) -> None:
        """Hold every byte of the connections open now, for good; relay new ones."""
        for flow in self._flows:
            flow.clear()
        self._flows.clear()

    async def close(self) -> None:
        self._cut = True
        if self._server is not None:
            self._server.close()
        await self._end_handlers()
        if self._server is not None:
            await self._server.wait_closed()

    async def _end_handlers(self) -> None:
        handlers = set(self._handlers)
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._sockets.add(writer)
        flow = asyncio.Event()
        pipes: list[asyncio.Task[None]] = []
        up_writer: asyncio.StreamWriter | None = None
        try:
            if self._cut:
                while await reader.read(65536):
                    pass  # swallowed: the client waits for an answer that never comes
                return
            if not self._silent:
                flow.set()
            self._flows.add(flow)
            await flow.wait()  # a silenced server does not even accept
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            self._sockets.add(up_writer)
            pipes = [
                asyncio.create_task(self._pipe(reader, up_writer, flow)),
                asyncio.create_task(self._pipe(up_reader, writer, flow)),
            ]
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # Cut, closed, or the loop is shutting down: end quietly, for asyncio (3.11)
            # reports a connection handler that ends cancelled as an unhandled exception.
            pass
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for socket in (writer, up_writer):
                if socket is not None:
                    socket.close()
                    self._sockets.discard(socket)
            self._flows.discard(flow)
            self._handlers.discard(handler)

    @staticmethod
    async def _pipe(
        source: asyncio.StreamReader, target: asyncio.StreamWriter, flow: asyncio.Event
    ) -> None:
        with suppress(ConnectionError, OSError):
            while data := await source.read(65536):
                await flow.wait()
                target.write(data)
                await target.drain()
