"""The gRPC ports' TLS files, read again when they change (looked at every RELOAD_EVERY
seconds), as a certificate renewed in place or a mounted secret updated changes them:
the connections made after that are served with the new certificate, key and client
CA, those open keep theirs, unless the client CAs changed: then those open are told to
connect again (`when_trust_changes`). Files that cannot be used (a key that is not the
certificate's, one written before the other) leave the previous ones in use, said once
for each state of the files, and are tried again at every look until they can be.
The certificate's expiry is exported (`financing_grpc_tls_certificate_expiry_timestamp_seconds`)
and said: once when it comes within EXPIRY_SAID_WITHIN, once when it has passed.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime

from financing import metrics
from financing.config import GrpcTls
from financing.entrypoints.grpc.tls import server_context
from financing.logging import get_logger
from financing.tls_files import UnusableFiles, certificate_expiry

log = get_logger(__name__)

# Seconds between two looks at the files.
RELOAD_EVERY = 10.0
# How long before the certificate expires a warning says so (seconds): renewal by
# cert-manager or ACME clients happens a month before, so one that has not is stuck.
EXPIRY_SAID_WITHIN = 14 * 86400.0


class ServerTls:
    """The TLS both gRPC servers listen with, its files read again when they change."""

    def __init__(self, tls: GrpcTls) -> None:
        """Raises UnusableFiles for files that cannot be used."""
        self._tls = tls
        self._seen = self._state()
        self._refused: tuple[object, ...] | None = None  # the state last said unusable
        self._current = server_context(tls)
        self._trusted = _contents(tls.client_ca_file)  # the client CAs read last
        self._on_trust_change: list[Callable[[], None]] = []
        # When the certificate served expires (Unix time), and what was said of it.
        self._expires: float | None = None
        self._said_expiry: str | None = None
        self._loaded()

    def current(self) -> ssl.SSLContext:
        """What a new connection is served with: the newest files read. Each connection
        takes it as it comes, TLS's sessions with it: one resumed from the tickets of
        files read before went on being served on them, a client that trusts only a CA
        the files no longer name included (when a handshake switched to the newest
        context, the first context's ticket keys still served every resumption)."""
        return self._current

    def when_trust_changes(self, renew: Callable[[], None]) -> None:
        """`renew()` once new client CAs are read: a connection opened before keeps the
        trust it was opened with for as long as its client keeps it, and gRPC clients
        keep theirs for good (a CA removed to cut its clients off left them connected)."""
        self._on_trust_change.append(renew)

    async def watch(self, every: float = RELOAD_EVERY) -> None:
        """Until cancelled: the files read again whenever they changed."""
        while True:
            await asyncio.sleep(every)  # the period
            if not self.reload():
                self.look_at_expiry()

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
        self._loaded()
        trusted = _contents(self._tls.client_ca_file)
        if trusted != self._trusted:
            self._trusted = trusted
            for renew in self._on_trust_change:
                renew()
        return True

    def _loaded(self) -> None:
        self._expires = certificate_expiry(self._tls.cert_file)
        self._said_expiry = None
        if self._expires is not None:
            metrics.GRPC_TLS_CERTIFICATE_EXPIRY.labels(self._tls.cert_file).set(self._expires)
        self.look_at_expiry()

    def look_at_expiry(self, now: float | None = None) -> None:
        """Say once that the certificate served expires within EXPIRY_SAID_WITHIN, and
        once that it has expired (`now`: Unix time, the clock's unless given)."""
        if self._expires is None:
            return
        left = self._expires - (time.time() if now is None else now)
        said = "expired" if left <= 0 else "soon" if left <= EXPIRY_SAID_WITHIN else None
        if said == self._said_expiry:
            return
        self._said_expiry = said
        expires_at = datetime.fromtimestamp(self._expires, UTC).isoformat()
        if said == "expired":
            log.warning(
                "the gRPC TLS certificate has expired: clients that check it refuse to"
                " connect until GRPC_TLS_CERT_FILE holds a renewed one",
                expired_at=expires_at,
            )
        elif said == "soon":
            log.warning(
                "the gRPC TLS certificate expires soon: renew GRPC_TLS_CERT_FILE",
                expires_at=expires_at,
                days_left=round(left / 86400, 1),
            )

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


def _contents(path: str | None) -> bytes | None:
    """What the file at `path` holds (None: no file named, or none to read)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return None
