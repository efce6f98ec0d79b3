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
(a caller's credentials included), is never written. Any other library's
warning or error that repeats is written once in `REPEATS_INTERVAL`, and how
many more came is said once the interval is over.

A line that cannot be written (a full disk, a log reader gone or behind) is
dropped: the log never stops the service, nor changes how it exits. A pipe or a
socket (Docker's, Kubernetes', systemd's log collectors) is written without ever
waiting for its reader: a collector that stopped reading froze the whole process
at its next line, SIGTERM included. The lines dropped are counted
(`financing_log_lines_dropped_total`), and said in one line once the log takes
lines again.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import io
import logging
import os
import re
import select
import socket
import stat
import sys
import threading
import time
import types
from collections.abc import Callable
from functools import partial
from typing import TextIO

import structlog

from financing import metrics

# Libraries whose records repeat what the service's outage log already says.
DEMOTED_LIBRARIES = ("aio_pika", "aiormq", "asyncpg")
# Libraries whose records below WARNING dump what crosses the wire, frame by frame: every
# header of every gRPC call (a caller's `authorization` included), every AMQP frame and
# every message aio-pika publishes and every entity it declares (message bodies
# included: at DEBUG an idle service wrote 48,000 such lines an hour, and not one of its
# own). Never written, at any level.
WIRE_DUMPS = ("hpack", "h2", "aiormq", "aio_pika")

# When the event loop's watch last ran (monotonic), and how long after that the process
# is taken for not running; None while no watch runs.
_WATCH: tuple[float, float] | None = None
_GRAVE = frozenset({"warning", "error", "critical"})


def loop_turned(stalled_after: float) -> None:
    """The event loop's watch ran now, and runs again within `stalled_after` seconds unless
    the process does not run (`_said_stalled`)."""
    global _WATCH
    _WATCH = (time.monotonic(), stalled_after)


def loop_unwatched() -> None:
    global _WATCH
    _WATCH = None


def _said_stalled(
    _: object, __: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """A warning or an error written while the event loop's watch is overdue carries
    `process_stalled_seconds`: a process resumed after a stop (SIGSTOP, a paused VM)
    first runs what its sockets brought, and blamed a dependency for a deadline that ran
    out while it did not run ("the query database answers it slowly") before the watch
    said that the process itself had not run."""
    watch = _WATCH
    if watch is not None and event.get("level") in _GRAVE:
        since = time.monotonic() - watch[0]
        if since >= watch[1]:
            event.setdefault("process_stalled_seconds", round(since, 3))
    return event


_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    _said_stalled,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(level: str = "INFO") -> None:
    threshold = getattr(logging, level)
    global _LINES
    lines = _LINES = Lines(sys.stderr, on_resumed=_said_dropped)
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
    handler.addFilter(repeats := _Repeats())
    global _TELL_REPEATS
    _TELL_REPEATS = partial(_tell, handler, repeats)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught


# What a line write takes now of the bytes given: how many (None or 0: none).
Write = Callable[[memoryview], "int | None"]
# Whether a line write would take a line now.
Room = Callable[[], bool]


class Lines:
    """Where every line of the log goes: written whole, straight to the file's descriptor
    when it has one (nothing is left in a buffer to fail again at exit), without waiting
    for a pipe's or a socket's reader (`_unwaiting`), or dropped when it cannot be
    written. structlog's logger interface: each level is `msg`.

    A line the descriptor took only in part (a pipe whose reader fell behind) is
    finished before the next one is begun: left as it was, the next line was written on
    after the fragment, and the two made one line that was no JSON. `on_resumed` is
    told how many lines were dropped, after the first line written whole since."""

    def __init__(self, file: TextIO, *, on_resumed: Callable[[int], None] | None = None) -> None:
        # Its buffer's raw file, or its buffer itself where that is the raw file (Python
        # run unbuffered, PYTHONUNBUFFERED=1, as the image runs it).
        buffer = getattr(file, "buffer", None)
        raw = buffer if isinstance(buffer, io.FileIO) else getattr(buffer, "raw", None)
        unwaiting = _unwaiting(raw) if isinstance(raw, io.FileIO) else None
        self._write: Write | None = None if unwaiting is None else unwaiting[0]
        self._room: Room | None = None if unwaiting is None else unwaiting[1]
        self._file = file
        self._encoding = getattr(file, "encoding", None) or "utf-8"
        self._rest = b""  # what is still to be written of a line begun
        self._dropped = 0  # lines dropped whole since the last one written whole
        self._on_resumed = on_resumed

    def msg(self, message: str) -> None:
        line = message + "\n"
        if self._write is None:
            with contextlib.suppress(OSError, ValueError):  # ValueError: the file was closed
                self._file.write(line)
                self._file.flush()
            return
        pending = self._rest + line.encode(self._encoding, "backslashreplace")
        written = _written(self._write, pending)
        begun = written > len(self._rest)
        if written >= len(self._rest):
            # The line begun before is whole; this one is whole, begun, or dropped whole.
            self._rest = pending[written:] if begun else b""
        else:
            self._rest = self._rest[written:]  # this line dropped whole; the other waits
        if not begun:
            self._dropped += 1
            metrics.LOG_LINES_DROPPED.inc()
        elif self._dropped and not self._rest:
            dropped, self._dropped = self._dropped, 0
            if self._on_resumed is not None:
                self._on_resumed(dropped)  # a line of its own, through this one
                if self._dropped:  # that line dropped too: said, with it, by the next
                    self._dropped += dropped

    def catch_up(self) -> None:
        """Finish a line begun, and say the lines dropped, where the log takes lines again,
        without waiting for the next line to come: an idle service's may come hours
        after its reader resumed."""
        if self._write is None or self._room is None or not (self._rest or self._dropped):
            return
        if self._rest:
            self._rest = self._rest[_written(self._write, self._rest) :]
        if self._dropped and not self._rest and self._room():
            dropped, self._dropped = self._dropped, 0
            if self._on_resumed is not None:
                self._on_resumed(dropped)
                if self._dropped:  # that line dropped too (the room taken meanwhile)
                    self._dropped += dropped

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


# The service's log, once `configure` made it.
_LINES: Lines | None = None


# Says the library records left out, once their interval is over.
_TELL_REPEATS: Callable[[], None] | None = None


def catch_up() -> None:
    """`Lines.catch_up` of the service's log, and the library records left out said (the
    event loop's watch runs it)."""
    if _LINES is not None:
        _LINES.catch_up()
    if _TELL_REPEATS is not None:
        _TELL_REPEATS()


def _tell(handler: logging.Handler, repeats: _Repeats) -> None:
    for record in repeats.overdue():
        handler.emit(record)  # its filters passed it already, when it was left out


def _takes_a_line(fd: int) -> bool:
    """Whether descriptor `fd` takes a write now (a pipe: PIPE_BUF bytes at least)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        return any(events & select.POLLOUT for _, events in poller.poll(0))
    except OSError:
        return False


def _written(write: Write, data: bytes) -> int:
    """How much of `data` the descriptor takes now (0 when it takes nothing)."""
    view = memoryview(data)
    done = 0
    with contextlib.suppress(OSError, ValueError):  # ValueError: the file was closed
        while done < len(data):
            written = write(view[done:])
            if not written:  # a descriptor that takes nothing now
                break
            done += written
    return done


# What a pipe the log goes to is asked to hold (Linux's most for a process that is not
# privileged, by default): a log collector behind for a moment drops no line.
PIPE_SIZE = 1 << 20


def _unwaiting(raw: io.FileIO) -> tuple[Write, Room]:
    """How to write to `raw`'s descriptor without waiting for its reader. A pipe (or FIFO)
    is opened again, non-blocking, for the service alone: its descriptor, shared with
    whoever started the service (a shell's `2>&1` gives it stdout too), is left as it
    was. A socket is sent to without waiting, call by call. A pipe that cannot be opened
    again (another user's: the service started under `sudo -u`, `setpriv`, an image's
    entrypoint dropping its privileges) and a terminal (`docker run -t`, a stalled ssh
    session) are written by a thread of their own (`_WriterThread`). A file is written to
    as it is. With it, whether it takes a line now."""
    fd = raw.fileno()
    try:
        mode = os.fstat(fd).st_mode
    except OSError:  # closed: every write fails, and is dropped
        return raw.write, lambda: False
    if stat.S_ISFIFO(mode):
        with contextlib.suppress(OSError):  # more than the pipe holds: left as it is
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        if not os.get_blocking(fd):
            return raw.write, partial(_takes_a_line, fd)
        try:
            own = io.FileIO(
                os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC),
                "w",
            )
        except OSError:  # no /proc, another user's pipe, or the reader gone already
            return _WriterThread.of(raw)
        _KEPT.append(own)
        return own.write, partial(_takes_a_line, own.fileno())
    if stat.S_ISSOCK(mode):
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            return raw.write, lambda: True
        _KEPT.append(sock)
        return lambda data: sock.send(data, socket.MSG_DONTWAIT), partial(
            _takes_a_line, sock.fileno()
        )
    if raw.isatty():
        return _WriterThread.of(raw)
    return raw.write, lambda: True


# The descriptors of `_unwaiting`, open for as long as the process logs.
_KEPT: list[io.FileIO | socket.socket] = []


class _WriterThread:
    """Writes to a descriptor that may block, taken whole by a thread that waits for it:
    up to QUEUED bytes wait their turn, and what would go beyond is not taken (dropped).
    At the process's exit what waits is given EXIT_WAIT seconds to be written."""

    QUEUED = 1 << 20
    EXIT_WAIT = 2.0

    def __init__(self, raw: io.FileIO) -> None:
        self._raw = raw
        self._waiting: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._ready = threading.Condition()
        threading.Thread(target=self._write, name="log writer", daemon=True).start()
        atexit.register(self._flushed, self.EXIT_WAIT)

    @classmethod
    def of(cls, raw: io.FileIO) -> tuple[Write, Room]:
        thread = cls(raw)
        return thread, thread.has_room

    def has_room(self) -> bool:
        """Whether a line of a few hundred bytes would be taken now."""
        with self._ready:
            return self._bytes + 4096 <= self.QUEUED

    def __call__(self, data: memoryview) -> int | None:
        with self._ready:
            if self._bytes + len(data) > self.QUEUED:
                return None
            self._waiting.append(bytes(data))
            self._bytes += len(data)
            self._ready.notify()
        return len(data)

    def _write(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._waiting))
                data = self._waiting[0]
            try:
                view = memoryview(data)
                while view:
                    view = view[self._raw.write(view) or 0 :]
            except (OSError, ValueError):  # its reader gone: dropped, as any write failed
                metrics.LOG_LINES_DROPPED.inc()
            with self._ready:
                self._waiting.popleft()
                self._bytes -= len(data)
                self._ready.notify_all()

    def _flushed(self, within: float) -> None:
        with self._ready:
            self._ready.wait_for(lambda: not self._waiting, timeout=within)


def _said_dropped(count: int) -> None:
    get_logger("financing.log").warning(
        "log lines dropped",
        lines=count,
        why="the log took none of them: its reader behind or gone, or its disk full",
    )


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


# How long a library's record is not written again after it was, where only its objects'
# addresses and numbers differ: the next one after says how many were left out.
REPEATS_INTERVAL = 10.0
# An object's repr (`<TCPTransport closed=False ... 0x7f...>`), and numbers: what differs
# between two records of one kind.
_VARYING = re.compile(r"<[^<>]*>|0x[0-9a-fA-F]+|\d+")


class _Repeats(logging.Filter):
    """Writes a library's record once an interval where it repeats: asyncio wrote "Fatal
    error on transport" 354 times in 20 s for connections failing with MemoryError under
    an address-space limit, each with its traceback. Records told apart by their logger,
    level, exception type and first line, objects and numbers aside. How many were left
    out is said once the interval is over (`overdue`), whether another comes or not."""

    def __init__(self) -> None:
        super().__init__()
        # Of each kind: when one was last written, how many were left out since, and the
        # first line of the last one left out.
        self._seen: dict[tuple[str, int, str, str], tuple[float, int, str]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        first = record.getMessage().split("\n", 1)[0]
        kind = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, kind, _VARYING.sub("#", first))
        now = time.monotonic()
        written, left_out, _ = self._seen.get(key, (-REPEATS_INTERVAL, 0, ""))
        if now - written < REPEATS_INTERVAL:
            self._seen[key] = (written, left_out + 1, first)
            return False
        if len(self._seen) > 1000:  # kinds of records seen long ago, and said, forgotten
            self._seen = {
                k: v for k, v in self._seen.items() if v[1] or now - v[0] < REPEATS_INTERVAL
            }
        self._seen[key] = (now, 0, first)
        if left_out:  # not said yet (`overdue` not run since the interval ended)
            record.msg = f"{record.getMessage()} ({left_out} more like it left out)"
            record.args = ()
        return True

    def overdue(self) -> list[logging.LogRecord]:
        """A record for each kind whose interval is over with records left out, saying how
        many: without it, the count waited for the next record of its kind, which may
        never come once the fault that wrote them is over."""
        now = time.monotonic()
        said: list[logging.LogRecord] = []
        for key, (written, left_out, first) in list(self._seen.items()):
            if left_out and now - written >= REPEATS_INTERVAL:
                self._seen[key] = (written, 0, first)
                name, level = key[0], key[1]
                message = f"{first} ({left_out} more like it left out)"
                said.append(logging.LogRecord(name, level, __file__, 0, message, None, None))
        return said


def _log_uncaught(
    kind: type[BaseException], error: BaseException, trace: types.TracebackType | None
) -> None:
    get_logger("financing").critical("uncaught exception", exc_info=(kind, error, trace))


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
