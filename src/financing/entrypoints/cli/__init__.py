"""The `financing` command line: `commands` parses it; one module per command that inspects
or repairs a deployment."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from financing.entrypoints.bootstrap import Overrides


def main(argv: Sequence[str] | None = None, *, overrides: Overrides | None = None) -> None:
    """Run `financing ARGS`. Every command's module is imported only now, so that importing
    one of them (the container's health probe) stays light."""
    with _stopped_by_signals_while_importing(argv):
        from financing.entrypoints.cli.commands import run

    run(argv, overrides=overrides)


class _Signalled(BaseException):
    """A SIGTERM or SIGINT that came while the command's modules were imported."""


@contextlib.contextmanager
def _stopped_by_signals_while_importing(argv: Sequence[str] | None) -> Iterator[None]:
    """A SIGTERM or SIGINT in the half second the command's modules take to import stops
    the process as one does once they run: `serve` says "stopped while starting" and exits
    0, another command exits 128 + the signal; never Python's traceback, nor a death by
    the signal without a word."""

    def signalled(signum: int, frame: FrameType | None) -> None:
        raise _Signalled(signum)

    previous = {sig: signal.signal(sig, signalled) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except _Signalled as stop:
        signum = int(stop.args[0])
        args = list(sys.argv[1:] if argv is None else argv)
        line = {
            "event": "stopped while starting",
            "signal": signal.Signals(signum).name,
            "level": "info",
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        with contextlib.suppress(OSError, ValueError):
            print(json.dumps(line), file=sys.stderr, flush=True)
        sys.exit(0 if args[:1] == ["serve"] else 128 + signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["main"]
