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
