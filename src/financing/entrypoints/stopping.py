"""The signals that stop a process of the service, whichever command it runs.

A terminal's Ctrl-C, a supervisor's stop, and the hang-up of the terminal or session
it was started from (by default it killed the process on the spot: no drain, every
call in flight cut, a rebuild's schema left behind), unless the process was started to
ignore it (`nohup`): then it still ignores it. Imports nothing but `signal`: the
command line asks for them before anything else is imported.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_signals() -> tuple[signal.Signals, ...]:
    """STOP_SIGNALS, but SIGHUP where the process ignores it."""
    return tuple(
        sig
        for sig in STOP_SIGNALS
        if sig is not signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN
    )


# The stop signals that came before the process's event loop took the signals over.
_EARLY: list[signal.Signals] = []


def remember_early(signum: int, frame: object) -> None:
    """The handler of the stop signals from the process's first line until its event loop
    takes them over: it remembers the signal, which the loop then acts on
    (`early_signal`), and interrupts nothing. Raised inside whatever code ran, a signal
    that came while the import system ran a callback of its own was lost (the command
    went on), and one that came between its opening and reading of a file left the
    file open (a ResourceWarning, no JSON)."""
    _EARLY.append(signal.Signals(signum))


def early_signal() -> signal.Signals | None:
    """The first stop signal `remember_early` remembered, if any (said once)."""
    if not _EARLY:
        return None
    first = _EARLY[0]
    _EARLY.clear()
    return first
