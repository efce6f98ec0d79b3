"""The relayer lock's own connection is never left open behind a failed or cancelled acquire."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from financing.adapters.postgres import outbox
from financing.application.errors import Unavailable


class SettingConnection:
    """A fresh connection whose first statement (the session's idle timeout) hangs or fails."""

    def __init__(self, hangs: bool, setting: asyncio.Event) -> None:
        self.hangs = hangs
        self.terminated = False
        self.setting = setting

    def get_server_version(self) -> tuple[int, int]:
        return (15, 0)

    async def execute(self, *_: Any) -> None:
        self.setting.set()
        if self.hangs:
            await asyncio.Event().wait()
        raise ConnectionResetError("reset while setting the session's idle timeout")

    def is_closed(self) -> bool:
        return self.terminated

    def terminate(self) -> None:
        self.terminated = True

    def add_termination_listener(self, _: Any) -> None:
        pass


@pytest.mark.parametrize("hangs", [True, False], ids=["cancelled", "failed"])
async def test_a_connection_lost_while_being_set_up_is_terminated(
    monkeypatch: pytest.MonkeyPatch, hangs: bool
) -> None:
    """Regression: the connection was made the lock's only after its idle timeout was set,
    so an acquire cancelled or failed in between left it open until garbage collection."""
    made: list[SettingConnection] = []
    setting = asyncio.Event()

    async def connect(*_: Any, **__: Any) -> SettingConnection:
        made.append(SettingConnection(hangs, setting))
        return made[-1]

    monkeypatch.setattr(outbox, "connect", connect)
    lock = outbox.PostgresRelayerLock(db=None)  # type: ignore[arg-type]
    acquiring = asyncio.create_task(lock.acquire())
    if hangs:
        await asyncio.wait_for(setting.wait(), 5)
        acquiring.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acquiring
    else:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(acquiring, 5)
    assert made and all(conn.terminated for conn in made)
