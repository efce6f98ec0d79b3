"""What a process says as it starts when the servers let it open fewer sessions than its
pools may: each limit once, with what raises it; and the sessions each pool is held to."""

from __future__ import annotations

from financing.adapters.postgres.connection import (
    SessionLimits,
    pooled_sessions,
    too_few_sessions,
)


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


def test_pools_share_what_the_sessions_beside_them_leave_of_their_roles_limit() -> None:
    role = limits(role_limit=10)
    # 2 for the relayer beside the first pool; 8 left for pools of 8 and 4.
    assert pooled_sessions([("pg:5432", role, 8, 2), ("pg:5432", role, 4, 0)]) == [5, 2]
    # Another server, another count; a roomy limit holds nothing back.
    assert pooled_sessions([("a:5432", role, 8, 2), ("b:5432", role, 8, 0)]) == [8, 8]
    # At least one each, however little is left.
    assert pooled_sessions([("pg:5432", limits(role_limit=2), 8, 2)]) == [1]


def test_a_databases_limit_holds_its_pool_and_a_superuser_is_held_to_nothing() -> None:
    assert pooled_sessions([("pg:5432", limits(database_limit=5), 8, 2)]) == [3]
    superuser = SessionLimits("postgres", "db", None, None, None)
    assert pooled_sessions([("pg:5432", superuser, 50, 2)]) == [50]
