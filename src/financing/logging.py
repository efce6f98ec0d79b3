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
otherwise.
"""

from __future__ import annotations

import logging
import sys
import types

import structlog

# Libraries whose records repeat what the service's outage log already says.
DEMOTED_LIBRARIES = ("aio_pika", "aiormq", "asyncpg")

_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(level: str = "INFO") -> None:
    threshold = getattr(logging, level)
    renderer: structlog.typing.Processor
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )

    handler = logging.StreamHandler(sys.stderr)
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


class _Demote(logging.Filter):
    """Lowers the records of DEMOTED_LIBRARIES to DEBUG, and applies the service's level."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self._threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in DEMOTED_LIBRARIES:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self._threshold


def _log_uncaught(
    kind: type[BaseException], error: BaseException, trace: types.TracebackType | None
) -> None:
    get_logger("financing").critical("uncaught exception", exc_info=(kind, error, trace))


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
