"""The check of a database (its health probe, and what ends its outage) asks for grants and
tables only on a session of its own: behind the service's statements, it does not queue."""

from __future__ import annotations

from typing import Any

import pytest

from financing.entrypoints import bootstrap


@pytest.mark.parametrize("writes", [True, False])
@pytest.mark.parametrize(
    ("probed", "room"),
    [(False, True), (True, False)],
    ids=["the probe behind the service", "no session free after it"],
)
async def test_a_check_behind_the_services_statements_asks_nothing_more(
    monkeypatch: pytest.MonkeyPatch, writes: bool, probed: bool, room: bool
) -> None:
    """Regression (a probe): with the command database 200 ms away each way and the pool's
    every session serving units of work, the probe found the pool answering, then waited
    in its line to read the grants and tables, ran out of time, and the database was
    said down (`/health` 503) while every command was handled."""

    async def behind_the_service(pool: Any, dependency: str) -> bool:
        return probed  # False: the pool's sessions answered the service's statements

    async def queued(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("asked in the pool's line")

    for probe in ("writable", "ping"):
        monkeypatch.setattr(bootstrap, probe, behind_the_service)
    monkeypatch.setattr(bootstrap, "has_room", lambda pool: room)
    monkeypatch.setattr(bootstrap, "require_grants", queued)
    monkeypatch.setattr(bootstrap, "require_tables", queued)

    await bootstrap._answering(object(), "commands", writes=writes)()  # type: ignore[arg-type]
