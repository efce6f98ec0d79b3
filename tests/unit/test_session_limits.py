"""What a process says as it starts when the servers let it open fewer sessions than its
pools may: each limit once, with what raises it."""

from __future__ import annotations

from financing.adapters.postgres.connection import SessionLimits, too_few_sessions


def limits(
    role: str = "svc",
    *,
    role_limit: int | None = None,
    database_limit: int | None = None,
    server_limit: int | None = 97,
    database: str = "db",
) -> SessionLimits:
    return SessionLimits(role, database, role_limit, database_limit, server_limit)


def test_a_roles_sessions_are_counted_over_its_pools_on_one_server_only() -> None:
    both = [("pg:5432", limits(role_limit=20), 12), ("pg:5432", limits(role_limit=20), 10)]
    [said] = too_few_sessions(both)  # one limit of one role: said once
    assert said.startswith("the role svc may open 20 session(s) on the server, and this process")
    assert "opens up to 22 as svc" in said
    apart = [("a:5432", limits(role_limit=20), 12), ("b:5432", limits(role_limit=20), 10)]
    assert too_few_sessions(apart) == []


def test_a_superusers_pools_and_roomy_limits_are_said_nothing_of() -> None:
    superuser = SessionLimits("postgres", "db", None, None, None)
    assert too_few_sessions([("pg:5432", superuser, 500)]) == []
    assert too_few_sessions([("pg:5432", limits(role_limit=22, database_limit=12), 12)]) == []


def test_the_servers_and_the_databases_limits_are_said_too() -> None:
    [server, database] = too_few_sessions(
        [("pg:5432", limits(server_limit=8, database_limit=5), 12)]
    )
    assert server.startswith("the server takes 8 session(s) of roles that are not superusers")
    assert database.startswith("the database db takes 5 session(s), and this process alone")
