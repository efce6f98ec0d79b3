"""Every command runs on the service's event loop, and ends with the exit code it returned
however the loop's closing goes (`commands.on_the_loop`)."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from financing.entrypoints.cli.commands import on_the_loop


def test_a_loop_that_cannot_be_closed_in_order_leaves_the_exit_code_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a probe): with the process's descriptors all taken as the service
    stopped, uvloop could not make the socket pair it closes with: a traceback and exit
    1 after the last line had said exit code 0."""

    def failing(self: asyncio.Runner) -> None:
        raise OSError(24, "Too many open files")

    async def main() -> int:
        return 3

    monkeypatch.setattr(asyncio.Runner, "close", failing)
    with capture_logs() as logs:
        assert on_the_loop(main()) == 3
    assert [line["event"] for line in logs] == ["the event loop could not be closed in order"]


def test_a_command_runs_on_the_services_loop() -> None:
    async def main() -> int:
        return 0 if type(asyncio.get_running_loop()).__module__.startswith("financing") else 1

    assert on_the_loop(main()) == 0
