"""The gRPC ports' TLS files, read again when they change (looked at every RELOAD_EVERY
seconds), as a certificate renewed in place or a mounted secret updated changes them:
the connections made after that are served with the new certificate, key and client
CA, those open keep theirs. Files that cannot be used (a key that is not the
certificate's, one written before the other) leave the previous ones in use, said once
for each state of the files, and are tried again at every look until they can be.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import Any

from financing import metrics
from financing.config import GrpcTls
from financing.entrypoints.grpc.tls import UnusableFiles, server_context
from financing.logging import get_logger

log = get_logger(__name__)

# Seconds between two looks at the files.
RELOAD_EVERY = 10.0


class ServerTls:
    """The TLS both gRPC servers listen with, its files read again when they change."""

    def __init__(self, tls: GrpcTls) -> None:
        """Raises UnusableFiles for files that cannot be used."""
        self._tls = tls
        self._seen = self._state()
        self._refused: tuple[object, ...] | None = None  # the state last said unusable
        self._current = server_context(tls)
        # The context listened with; each handshake is switched to the newest one.
        self.listening = self._current
        self.listening.sni_callback = self._newest

    def _newest(self, connection: ssl.SSLObject, server_name: str | None, _: Any) -> None:
        # Called for every handshake, whether or not the client names a server.
        if connection.context is not self._current:
            connection.context = self._current

    async def watch(self, every: float = RELOAD_EVERY) -> None:
        """Until cancelled: the files read again whenever they changed."""
        while True:
            await asyncio.sleep(every)  # the period
            self.reload()

    def reload(self) -> bool:
        """Whether the files changed and were taken; a change that cannot be used is
        said once for each state of the files."""
        state = self._state()
        if state == self._seen:
            return False
        try:
            context = server_context(self._tls)
        except UnusableFiles as error:
            # Tried again at every look: what stood in the way may pass (a file half
            # written, descriptors all taken for a moment) without the files changing.
            if state != self._refused:
                self._refused = state
                metrics.GRPC_TLS_RELOADS.labels("refused").inc()
                log.warning(
                    "the gRPC TLS files changed and cannot be used: connections are still"
                    " served with the previous ones",
                    error=str(error),
                )
            return False
        self._seen, self._refused = state, None
        self._current = context
        metrics.GRPC_TLS_RELOADS.labels("loaded").inc()
        log.info("the gRPC TLS files changed: new connections are served with them")
        return True

    def _state(self) -> tuple[object, ...]:
        """What tells a change of the files: each one's identity, size and time of change
        (through a symbolic link: a mounted secret is updated by swapping one)."""
        paths = (self._tls.cert_file, self._tls.key_file, self._tls.client_ca_file)
        return tuple(_file_state(path) for path in paths if path is not None)


def _file_state(path: str) -> object:
    try:
        found = os.stat(path)
    except OSError as error:
        return error.errno
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)
