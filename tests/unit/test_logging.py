"""Every line the process writes is one JSON object, library records and tracebacks included."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from prometheus_client import REGISTRY

from financing import logging as service_logging
from financing.logging import Lines
from tests.support.infra import wait_until

SCRIPT = """
import logging, warnings
from financing import logging as service_logging
service_logging.configure({level!r})
service_logging.get_logger("financing.test").info("own line", answer=42)
try:
    raise ValueError("boom")
except ValueError:
    logging.getLogger("grpclib.server").exception("Application error")
logging.getLogger("aiormq.connection").error("Unexpected connection close from remote")
logging.getLogger("asyncpg.pool").warning("Failed to restore the pool connection floor")
logging.getLogger("grpclib.server").info("Request was cancelled: %s", "Connection lost")
logging.getLogger("hpack.hpack").debug("Decoded %s", (b"authorization", b"Bearer SECRET-TOKEN"))
logging.getLogger("h2.connection").debug("Process received frame %s", "HEADERS")
logging.getLogger("aiormq.connection").debug("Sending %r", "Basic.Publish and its body")
logging.getLogger("aio_pika.exchange").debug("Publishing message with routing key %r", "BODY")
logging.getLogger("aio_pika.robust_connection").warning("Connection attempt failed")
warnings.warn("a library's warning")
raise RuntimeError("nobody caught this")
"""


def run(level: str) -> tuple[int, list[dict[str, Any]]]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(level=level)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = []
    for raw in (done.stdout + done.stderr).splitlines():
        line = json.loads(raw)  # fails the test for any line that is not JSON
        assert isinstance(line, dict), raw
        lines.append(line)
    return done.returncode, lines


def test_every_line_is_one_json_object_with_tracebacks_as_a_field() -> None:
    code, lines = run("INFO")
    events = {line["event"]: line for line in lines}
    assert code != 0
    assert events["own line"]["answer"] == 42
    library = events["Application error"]
    assert library["level"] == "error" and library["logger"] == "grpclib.server"
    assert "Traceback" in library["exception"] and "ValueError: boom" in library["exception"]
    assert any("a library's warning" in line["event"] for line in lines)
    uncaught = events["uncaught exception"]
    assert uncaught["level"] == "critical"
    assert "RuntimeError: nobody caught this" in uncaught["exception"]


def test_transport_libraries_connection_chatter_is_demoted_to_debug() -> None:
    _, quiet = run("INFO")
    assert not [
        line
        for line in quiet
        if line.get("logger", "").startswith(("aiormq", "asyncpg", "aio_pika"))
    ]
    _, verbose = run("DEBUG")
    chatter = [
        line
        for line in verbose
        if line.get("logger", "").startswith(("aiormq", "asyncpg", "aio_pika"))
    ]
    assert len(chatter) == 3 and {line["level"] for line in chatter} == {"debug"}, chatter


def test_grpclibs_lines_about_what_one_caller_did_are_debug() -> None:
    """Regression: each call a client cancelled or let expire was an INFO line, 10,000
    in ten minutes of impatient clients; the call's status counts them."""
    _, quiet = run("INFO")
    assert not [line for line in quiet if line["event"].startswith("Request was cancelled")]
    _, verbose = run("DEBUG")
    [cancelled] = [line for line in verbose if line["event"].startswith("Request was cancelled")]
    assert cancelled["level"] == "debug"
    # Its errors keep their level.
    assert [line["level"] for line in quiet if line["event"] == "Application error"] == ["error"]


def test_what_the_wire_libraries_dump_frame_by_frame_is_never_written() -> None:
    """Regression: at DEBUG, hpack wrote every header of every call, a caller's
    `authorization` included, aiormq every AMQP frame, and aio-pika every message it
    published and every entity it declared."""
    for level in ("INFO", "DEBUG"):
        _, lines = run(level)
        text = json.dumps(lines)
        assert "SECRET-TOKEN" not in text
        assert not [line for line in lines if line.get("logger", "").startswith(("hpack", "h2"))]
        assert "Basic.Publish" not in text and "Publishing message" not in text


def drained(reader: int) -> bytes:
    """Whatever the pipe holds now."""
    received = b""
    while True:
        try:
            chunk = os.read(reader, 1 << 16)
        except BlockingIOError:
            return received
        received += chunk


def stream_of(fd: int, *, unbuffered: bool) -> io.TextIOWrapper:
    """A text stream on `fd` as Python makes stderr: over a buffer over the file, or,
    run unbuffered (PYTHONUNBUFFERED=1, as the image runs it), over the file itself."""
    raw = io.FileIO(fd, "w", closefd=False)
    if unbuffered:
        return io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8")


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_a_line_the_log_took_in_part_is_finished_before_the_next_begins(
    unbuffered: bool,
) -> None:
    """Regression: a line a non-blocking pipe took only in part (its reader behind) was
    left as a fragment, and the next line was written on after it: one line, no JSON
    (mended at first only where the stream was buffered, as it is not in the image)."""
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    os.set_blocking(reader, False)
    try:
        with stream_of(writer, unbuffered=unbuffered) as file:
            lines = Lines(file)
            capacity = fcntl.fcntl(writer, fcntl.F_GETPIPE_SZ)  # as the log made it
            big = json.dumps({"event": "tasks", "stacks": "x" * (capacity + capacity // 2)})
            lines.msg(big)  # begun, not finished: the pipe is full
            lines.msg(json.dumps({"event": "dropped while the pipe is full"}))
            received = drained(reader)  # the reader catches up
            lines.msg(json.dumps({"event": "after"}))
            received += drained(reader)
    finally:
        os.close(reader)
        os.close(writer)
    written = [json.loads(line) for line in received.decode().splitlines()]
    assert [line["event"] for line in written] == ["tasks", "after"]


def filled(writer: int) -> None:
    """Fill the pipe of `writer` with whole lines, without changing how `writer` writes."""
    own = os.open(f"/proc/self/fd/{writer}", os.O_WRONLY | os.O_NONBLOCK)
    line = json.dumps({"event": "filler", "padding": "x" * 1000}).encode() + b"\n"
    try:
        for chunk in (line, b"\n"):  # then the last bytes of room, one by one
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(own, chunk)  # at most PIPE_BUF bytes: all or nothing
    finally:
        os.close(own)


def three_lines_without_waiting(lines: Lines) -> None:
    """Log `line 0` to `line 2`; fail if that waits for the log's reader."""
    writing = threading.Thread(
        target=lambda: [lines.msg(json.dumps({"event": f"line {n}"})) for n in range(3)],
        daemon=True,
    )
    writing.start()
    writing.join(timeout=10)
    assert not writing.is_alive(), "a line waited for the pipe's reader"


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_a_log_reader_that_stopped_reading_blocks_nothing_and_the_lines_dropped_are_said(
    unbuffered: bool,
) -> None:
    """Regression (a probe): stderr a pipe as a collector gives it (blocking), its reader
    stopped: the first line that did not fit blocked the process, every gRPC call and
    `/health` with it, and SIGTERM waited for the reader."""
    reader, writer = os.pipe()  # both blocking, as a shell or a container runtime makes it
    resumed: list[int] = []
    try:
        with stream_of(writer, unbuffered=unbuffered) as file:
            lines = Lines(file, on_resumed=resumed.append)
            filled(writer)
            three_lines_without_waiting(lines)
            assert resumed == []
            os.set_blocking(reader, False)
            drained(reader)  # the reader catches up
            lines.msg(json.dumps({"event": "after"}))
            received = drained(reader)
    finally:
        os.close(reader)
        os.close(writer)
    assert [json.loads(line)["event"] for line in received.decode().splitlines()] == ["after"]
    assert resumed == [3]


def test_lines_dropped_are_said_once_the_reader_resumes_without_waiting_for_a_line() -> None:
    """Regression (a probe): the notice of lines dropped came with the next line written
    after the reader resumed, which an idle service at INFO may write hours later."""
    reader, writer = os.pipe()
    resumed: list[int] = []
    try:
        with stream_of(writer, unbuffered=True) as file:
            lines = Lines(file, on_resumed=resumed.append)
            filled(writer)
            three_lines_without_waiting(lines)
            lines.catch_up()  # the reader still stopped: nothing said yet
            assert resumed == []
            os.set_blocking(reader, False)
            drained(reader)  # the reader catches up; no line comes
            lines.catch_up()
    finally:
        os.close(reader)
        os.close(writer)
    assert resumed == [3]


def of_another_user(file: io.TextIOWrapper, monkeypatch: pytest.MonkeyPatch) -> Lines:
    """The log on `file`, a pipe the process may not open again (another user's)."""
    real_open = os.open

    def refused(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith("/proc/self/fd/"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refused)
    try:
        return Lines(file)
    finally:
        monkeypatch.undo()


async def test_a_pipe_of_another_user_is_written_by_a_thread_that_alone_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a probe): started as another user than the one who made its pipe
    (`sudo -u`, `setpriv`, an entrypoint dropping privileges), the service could not open
    the pipe again without blocking (EACCES), wrote it as it was, and froze once its
    reader stopped, as before the log stopped waiting."""
    reader, writer = os.pipe()
    try:
        with stream_of(writer, unbuffered=True) as file:
            lines = of_another_user(file, monkeypatch)
            filled(writer)
            three_lines_without_waiting(lines)
            os.set_blocking(reader, False)
            received = b""

            async def after_the_filler() -> bool:
                nonlocal received
                received += drained(reader)
                return b'"line 2"' in received

            await wait_until(after_the_filler, timeout=10, what="the lines after the filler")
    finally:
        os.close(reader)
        os.close(writer)
    events = [json.loads(line)["event"] for line in received.decode().splitlines() if line.strip()]
    assert events[-3:] == ["line 0", "line 1", "line 2"]


def dropped_so_far() -> float:
    return REGISTRY.get_sample_value("financing_log_lines_dropped_total") or 0.0


async def test_lines_the_writer_thread_could_not_write_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a probe): a pipe of another user whose reader had gone lost every line
    in its writer thread, and the count of dropped lines stayed at 0."""
    reader, writer = os.pipe()
    os.close(reader)  # the reader gone: every write fails with EPIPE
    try:
        with stream_of(writer, unbuffered=True) as file:
            lines = of_another_user(file, monkeypatch)
            before = dropped_so_far()
            three_lines_without_waiting(lines)

            async def counted() -> bool:
                return dropped_so_far() >= before + 3

            await wait_until(counted, timeout=10, what="the three lines counted as dropped")
    finally:
        os.close(writer)


def test_a_notice_of_dropped_lines_dropped_itself_is_said_by_the_next() -> None:
    """Regression (a probe): the notice of k lines dropped, dropped in its turn, left a
    count of 1 for the next notice: the k lines were never said."""
    room = {"bytes": 0}  # what the log takes now, line by line

    def taking(data: memoryview) -> int | None:
        return len(data) if len(data) <= room["bytes"] else None

    said: list[int] = []
    lines = Lines(io.StringIO(), on_resumed=lambda count: notice(count))
    lines._write = taking  # a log whose room the test sets

    def notice(count: int) -> None:
        said.append(count)
        lines.msg(json.dumps({"event": "log lines dropped", "padding": "x" * 8000}))

    for _ in range(3):
        lines.msg(json.dumps({"event": "dropped"}))
    room["bytes"] = 200  # a short line fits, the notice does not
    lines.msg(json.dumps({"event": "short"}))
    room["bytes"] = 10_000
    lines.msg(json.dumps({"event": "short again"}))
    assert said == [3, 4]  # the 3, then the 3 and the notice that said them


def test_a_librarys_record_repeated_is_written_once_an_interval_saying_how_many_were_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a probe): connections failing with MemoryError under an address-space
    limit had asyncio write "Fatal error on transport" 354 times in 20 s, each with its
    traceback."""
    now = [100.0]
    monkeypatch.setattr(service_logging.time, "monotonic", lambda: now[0])
    repeats = service_logging._Repeats()

    def record(transport: int, message: str = "Fatal error on transport") -> logging.LogRecord:
        return logging.LogRecord(
            "asyncio",
            logging.ERROR,
            __file__,
            1,
            f"{message}\nprotocol: <Protocol 0x{transport:x}>",
            None,
            (MemoryError, MemoryError(), None),
        )

    written = [repeats.filter(record(n)) for n in range(100)]
    assert written == [True] + [False] * 99
    assert repeats.filter(record(7, "Unclosed connection"))  # another kind: written
    now[0] += service_logging.REPEATS_INTERVAL
    after = record(1000)
    assert repeats.filter(after)
    assert after.getMessage().endswith("(99 more like it left out)")


def test_the_records_left_out_are_said_once_their_interval_is_over_with_none_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: how many records were left out was said only with the next record of
    their kind, which never comes once the fault that wrote them is over."""
    now = [100.0]
    monkeypatch.setattr(service_logging.time, "monotonic", lambda: now[0])
    repeats = service_logging._Repeats()

    def record(transport: int) -> logging.LogRecord:
        message = f"Fatal error on transport\nprotocol: <Protocol 0x{transport:x}>"
        error = (MemoryError, MemoryError(), None)
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, error)

    assert [repeats.filter(record(n)) for n in range(5)] == [True] + [False] * 4
    assert repeats.overdue() == []  # the interval is not over
    now[0] += service_logging.REPEATS_INTERVAL
    [said] = repeats.overdue()
    assert (said.name, said.levelno) == ("asyncio", logging.ERROR)
    assert said.getMessage() == "Fatal error on transport (4 more like it left out)"
    assert repeats.overdue() == []  # said once
    after = record(99)
    assert repeats.filter(after)  # the next one is written, with nothing more to say
    assert after.getMessage().startswith("Fatal error on transport\n")
    assert "left out" not in after.getMessage()


def test_the_service_log_says_the_records_left_out_when_it_catches_up() -> None:
    script = """
import logging
from financing import logging as service_logging
now = [100.0]
service_logging.time.monotonic = lambda: now[0]
service_logging.configure("INFO")
for n in range(3):
    logging.getLogger("asyncio").error("Unclosed connection %d", n)
now[0] += service_logging.REPEATS_INTERVAL
service_logging.catch_up()
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["logger"], line["event"]) for line in lines] == [
        ("asyncio", "Unclosed connection 0"),
        ("asyncio", "Unclosed connection 2 (2 more like it left out)"),
    ]
