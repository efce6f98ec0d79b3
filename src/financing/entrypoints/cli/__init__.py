"""The `financing` command line: `commands` parses it; one module per command that inspects
or repairs a deployment.

`main` stops the process cleanly on SIGTERM, SIGINT or SIGHUP from its first line on, while
the command's modules are imported and before the command's own handling of the
signals (the service's, an operator command's) takes over; so this module imports
nothing else before it is called.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from financing.entrypoints.bootstrap import Overrides

# The commands whose second word names the command (`financing projections rebuild`).
COMMAND_GROUPS = ("projections", "relay", "dead-letters", "broker")


def main(argv: Sequence[str] | None = None, *, overrides: Overrides | None = None) -> None:
    """Run `financing ARGS`. Every command's module is imported only now, so that importing
    one of them (the container's health probe) stays light."""
    _standard_streams_open()
    _any_text_written()
    with _stopped_by_signals_until_handled(argv):
        from financing.entrypoints.cli.commands import run
        from financing.entrypoints.stopping import early_signal

        if (signum := early_signal()) is not None:  # while the modules were imported
            _stopped_while_starting(argv, signum)
        run(argv, overrides=overrides)


def _standard_streams_open() -> None:
    """Descriptors 0, 1 and 2 open, on /dev/null where the process was started without
    one (`financing serve >&-`), and `sys`'s streams on them. Started with stdout closed,
    the first socket took descriptor 1, and the event loop's library aborted the process
    (SIGABRT) when it closed it; started with stderr closed, there was no `sys.stderr` to
    log to, and every command exited 1 at once without a word."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest descriptor free: this one
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 - kept for the process


def _any_text_written() -> None:
    """What the output's encoding cannot carry written escaped (`\\u00e9`), not raised:
    where the locale is C or POSIX, or PYTHONIOENCODING asks for ASCII or Latin-1, a
    dead letter's reason beyond ASCII stopped `dead-letters list` after its first row
    (exit 1, a traceback), and an issuer's name `tail` at the first such event."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


@contextmanager
def _stopped_by_signals_until_handled(argv: Sequence[str] | None) -> Iterator[None]:
    """A SIGTERM, SIGINT or SIGHUP in the half second the command's modules take to import, or
    before the command hands the signals to its event loop (which replaces this
    handler and acts on the signal remembered), stops the process as one does once it
    runs: `serve` says "stopped while starting" and exits 0, another command exits 128 +
    the signal; never Python's traceback, nor a death by the signal without a word."""
    from financing.entrypoints.stopping import remember_early, stop_signals

    previous = {sig: signal.signal(sig, remember_early) for sig in stop_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # Called with `argv` by a program of its own (not as the process's command
            # line), the signals are left as they were found: once a command's work is
            # done it ignores them until the process exits (`cancelled_by_signals`).
            if argv is not None or signal.getsignal(sig) is remember_early:
                signal.signal(sig, handler)


def _stopped_while_starting(argv: Sequence[str] | None, signum: int) -> None:
    """`serve` logs one JSON line and exits 0, as for a signal later in its start-up; an
    operator's command says what it says when stopped later, and exits as it does then."""
    from financing.logging import Lines  # the modules are imported by now

    # Written as the log writes, never waiting for its reader (a pipe full: dropped).
    said = Lines(sys.stderr).msg
    args = list(sys.argv[1:] if argv is None else argv)
    name = signal.Signals(signum).name
    if args[:1] != ["serve"]:
        words = args[: 2 if args[:1] and args[0] in COMMAND_GROUPS else 1]
        command = " ".join(word for word in words if not word.startswith("-"))
        if command == "tail":  # which runs until stopped
            sys.exit(0)
        said(f"financing {command}: stopped by {name}".replace(" :", ":"))
        sys.exit(128 + signum)
    import json
    from datetime import UTC, datetime

    line = {
        "event": "stopped while starting",
        "signal": name,
        "level": "info",
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    said(json.dumps(line))
    sys.exit(0)


__all__ = ["main"]
