"""Schema migrations: idempotent, safe when several instances start at once."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from financing.adapters.postgres.connection import connect, create_pool
from financing.adapters.postgres.event_store import LEGACY_CONSUMERS, PostgresEventStore
from financing.adapters.postgres.schema import (
    INDEXES,
    MIGRATION_LOCK,
    NEEDED_TABLES,
    WAITING_SAID_AFTER,
    SchemaAhead,
    SchemaElsewhere,
    apply,
    indexes_lacking,
    migrate,
    missing,
    parse_sections,
    require_current,
    require_indexes,
    require_tables,
    sections,
)
from financing.adapters.rabbitmq import topology
from financing.application import routes
from financing.application.errors import AwaitingOperator, Unavailable
from financing.config import Database, parse_database
from tests.support import infra

EVENT_STORE_TABLES = [
    "event_store_identity",
    "events",
    "processed_messages",
    "relay_checkpoints",
    "snapshots",
]


@pytest.fixture
async def empty_database() -> AsyncIterator[Database]:
    name = infra.unique_name("fin_schema")
    yield await infra.create_database(name)
    await infra.drop_database(name)


async def tables(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
    )
    return [row["tablename"] for row in rows]


async def recorded(conn: asyncpg.Connection) -> list[tuple[str, int]]:
    rows = await conn.fetch("SELECT name, version FROM schema_migrations ORDER BY name, version")
    return [(row["name"], row["version"]) for row in rows]


async def test_migrating_twice_changes_nothing_the_second_time(empty_database: Database) -> None:
    conn = await connect(empty_database)
    try:
        await migrate(conn, "commands")
        await conn.execute(
            "INSERT INTO events (aggregate_type, aggregate_id, version, name, body)"
            " VALUES ('Issuer', gen_random_uuid(), 1, 'IssuerCreatedEvent', '{}')"
        )
        await migrate(conn, "commands")

        assert await tables(conn) == sorted([*EVENT_STORE_TABLES, "schema_migrations"])
        assert await recorded(conn) == [("commands", v) for v, _ in sections("commands")]
        assert await conn.fetchval("SELECT count(*) FROM events") == 1
    finally:
        await conn.close()


async def test_a_migration_is_said_once_with_the_versions_it_moved_between(
    empty_database: Database,
) -> None:
    """Regression (a probe): a fresh database was created and migrated without a word in
    the log; an operator upgrading could not tell whether, when, or how far."""
    newest = sections("commands")[-1][0]
    conn = await connect(empty_database)
    try:
        with capture_logs() as logs:
            await migrate(conn, "commands")
            await migrate(conn, "commands")  # nothing left to do: nothing said
    finally:
        await conn.close()
    said = [entry for entry in logs if entry["event"] == "schema migrated"]
    assert [(e["schema"], e["from_version"], e["to_version"]) for e in said] == [
        ("commands", 0, newest)
    ]
    assert said[0]["log_level"] == "info"


async def test_instances_migrating_at_once_all_succeed_and_apply_it_once(
    empty_database: Database,
) -> None:
    connections = [await connect(empty_database) for _ in range(6)]
    try:
        await asyncio.gather(*(migrate(conn, "commands") for conn in connections))

        assert await tables(connections[0]) == sorted([*EVENT_STORE_TABLES, "schema_migrations"])
        assert await recorded(connections[0]) == [("commands", v) for v, _ in sections("commands")]
    finally:
        for conn in connections:
            await conn.close()


async def test_migrating_through_a_pool_works_like_through_a_connection(
    empty_database: Database,
) -> None:
    pool = await create_pool(empty_database)
    try:
        await asyncio.gather(migrate(pool, "commands"), migrate(pool, "commands"))

        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(
                sections("commands")
            )
    finally:
        await pool.close()


async def test_a_later_section_is_applied_alone_and_earlier_ones_are_not_rerun(
    empty_database: Database,
) -> None:
    first = (1, "CREATE TABLE first_table (id int)")
    second = (2, "CREATE TABLE second_table (id int); CREATE INDEX ON second_table (id)")
    conn = await connect(empty_database)
    try:
        await apply(conn, "demo", [first])
        # Rerunning version 1 would fail: its table exists.
        await apply(conn, "demo", [first, second])

        assert await tables(conn) == ["first_table", "schema_migrations", "second_table"]
        assert await recorded(conn) == [("demo", 1), ("demo", 2)]
    finally:
        await conn.close()


async def test_a_failing_section_leaves_no_trace(empty_database: Database) -> None:
    good = (1, "CREATE TABLE good_table (id int)")
    bad = (2, "CREATE TABLE no_such_schema.bad_table (id int)")
    conn = await connect(empty_database)
    try:
        with pytest.raises(SchemaElsewhere, match="no_such_schema"):
            await apply(conn, "demo", [good, bad])

        assert await conn.fetchval("SELECT to_regclass('good_table')") is None
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await conn.close()


def test_migration_files_are_split_at_version_headers() -> None:
    text = "-- about this file\n\n-- version: 1\nCREATE TABLE a ();\n-- version: 2\nDROP TABLE a;\n"

    assert parse_sections(text, "demo.sql") == [
        (1, "\nCREATE TABLE a ();\n"),
        (2, "\nDROP TABLE a;\n"),
    ]
    assert parse_sections("CREATE TABLE a ();", "demo.sql") == [(1, "CREATE TABLE a ();")]


@pytest.mark.parametrize(
    "text",
    [
        "-- version: 2\nSELECT 1;\n-- version: 1\nSELECT 1;\n",
        "-- version: 1\nSELECT 1;\n-- version: 1\nSELECT 1;\n",
        "CREATE TABLE lost ();\n-- version: 1\nSELECT 1;\n",
    ],
    ids=["decreasing", "repeated", "statement-before-first-header"],
)
def test_malformed_migration_files_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"demo\.sql"):
        parse_sections(text, "demo.sql")


def test_migration_names_cannot_leave_the_sql_folder() -> None:
    with pytest.raises(ValueError, match="invalid migration name"):
        sections("../../config")


def test_the_event_store_schema_ships_with_the_package() -> None:
    versions = [version for version, _ in sections("commands")]

    assert versions[0] == 1
    assert "CREATE TABLE events" in sections("commands")[0][1]


async def consumers(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch("SELECT message_id, consumer FROM processed_messages")
    return {row["message_id"]: row["consumer"] for row in rows}


async def test_version_2_renames_queue_named_consumers_after_their_handlers(
    empty_database: Database,
) -> None:
    # Before version 2 every consumer was recorded under the name of the queue feeding it.
    by_queue = {
        topology.subscription(route.message_name).queue.name: route.consumer
        for route in (*routes.COMMANDS, *routes.POLICIES)
    }
    assert by_queue["events_BidOnInvoicePlacedEvent"] == "bid_placed_offers_bid_to_invoice"
    assert by_queue["SellInvoice"] == "sell_invoice"
    conn = await connect(empty_database)
    try:
        await apply(conn, "commands", sections("commands")[:1])
        old = [(queue, f"message-{n}") for n, queue in enumerate(sorted(by_queue))]
        # Neither an unknown consumer nor one already named after its handler is touched.
        kept = [("someone_else", "message-other"), ("sell_invoice", "message-new")]
        await conn.executemany(
            "INSERT INTO processed_messages (consumer, message_id) VALUES ($1, $2)", old + kept
        )

        await migrate(conn, "commands")

        assert await consumers(conn) == {
            **{message_id: by_queue[queue] for queue, message_id in old},
            **{message_id: consumer for consumer, message_id in kept},
        }
        assert await recorded(conn) == [("commands", v) for v, _ in sections("commands")]
    finally:
        await conn.close()


async def test_a_schema_a_newer_release_migrated_is_refused(empty_database: Database) -> None:
    """Regression: a release started on a database a newer one had migrated (a rollback)
    ran without a word; past a change of how processed messages are recorded, it
    handled again what the newer release had handled, and released a winner's funds."""
    conn = await connect(empty_database)
    try:
        await migrate(conn, "commands")
        newer = sections("commands")[-1][0] + 1
        await conn.execute(
            "INSERT INTO schema_migrations (name, version) VALUES ('commands', $1)", newer
        )

        with pytest.raises(SchemaAhead, match=f"commands schema is at version {newer}, newer"):
            await migrate(conn, "commands")
        with pytest.raises(SchemaAhead):
            await missing(conn, "commands")  # a server that takes no writes: the same
        await migrate(conn, "queries")  # another schema's versions are its own
    finally:
        await conn.close()


async def test_a_message_a_release_before_version_2_handled_is_seen_as_handled(
    empty_database: Database,
) -> None:
    """Regression: a release before version 2, running beside this one in a rolling
    upgrade or started again on its database, records what it handles under the queue's
    name, after the migration renamed the records: its messages were handled again here,
    and a winning bid offered twice was rejected and its funds released."""
    by_queue = {
        topology.subscription(route.message_name).queue.name: route.consumer
        for route in (*routes.COMMANDS, *routes.POLICIES)
    }
    assert {legacy: consumer for consumer, legacy in LEGACY_CONSUMERS.items()} == by_queue
    pool = await create_pool(empty_database)
    try:
        await migrate(pool, "commands")
        await pool.executemany(
            "INSERT INTO processed_messages (consumer, message_id) VALUES ($1, $2)",
            [("events_BidOnInvoicePlacedEvent", "m-old"), ("bid_on_invoice", "m-new")],
        )
        async with PostgresEventStore(pool).unit_of_work() as uow:
            assert await uow.recorded("bid_placed_offers_bid_to_invoice", "m-old")
            assert await uow.recorded("bid_on_invoice", "m-new")
            assert not await uow.recorded("bid_on_invoice", "m-old")  # another consumer's
            assert not await uow.recorded("someone_else", "m-new")
    finally:
        await pool.close()


async def test_a_search_path_that_would_create_the_schema_elsewhere_is_refused(
    empty_database: Database,
) -> None:
    """Regression: a schema made for the service's role (which the default search_path,
    `"$user", public`, puts first) made a restart migrate a new, empty event store there
    and run on it, saying it was healthy, with every event in `public`; a search_path
    naming no schema that exists stopped start-up with an uncaught exception."""
    conn = await connect(empty_database)
    try:
        await migrate(conn, "commands")
        await conn.execute("CREATE SCHEMA newcomer")
        # Another application's record of its own migrations is none of the service's.
        await conn.execute("CREATE TABLE newcomer.schema_migrations (id int)")
        await conn.execute("SET search_path = newcomer, public")

        with pytest.raises(SchemaElsewhere, match="schema 'newcomer', but schema 'public'"):
            await migrate(conn, "commands")
        await conn.execute("SET search_path = nowhere")
        with pytest.raises(SchemaElsewhere, match="names no schema that exists"):
            await migrate(conn, "commands")
        await conn.execute("SET search_path = public, newcomer")
        await migrate(conn, "commands")  # where its tables are: nothing to do
        assert await conn.fetchval("SELECT to_regclass('newcomer.events')") is None
    finally:
        await conn.close()


@pytest.mark.parametrize("isolation", ["serializable", "repeatable read"])
async def test_instances_migrating_at_once_succeed_whatever_isolation_the_database_sets(
    empty_database: Database, isolation: str
) -> None:
    """Regression: under a database's default isolation of REPEATABLE READ or SERIALIZABLE,
    an instance that waited for another's migration lock migrated again from the snapshot
    it took while waiting, and crashed ("relation events already exists")."""
    admin = await connect(empty_database)
    name = empty_database.connect_kwargs["database"]
    await admin.execute(f"ALTER DATABASE {name} SET default_transaction_isolation = '{isolation}'")
    connections = [await connect(empty_database) for _ in range(3)]
    try:
        async with admin.transaction():  # holds the lock while all of them ask for it
            await admin.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            migrating = [asyncio.create_task(migrate(conn, "commands")) for conn in connections]

            async def all_waiting() -> bool:
                waiting = await admin.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                return bool(waiting == len(connections))

            await infra.wait_until(all_waiting, what="every instance waiting for the lock")
        await asyncio.gather(*migrating)
        assert await recorded(admin) == [("commands", v) for v, _ in sections("commands")]
    finally:
        for conn in [admin, *connections]:
            await conn.close()


async def test_another_applications_schema_migrations_is_refused_naming_it(
    empty_database: Database,
) -> None:
    """Regression: golang-migrate's `schema_migrations` (version, dirty) where the service
    looks for its own crashed `serve`, `check` and `status` (UndefinedColumnError)."""
    conn = await connect(empty_database)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version bigint PRIMARY KEY, dirty boolean NOT NULL)"
        )
        with pytest.raises(SchemaElsewhere, match="another application's"):
            await migrate(conn, "commands")
        with pytest.raises(SchemaElsewhere, match="another application's"):
            await missing(conn, "commands")
    finally:
        await conn.close()


# The Go reference service's event store, as its `create_tables.sql` makes it (triggers
# and the pgcrypto default left out): a command database the reference ran on.
REFERENCE_EVENT_STORE = """
CREATE TABLE event_streams (id uuid PRIMARY KEY, type varchar(50) NOT NULL,
    version int NOT NULL, created timestamp DEFAULT current_timestamp, modified timestamp);
CREATE TABLE events (id serial PRIMARY KEY, name varchar(255) NOT NULL, version int NOT NULL,
    event_source_id uuid NOT NULL REFERENCES event_streams (id), data varchar NOT NULL,
    published boolean NOT NULL DEFAULT false, created timestamp DEFAULT current_timestamp,
    modified timestamp);
CREATE TABLE snapshots (event_source_id int NOT NULL, version int NOT NULL,
    data varchar NOT NULL, created timestamp DEFAULT current_timestamp, modified timestamp);
INSERT INTO event_streams (id, type, version)
    VALUES ('6f1c1b9e-64a7-4a39-9d38-5d2a4e4f4a01', 'Issuer', 1);
INSERT INTO events (name, version, event_source_id, data)
    VALUES ('IssuerCreatedEvent', 1, '6f1c1b9e-64a7-4a39-9d38-5d2a4e4f4a01', '{}');
"""


async def test_the_reference_event_store_is_refused_and_a_schema_of_its_own_beside_it_serves(
    empty_database: Database,
) -> None:
    """Regression: a command database the Go reference had run on (its `events` and
    `snapshots` in `public`) crashed every start-up with an uncaught DuplicateTableError.
    It is refused, naming the reference's tables and the remedy; the remedy, a schema of
    the service's own set by the connection string's `options`, leaves them untouched."""
    conn = await connect(empty_database)
    try:
        await conn.execute(REFERENCE_EVENT_STORE)
        with pytest.raises(SchemaElsewhere, match=r"events, snapshots are the Go reference"):
            await migrate(conn, "commands")
        # An operator's command says the same, where it advised starting `serve` on it.
        with pytest.raises(SchemaElsewhere, match=r"events, snapshots are the Go reference"):
            await require_current(conn, "commands")
        assert await tables(conn) == ["event_streams", "events", "snapshots"]
        await conn.execute("CREATE SCHEMA financing")
    finally:
        await conn.close()
    beside = parse_database(
        f"host={infra.PG_HOST} port={infra.PG_PORT} user={infra.PG_USER}"
        f" dbname={empty_database.connect_kwargs['database']} options=-csearch_path=financing"
    )
    conn = await connect(beside)
    try:
        await migrate(conn, "commands")
        rows = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'financing' ORDER BY 1"
        )
        assert [row["tablename"] for row in rows] == sorted(
            [*EVENT_STORE_TABLES, "schema_migrations"]
        )
        assert await conn.fetchval("SELECT count(*) FROM public.events") == 1
        assert await conn.fetchval("SELECT count(*) FROM events") == 0
    finally:
        await conn.close()


async def test_another_applications_table_where_a_migration_creates_one_is_refused(
    empty_database: Database,
) -> None:
    """The query migration creates `foreign_events` only where it is absent: another
    application's table of that name would have been taken for the service's."""
    conn = await connect(empty_database)
    try:
        await conn.execute("CREATE TABLE foreign_events (id int)")
        with pytest.raises(SchemaElsewhere, match="foreign_events are another application's"):
            await migrate(conn, "queries")
        assert await tables(conn) == ["foreign_events"]
    finally:
        await conn.close()


async def test_a_query_database_without_the_schema_its_migration_needs_is_refused(
    empty_database: Database,
) -> None:
    """Regression: a query database whose `public` schema was dropped crashed start-up
    with an uncaught InvalidSchemaNameError, on every start."""
    conn = await connect(empty_database)
    try:
        await conn.execute("DROP SCHEMA public CASCADE")
        await conn.execute("CREATE SCHEMA app")
        await conn.execute("SET search_path = app")
        with pytest.raises(SchemaElsewhere, match="needs a schema the database does not have"):
            await migrate(conn, "queries")
    finally:
        await conn.close()


async def test_a_migration_waiting_for_another_sessions_lock_names_that_session(
    empty_database: Database,
) -> None:
    holder = await connect(empty_database)
    waiter = await connect(empty_database)
    try:
        with capture_logs() as logs:

            async def waiting() -> list[dict[str, Any]]:
                return [e for e in logs if "lock" in e["event"]]

            async with holder.transaction():  # holds the lock until the line is written
                await holder.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                migrating = asyncio.create_task(migrate(waiter, "commands"))
                await infra.wait_until(waiting, what="the line saying the migration waits")
                assert not migrating.done()
            await migrating
        (line,) = await waiting()
        holder_pid = holder.get_server_pid()
        assert line["log_level"] == "warning" and line["database"] == "command database"
        assert line["holder_pid"] == holder_pid and "idle in transaction" in line["holder"]
        # Regression (a probe): measured to the start of the waiting transaction, the
        # holder's was said open for 2 s less than it was, the 2 s the migration waited.
        said = re.search(r"its transaction open for (\d+) s", line["holder"])
        assert said is not None and int(said[1]) >= WAITING_SAID_AFTER, line["holder"]
        assert await recorded(waiter) == [("commands", v) for v, _ in sections("commands")]
    finally:
        await holder.close()
        await waiter.close()


async def test_a_migration_that_waits_a_moment_for_another_sessions_lock_says_nothing(
    empty_database: Database,
) -> None:
    """Regression (a probe): instances started together on migrated databases each said
    that it waited for another's migration lock, held for milliseconds."""
    holder = await connect(empty_database)
    waiter = await connect(empty_database)
    try:
        with capture_logs() as logs:
            async with holder.transaction():
                await holder.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                migrating = asyncio.create_task(migrate(waiter, "commands"))

                async def waiting() -> bool:
                    return bool(
                        await holder.fetchval(
                            "SELECT count(*) FROM pg_locks"
                            " WHERE locktype = 'advisory' AND NOT granted AND pid = $1",
                            waiter.get_server_pid(),
                        )
                    )

                await infra.wait_until(waiting, what="the migration waiting for the lock")
            await migrating
        assert [line for line in logs if "lock" in line["event"]] == []
        assert await recorded(waiter) == [("commands", v) for v, _ in sections("commands")]
    finally:
        await holder.close()
        await waiter.close()


@pytest.mark.parametrize("name", ["commands", "queries"])
async def test_the_tables_an_outage_check_requires_are_those_the_migration_creates(
    empty_database: Database, name: str
) -> None:
    """Regression: a database dropped and created again under the service answered its
    outage check (`SELECT 1`), so the outage was over while every statement failed."""
    pool = await create_pool(empty_database)
    try:
        with pytest.raises(Unavailable, match="do not exist"):
            await require_tables(pool, name)
        await migrate(pool, name)
        await require_tables(pool, name)
        created = await pool.fetch(
            "SELECT schemaname, tablename FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
            " AND tablename <> 'schema_migrations'"
        )
        named = {
            row["tablename"] if row["schemaname"] == "public" else ".".join(row.values())
            for row in created
        }
        assert named == set(NEEDED_TABLES[name])

        await pool.execute(f"DROP TABLE {NEEDED_TABLES[name][0]} CASCADE")
        with pytest.raises(Unavailable) as gone:
            await require_tables(pool, name)
        assert f"{NEEDED_TABLES[name][0]} do not exist" in str(gone.value)
        # Regression (a DBA's probe): of an event store whose schema was renamed, the
        # events all there, the line advised starting an empty one before anything else.
        assert "their schema renamed" in str(gone.value)
        assert "where they were moved, put them back" in str(gone.value)
        assert not str(gone.value).endswith("to start an empty event store")
    finally:
        await pool.close()


async def test_a_unique_index_no_write_relies_on_is_lacking_and_no_outage(
    empty_database: Database,
) -> None:
    """Regression (a probe): the key of the read models' order of creation dropped was an
    outage of the query database (its `/health` 503) while nothing conflicts on it: it
    is said lacking (`status`), and the writes go on."""
    pool = await create_pool(empty_database)
    try:
        await migrate(pool, "queries")
        await pool.execute("ALTER TABLE read_models.invoices DROP CONSTRAINT invoices_created_key")
        async with pool.acquire() as conn:
            assert [gone.index.name for gone in await indexes_lacking(conn, "queries")] == [
                "invoices_created_key"
            ]
        await require_indexes(pool, "queries")
        guarding = {i.name for i in INDEXES["queries"] if i.guards}
        assert "invoices_created_key" not in guarding
        assert {"invoices_pkey", "processed_messages_pkey"} <= guarding
    finally:
        await pool.close()


@pytest.mark.parametrize("name", ["commands", "queries"])
async def test_the_indexes_the_service_relies_on_are_those_the_migration_creates(
    empty_database: Database, name: str
) -> None:
    """Every index the migrations make is in INDEXES (what `status` and the checks of the
    unique ones look for), and nothing else is."""
    pool = await create_pool(empty_database)
    try:
        await migrate(pool, name)
        made = await pool.fetch(
            "SELECT schemaname, tablename, indexname, indexdef LIKE 'CREATE UNIQUE %' AS unique_"
            " FROM pg_indexes WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
            " AND tablename <> 'schema_migrations'"
        )
        found = {
            (
                row["tablename"]
                if row["schemaname"] == "public"
                else f"{row['schemaname']}.{row['tablename']}",
                row["indexname"],
                row["unique_"],
            )
            for row in made
        }
        assert found == {(index.table, index.name, index.unique) for index in INDEXES[name]}
        async with pool.acquire() as conn:
            assert await indexes_lacking(conn, name) == []
        await require_indexes(pool, name)
    finally:
        await pool.close()


async def test_a_unique_index_dropped_is_an_outage_naming_it_until_it_is_made_again(
    empty_database: Database,
) -> None:
    """Regression (a DBA's probe): indexes a DBA dropped went unnoticed; without the
    unique key of a stream's versions two writers could both append one version."""
    pool = await create_pool(empty_database)
    try:
        await migrate(pool, "commands")
        await pool.execute("ALTER TABLE events DROP CONSTRAINT events_stream_version")
        await pool.execute("DROP INDEX events_correlation")
        async with pool.acquire() as conn:
            lacking = [gone.index.name for gone in await indexes_lacking(conn, "commands")]
        assert lacking == ["events_stream_version", "events_correlation"]
        with pytest.raises(AwaitingOperator) as waiting:
            await require_indexes(pool, "commands")
        said = str(waiting.value)
        assert "unique index events_stream_version of events" in said
        assert "ADD CONSTRAINT events_stream_version UNIQUE (aggregate_id, version)" in said
        assert "events_correlation" not in said  # only the scans of `trace` need it

        async def remedies() -> list[str]:
            async with pool.acquire() as conn:
                return [gone.remedy for gone in await indexes_lacking(conn, "commands")]

        for remedy in await remedies():  # each as `status` gives it, pasted
            await pool.execute(remedy)
        assert await remedies() == []
        await require_indexes(pool, "commands")
        # Regression (a probe): an index a CREATE INDEX CONCURRENTLY left invalid was given
        # the statement that makes it anew, which failed on its name; and one made again
        # by hand without UNIQUE under a unique one's name was said nowhere.
        await pool.execute(
            "UPDATE pg_index SET indisvalid = false"
            " WHERE indexrelid = 'processed_messages_pkey'::regclass"
        )
        await pool.execute("ALTER TABLE relay_checkpoints DROP CONSTRAINT relay_checkpoints_pkey")
        await pool.execute("CREATE INDEX relay_checkpoints_pkey ON relay_checkpoints (name)")
        with pytest.raises(AwaitingOperator) as waiting:
            await require_indexes(pool, "commands")
        assert "unique index processed_messages_pkey of processed_messages" in str(waiting.value)
        assert await remedies() == [
            "REINDEX INDEX CONCURRENTLY public.processed_messages_pkey",
            "DROP INDEX public.relay_checkpoints_pkey, then ALTER TABLE relay_checkpoints ADD"
            " PRIMARY KEY (name)",
        ]
        await pool.execute("REINDEX INDEX CONCURRENTLY public.processed_messages_pkey")
        await pool.execute("DROP INDEX public.relay_checkpoints_pkey")
        await pool.execute("ALTER TABLE relay_checkpoints ADD PRIMARY KEY (name)")
        assert await remedies() == []
        await require_indexes(pool, "commands")
    finally:
        await pool.close()


@pytest.mark.parametrize("name", ["commands", "queries"])
async def test_every_index_dropped_is_made_again_by_the_remedy_given_for_it(
    empty_database: Database, name: str
) -> None:
    """Regression (a probe): the remedy given for a read model's key, a rebuild of the read
    models, failed as the service's role (it may not create schemas), and run as their
    owner left that role without grants on the new schema. Each remedy is a statement
    that makes its index again where it was, pasted as given."""
    pool = await create_pool(empty_database)
    try:
        await migrate(pool, name)
        for index in INDEXES[name]:
            constraint = await pool.fetchval(
                "SELECT EXISTS (SELECT FROM pg_constraint WHERE conname = $1"
                " AND conrelid = to_regclass($2))",
                index.name,
                index.table,
            )
            schema = index.table.rsplit(".", 1)[0] if "." in index.table else "public"
            await pool.execute(
                f"ALTER TABLE {index.table} DROP CONSTRAINT {index.name}"
                if constraint
                else f"DROP INDEX {schema}.{index.name}"
            )
        async with pool.acquire() as conn:
            lacking = await indexes_lacking(conn, name)
        assert [gone.index.name for gone in lacking] == [i.name for i in INDEXES[name]]
        for gone in lacking:
            await pool.execute(gone.remedy)
        async with pool.acquire() as conn:
            assert await indexes_lacking(conn, name) == []
    finally:
        await pool.close()


async def test_a_rebuild_under_way_when_the_queries_schema_gains_a_column_gets_it_too(
    empty_database: Database,
) -> None:
    """A rebuild of the release before builds its schema with the function of then; the
    migration that adds `processed_messages.recorded_at` adds it there too, or this
    release's projector would fail on every batch once that schema is swapped in."""
    pool = await create_pool(empty_database)
    try:
        before = [(version, sql) for version, sql in sections("queries") if version < 4]
        await apply(pool, "queries", before)
        for schema in ("read_models_rebuild_0123", "elsewhere"):  # tables alike, another's
            await pool.execute("SELECT public.financing_create_read_models($1)", schema)
        await migrate(pool, "queries")
        await pool.execute("SELECT public.financing_create_read_models('read_models_later')")
        having = await pool.fetch(
            "SELECT table_schema FROM information_schema.columns"
            " WHERE table_name = 'processed_messages' AND column_name = 'recorded_at'"
            " ORDER BY table_schema"
        )
    finally:
        await pool.close()
    assert [row["table_schema"] for row in having] == [
        "read_models",
        "read_models_later",
        "read_models_rebuild_0123",
    ]


# The version 3 of the queries schema that release 0.4.0 shipped (0.4.1 shipped another).
QUERIES_3_OF_0_4_0 = """
CREATE TABLE IF NOT EXISTS foreign_events (
    position     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   text        NOT NULL UNIQUE,
    name         text        NOT NULL,
    aggregate_id uuid        NOT NULL,
    body         text        NOT NULL,
    digest       text        NOT NULL,
    projected_at timestamptz NOT NULL DEFAULT now()
);
ALTER FUNCTION public.financing_create_read_models(text) RENAME TO financing_create_read_models_2;

CREATE FUNCTION public.financing_create_read_models(target text)
RETURNS void
LANGUAGE plpgsql
AS $fn$
BEGIN
    PERFORM public.financing_create_read_models_2(target);
    EXECUTE format(
        'ALTER TABLE %I.processed_messages ADD COLUMN IF NOT EXISTS digest text', target);
END
$fn$;

SELECT public.financing_create_read_models('read_models');
"""


async def test_a_query_database_release_0_4_0_migrated_is_migrated_and_rebuilds_alike(
    empty_database: Database,
) -> None:
    """Regression: 0.4.0's version 3 had already renamed the tables' function, and version
    4 renaming it again failed start-up with a DuplicateFunctionError (a traceback, exit
    1), as did `check`'s remedy and `projections rebuild`."""
    pool = await create_pool(empty_database)
    try:
        before = [(version, sql) for version, sql in sections("queries") if version < 3]
        await apply(pool, "queries", [*before, (3, QUERIES_3_OF_0_4_0)])
        await migrate(pool, "queries")
        await require_current(pool, "queries")
        await pool.execute("SELECT public.financing_create_read_models('read_models_later')")
        columns = await pool.fetch(
            "SELECT table_schema, column_name FROM information_schema.columns"
            " WHERE table_name = 'processed_messages'"
            " AND column_name IN ('digest', 'recorded_at') ORDER BY 1, 2"
        )
    finally:
        await pool.close()
    assert [(row["table_schema"], row["column_name"]) for row in columns] == [
        ("read_models", "digest"),
        ("read_models", "recorded_at"),
        ("read_models_later", "digest"),
        ("read_models_later", "recorded_at"),
    ]


async def test_tables_out_of_a_search_path_set_back_are_found_again(
    empty_database: Database,
) -> None:
    """Regression: a `search_path` set on the database and set back left pooled sessions
    that started under it: they found the tables missing, and kept the query database
    down (113 s) until they were terminated by hand."""
    name = empty_database.connect_kwargs["database"]
    pool = await create_pool(empty_database, min_size=2)
    try:
        await migrate(pool, "queries")
        await infra.alter_database(name, "SET search_path = 'nowhere'")
        await infra.terminate_sessions(empty_database)  # they start again under it

        async def missing() -> bool:
            try:
                await require_tables(pool, "queries")
            except Unavailable:
                return True
            return False

        await infra.wait_until(missing, what="the tables out of the sessions' search_path")
        await infra.alter_database(name, "RESET ALL")

        async def found() -> bool:
            return not await missing()

        await infra.wait_until(found, what="the tables found once the setting is gone")
    finally:
        await pool.close()


async def test_a_table_whose_rows_row_level_security_hides_is_an_outage_saying_so(
    empty_database: Database,
) -> None:
    """Regression: with row-level security forced on a read model's table and no policy,
    the Queries API answered every investor list empty, `financing status` said the query
    database was healthy and the Queries API's health SERVING; only the projector's
    refused writes said anything."""
    role = infra.unique_name("fin_owner")
    pool = await create_pool(empty_database, min_size=1)
    await pool.execute(f'CREATE ROLE "{role}" LOGIN')
    await pool.execute(
        f'GRANT CREATE ON DATABASE "{empty_database.connect_kwargs["database"]}" TO "{role}"'
    )
    await pool.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
    owner = await create_pool(Database({**empty_database.connect_kwargs, "user": role}))
    try:
        await migrate(owner, "queries")
        await require_tables(owner, "queries")  # all there, every row shown
        await owner.execute("ALTER TABLE read_models.investors ENABLE ROW LEVEL SECURITY")
        await require_tables(owner, "queries")  # its owner sees every row still
        await owner.execute("ALTER TABLE read_models.investors FORCE ROW LEVEL SECURITY")
        with pytest.raises(
            AwaitingOperator,
            match=r"row-level security on its table\(s\)"
            r" read_models.investors hides rows",
        ):
            await require_tables(owner, "queries")
        await owner.execute("ALTER TABLE read_models.investors NO FORCE ROW LEVEL SECURITY")
        await require_tables(owner, "queries")
    finally:
        await owner.close()
        await pool.execute(f'DROP OWNED BY "{role}" CASCADE')
        await pool.execute(f'DROP ROLE "{role}"')
        await pool.close()
