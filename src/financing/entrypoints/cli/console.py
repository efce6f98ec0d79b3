"""What the operator's commands share: database sessions named after the command, and
one way of printing tables (times: `financing.application.moments`)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import replace

import asyncpg

from financing.adapters.postgres.connection import close_pool, create_pool, translated
from financing.adapters.postgres.schema import (
    SchemaBehind,
    migrate,
    require_current,
    require_grants,
    require_tables,
)
from financing.config import Database, Variable
from financing.entrypoints.stopping import early_signal, stop_signals

# What a statement of a command that scans whole tables may take at least: a replay's
# or a check's reads, a rebuild's swap, on a large store.
SCAN_TIMEOUT = 600.0


@contextmanager
def cancelled_by_signals(task: asyncio.Task[int]) -> Iterator[list[signal.Signals]]:
    """Cancel `task` on a stop signal (`stopping`); the list holds the signal that did it. A
    second signal, while what the task started is being undone, ends the process at
    once (exit 128 + the signal), as a second Ctrl-C does. Once `task` is done, a stop
    signal changes nothing until the process exits."""
    loop = asyncio.get_running_loop()
    signalled: list[signal.Signals] = []

    def stop(signum: signal.Signals) -> None:
        if task.done():
            return  # its outcome is decided: what it did stays done
        if signalled:
            with suppress(OSError, ValueError):
                print(f"{signum.name} again: stopping without undoing", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        signalled.append(signum)
        task.cancel()

    stopping_on = stop_signals()
    for signum in stopping_on:
        loop.add_signal_handler(signum, stop, signum)
    if (early := early_signal()) is not None:  # before these handlers took the signals
        stop(early)
    try:
        yield signalled
    finally:
        for signum in stopping_on:
            loop.remove_signal_handler(signum)
            # The outcome is decided, and said: by its default action a signal from now
            # to the exit ended the process without a word, exit 143, a rebuild's swap
            # committed and its line printed (130 and 143 say "undone").
            signal.signal(signum, signal.SIG_IGN)


@asynccontextmanager
async def database(
    db: Database,
    dependency: str,
    command: str,
    *,
    scans: bool = False,
    schema: str | None = None,
    migrates: bool = False,
    writes: bool = False,
) -> AsyncIterator[asyncpg.Pool]:
    """A pool whose sessions say which command opened them (pg_stat_activity). A command
    that `scans` whole tables gives each statement SCAN_TIMEOUT (or the service's answer
    timeout, FINANCING_DB_TIMEOUT, if longer), on the server too, whatever
    `statement_timeout` the database or the role has; the answer timeout still bounds
    connecting. With
    `schema`, a database whose schema is not this release's is refused (one line); a
    command that `migrates` migrates an older one first, as `serve` does (the commands
    that bring a database restored from an older backup back in line run before any
    instance starts), and refuses none all the same. A command that judges what the
    service's writes need (`status`, `writes`) has every privilege it lacks named in
    one line: the reads' alone were named first, the writes' once they were granted."""
    if scans:
        # The server's `statement_timeout` too: one a DBA set on the database or the role
        # (20 ms, 30 s) failed `check` on a large store, said "unavailable".
        given = db.connect_kwargs.get("server_settings", {})
        scan_ms = str(round(max(db.answer_timeout, SCAN_TIMEOUT) * 1000))
        db = replace(
            db,
            connect_kwargs={
                "timeout": db.answer_timeout,
                **db.connect_kwargs,
                "server_settings": {**given, "statement_timeout": scan_ms},
            },
            answer_timeout=max(db.answer_timeout, SCAN_TIMEOUT),
        )
    pool = await create_pool(db, dependency, application_name=f"financing {command}")
    try:
        if schema is not None:
            with translated(dependency):
                # What is out of the role's reach first, which nothing after can look at
                # (a schema it may not use: its migrations' record refused, the
                # database was said unreachable).
                await require_grants(pool, schema, writes=writes)
                try:
                    await require_current(pool, schema)
                except SchemaBehind as behind:
                    if not (migrates and behind.older):
                        raise
                    await migrate(pool, schema)
                # Its tables gone (a query database a refused rebuild migrated from
                # nothing, the read models dropped) said so, with what brings them back:
                # `check` said an UndefinedTableError and blamed the search_path.
                await require_tables(pool, schema)
        yield pool
    finally:
        await close_pool(pool)


# The most characters one write to stdout holds: within the stream's buffer (8 KiB)
# however each is encoded (`\U0001f600`, 10 bytes, where the output's encoding cannot
# carry it). A write larger than the buffer goes to the file at once, and one a signal
# interrupted part way lost the rest without a word (CPython 3.11): `events` of 576 KB
# into a pipe read slowly, then Ctrl-C, printed 64 KB, its last line cut, exit 0.
WRITTEN_AT_ONCE = 512


class OutputFailed(Exception):
    """Stdout could not be written (a full disk, an I/O error; not a reader gone, which
    is a BrokenPipeError): the command ends saying so, not on a traceback."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def write_lines(lines: Iterable[str]) -> None:
    """Print `lines` on stdout, a piece at a time (WRITTEN_AT_ONCE)."""
    write = sys.stdout.write
    try:
        for line in lines:
            for start in range(0, len(line), WRITTEN_AT_ONCE):
                write(line[start : start + WRITTEN_AT_ONCE])
            write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as error:
        raise OutputFailed(error) from error


def shown(text: str) -> str:
    """`text` with what a terminal would act on escaped (control characters, line and
    paragraph separators: `\\n`, `\\x1b`, `\\u2028`), so that what a publisher wrote in a
    message can neither forge lines of a command's output nor move the cursor."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def table(headings: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Aligned columns under their headings, two spaces apart; numbers to the right; each
    cell `shown`."""
    cells = [list(headings), *([shown(str(cell)) for cell in row] for row in rows)]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headings))]
    numeric = [
        all(row[c].isdigit() for row in cells[1:]) and len(cells) > 1 for c in range(len(widths))
    ]
    return [
        "  ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric, strict=True)
        ).rstrip()
        for row in cells
    ]


def environment(*variables: Variable) -> str:
    """The --help paragraph naming the environment variables a command reads."""
    listed = list(dict.fromkeys(variables))  # each once, in the order given
    width = max(len(variable.name) for variable in listed)
    lines = [f"  {v.name:<{width}}  {v.meaning} (default: {v.default})" for v in listed]
    return "environment variables read:\n" + "\n".join(lines)
