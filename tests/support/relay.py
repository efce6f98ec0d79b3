"""A TCP relay between the service and a server, which a test can fail as a network would.

- `cut()`: every relayed connection drops, and new ones are accepted but never
  answered (a partition whose far side is gone);
- `silence()`: nothing goes through any more, in either direction, yet every
  connection stays open and new ones are accepted (a server that stops
  answering: frozen, or behind a partition that drops packets); `restore()`
  lets the held bytes through and relays again.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress


class Relay:
    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._server: asyncio.Server | None = None
        self._cut = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._sockets: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()

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
        for writer in list(self._sockets):
            writer.close()
        for pipe in list(self._pipes):
            pipe.cancel()

    def silence(self) -> None:
        """Hold every byte from now on, both ways, keeping every connection open."""
        self._flowing.clear()

    def restore(self) -> None:
        """Let what was held through, and relay again."""
        self._flowing.set()

    async def close(self) -> None:
        self.restore()
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
            await self._flowing.wait()  # a silenced server does not even accept
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
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
        except asyncio.CancelledError:
            # Closed, or the loop is shutting down: end quietly, for asyncio (3.11) reports
            # a connection handler that ends cancelled as an unhandled exception.
            pass
        finally:
            writer.close()
            self._sockets.discard(writer)

    async def _pipe(self, source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError, OSError):
            while data := await source.read(65536):
                await self._flowing.wait()
                target.write(data)
                await target.drain()
