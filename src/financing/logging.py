"""Structured logging: one JSON object per line when not on a terminal, readable on one.

The service's own lines and the standard-library records of its libraries
(aio-pika, aiormq, asyncpg, grpclib, asyncio) go through the same structlog
processors, so every line has the same shape; a traceback is the `exception`
field of its line, never lines of its own. An uncaught exception is logged the
same way before the process exits.

The transport libraries log a connection's loss and their reconnection
attempts at WARNING and ERROR, many lines per outage. The service logs each
outage itself, once when it starts and once when it is over (`retry.Outages`),
so their records are demoted to DEBUG: visible with LOGGER_LEVEL=DEBUG, quiet
otherwise. So are grpclib's INFO records, each about what one caller did (a call
it cancelled, or whose deadline passed): thousands a minute from impatient
clients, counted in `grpc_server_handled_total` by their status. What the
HTTP/2 and AMQP libraries log below WARNING, a dump of every header and frame
(a caller's credentials included), is never written.

A line that cannot be written (a full disk, a log reader gone) is dropped: the
log never stops the service, nor changes how it exits.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import types
from typing import TextIO

import structlog

# Libraries whose records repeat what the service's outage log already says.
DEMOTED_LIBRARIES = ("aio_pika", "aiormq", "asyncpg")
# Libraries whose records below WARNING dump what crosses the wire, frame by frame: every
# header of every gRPC call (a caller's `authorization` included), every AMQP frame and
# every message aio-pika publishes and every entity it declares (message bodies
# included: at DEBUG an idle service wrote 48,000 such lines an hour, and not one of its
# own). Never written, at any level.
WIRE_DUMPS = ("hpack", "h2", "aiormq", "aio_pika")

_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(level: str = "INFO") -> None:
    threshold = getattr(logging, level)
    lines = Lines(sys.stderr)
    renderer: structlog.typing.Processor
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=lambda *_: lines,
        cache_logger_on_first_use=True,
    )

    handler = _LineHandler(lines)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    handler.addFilter(_Demote(threshold))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


class Lines:
    """Where every line of the log goes: written whole, straight to the file's descriptor
    when it has one (nothing is left in a buffer to fail again at exit), or dropped when
    it cannot be written. structlog's logger interface: each level is `msg`.

    A line the descriptor took only in part (a non-blocking pipe whose reader fell
    behind) is finished before the next one is begun: left as it was, the next line
    was written on after the fragment, and the two made one line that was no JSON."""

    def __init__(self, file: TextIO) -> None:
        # Its buffer's raw file, or its buffer itself where that is the raw file (Python
        # run unbuffered, PYTHONUNBUFFERED=1, as the image runs it).
        buffer = getattr(file, "buffer", None)
        raw = buffer if isinstance(buffer, io.FileIO) else getattr(buffer, "raw", None)
        self._raw = raw if isinstance(raw, io.FileIO) else None
        self._file = file
        self._encoding = getattr(file, "encoding", None) or "utf-8"
        self._rest = b""  # what is still to be written of a line begun

    def msg(self, message: str) -> None:
        line = message + "\n"
        if self._raw is None:
            with contextlib.suppress(OSError, ValueError):  # ValueError: the file was closed
                self._file.write(line)
                self._file.flush()
            return
        pending = self._rest + line.encode(self._encoding, "backslashreplace")
        written = _written(self._raw, pending)
        if written >= len(self._rest):
            # The line begun before is whole; this one is whole, begun, or dropped whole.
            self._rest = pending[written:] if written > len(self._rest) else b""
        else:
            self._rest = self._rest[written:]  # this line dropped whole; the other waits

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _written(raw: io.FileIO, data: bytes) -> int:
    """How much of `data` the descriptor takes now (0 when it takes nothing)."""
    view = memoryview(data)
    done = 0
    with contextlib.suppress(OSError, ValueError):  # ValueError: the file was closed
        while done < len(data):
            written = raw.write(view[done:])
            if not written:  # a descriptor that takes nothing now
                break
            done += written
    return done


class _LineHandler(logging.Handler):
    """Standard-library records, formatted, written as the service's own lines."""

    def __init__(self, lines: Lines) -> None:
        super().__init__()
        self._lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._lines.msg(line)


class _Demote(logging.Filter):
    """Drops the wire dumps of WIRE_DUMPS; lowers the records of DEMOTED_LIBRARIES, and
    grpclib's INFO ones, to DEBUG; applies the service's level."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self._threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        library = record.name.split(".", 1)[0]
        if library in WIRE_DUMPS and record.levelno < logging.WARNING:
            return False
        callers = library == "grpclib" and record.levelno < logging.WARNING
        if library in DEMOTED_LIBRARIES or callers:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self._threshold


def _log_uncaught(
    kind: type[BaseException], error: BaseException, trace: types.TracebackType | None
) -> None:
    get_logger("financing").critical("uncaught exception", exc_info=(kind, error, trace))


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
