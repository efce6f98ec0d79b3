"""Schema migrations: each `sql/<name>.sql` file is applied at start-up, once per version.

A file is divided into sections headed `-- version: N` (N increasing). Each
section runs once, in order, and is recorded in `schema_migrations(name,
version)` in the same transaction; a file without headers is one section,
version 1. The schema changes by appending a section, never by editing an
applied one.

Several instances may start at once: the whole migration runs in one
transaction under a transaction-scoped advisory lock, so the others wait, then
see the recorded versions and apply nothing. On a server that takes no writes
(a replica, a standby) nothing is applied: `missing` tells whether the schema
its primary migrated is current.

A database whose schema a newer release migrated (versions this one does not know)
is refused (`SchemaAhead`): a rollback must go back to a release that knows it.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from importlib import resources

import asyncpg

from financing.adapters.postgres.connection import (
    COMMAND_DATABASE,
    QUERY_DATABASE,
    READ_ONLY,
    Connection,
    acquired,
    advisory_lock_holder,
    drop_stale,
)
from financing.adapters.postgres.read_models import DEFAULT_SCHEMA
from financing.application.errors import AwaitingOperator, Refused
from financing.logging import get_logger

log = get_logger(__name__)

# Advisory lock key serialising migrations within one database ("fin-schm").
MIGRATION_LOCK = 0x66696E2D7363686D

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_HEADER = re.compile(r"^--[ \t]*version:[ \t]*(\d+)[ \t]*$", re.MULTILINE)


class SchemaAhead(Refused):
    """The database records versions of a schema this release does not know: a newer
    release migrated it. Running on it could misread what that release writes (a rollback
    past a change of how messages are recorded handles them twice), so the database is
    refused, as one whose credentials are wrong: start-up fails at once."""

    def __init__(self, name: str, ahead: list[int], known: int) -> None:
        super().__init__(
            DATABASES.get(name, f"{name} database"),
            f"its {name} schema is at version {max(ahead)}, newer than this release knows"
            f" ({known}): a newer release migrated it; run that release, or a newer one",
        )


class SchemaBehind(Refused):
    """The database lacks versions of a schema this release needs: no `financing serve`
    of this release has started on it yet (which creates and migrates it). An operator's
    command, which migrates nothing, is refused: it would fail on what is missing."""

    def __init__(self, name: str, behind: list[int]) -> None:
        none_yet = len(behind) == len(sections(name))
        # An older schema, which a command that migrates (`console.database`) migrates;
        # never none, which only `serve` creates.
        self.older = not none_yet
        said = (
            f"has no {name} schema yet: {_MADE[name]}"
            if none_yet
            else f"has an older {name} schema than this release's: start `financing serve`"
            " of this release on it once, which migrates it"
        )
        super().__init__(DATABASES.get(name, f"{name} database"), f"it {said}")


# What makes a schema where there is none, by schema (SCHEMAS).
_MADE = {
    "commands": "restore it if it held events, or start `financing serve` of this release"
    " on it once to start an empty event store",
    "queries": "`financing projections rebuild` builds it from the event store;"
    " `financing serve` of this release creates it empty, which only a deployment without"
    " events yet wants",
}


async def require_current(pool_or_conn: asyncpg.Pool | Connection, name: str) -> None:
    """SchemaBehind (or SchemaAhead) unless the database's `name` schema is this release's;
    SchemaElsewhere where `financing serve` would refuse it so (a schema made for the
    role after the service's tables, which a default `search_path` puts first; another
    application's tables where the service's would go, the reference's event store): an
    operator's command that went on would say all is well of a deployment that cannot
    start, or advise starting one that refuses it."""
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with pool_or_conn.acquire() as conn:
            await _require_current(conn, name)
    else:
        await _require_current(pool_or_conn, name)


async def _require_current(conn: Connection, name: str) -> None:
    await _refuse_misplaced(conn, name)
    behind = await missing(conn, name)
    if len(behind) == len(sections(name)):
        await _refuse_occupied(conn, name)  # another application's tables, none of ours
    if behind:
        raise SchemaBehind(name, behind)


# The database each schema is the schema of, as errors name it.
DATABASES = {"commands": COMMAND_DATABASE, "queries": QUERY_DATABASE}
# The schemas a release migrates, one per database.
SCHEMAS = tuple(DATABASES)


# The tables the statements of each schema name, as they name them. A database dropped
# and created again, or restored without them, answers every statement that names no
# table: its outage is over only once they are back (`require_tables`).
NEEDED_TABLES = {
    "commands": (
        "events",
        "snapshots",
        "processed_messages",
        "relay_checkpoints",
        "event_store_identity",
    ),
    "queries": (
        *(
            f"{DEFAULT_SCHEMA}.{table}"
            for table in ("investors", "invoices", "issuers", "processed_messages")
        ),
        "foreign_events",
        "projected_event_store",
    ),
}
# Of each schema's tables, those the Queries API reads: what else a database lacks (what
# the projector alone reads or writes, another relayer's events kept in `public`) leaves
# its lists answered. Said lacking for the whole database, the Queries API was said
# NOT_SERVING while every list answered.
LISTED = {
    "commands": NEEDED_TABLES["commands"],
    "queries": tuple(f"{DEFAULT_SCHEMA}.{table}" for table in ("investors", "invoices", "issuers")),
}


@dataclass(frozen=True)
class Index:
    """An index of a service's table the service relies on: `guards` its writes (a
    stream's versions, a message's record, an upsert's key: without it, a copy is applied
    twice, a stream forks, or an upsert fails); otherwise its scans or the order of its
    lists (without it, they read the whole table)."""

    name: str  # in the table's schema
    table: str  # as NEEDED_TABLES names it
    unique: bool
    serves: str  # what it keeps right, or fast
    remedy: str  # what makes it again
    guards: bool = False


def _read_models_key(table: str, name: str, serves: str, *, guards: bool = True) -> Index:
    """A unique key of a read model's table: its primary key (`<table>_pkey`) or the
    order of its rows' creation (`<table>_created_key`). Made again by the statement it
    is given, on the rows there: the remedy given before, a rebuild of the read models,
    needs a role that may create schemas, and leaves a role of the service's own without
    grants on the new one."""
    qualified = f"{DEFAULT_SCHEMA}.{table}"
    if name.endswith("_created_key"):
        remedy = f"ALTER TABLE {qualified} ADD CONSTRAINT {name} UNIQUE (created)"
    else:
        key = "message_id" if table == "processed_messages" else "id"
        remedy = f"ALTER TABLE {qualified} ADD PRIMARY KEY ({key})"
    return Index(name, qualified, True, serves, remedy, guards=guards)


# Every index the migrations make on the service's tables, by schema (a test holds this
# list to what they make). A DBA drops an index no scan has used yet (`events_correlation`
# until a `trace`); a unique one dropped breaks what the service keeps right.
INDEXES = {
    "commands": (
        Index(
            "events_pkey",
            "events",
            True,
            "an event's position",
            "ALTER TABLE events ADD PRIMARY KEY (position)",
        ),
        Index(
            "events_stream_version",
            "events",
            True,
            "one event per version of an aggregate (two writers of one version: the stream forks)",
            "ALTER TABLE events ADD CONSTRAINT events_stream_version"
            " UNIQUE (aggregate_id, version)",
            guards=True,
        ),
        Index(
            "events_commit_order",
            "events",
            False,
            "the relayer's reads in commit order",
            "CREATE INDEX CONCURRENTLY events_commit_order ON events (transaction_id, position)",
        ),
        Index(
            "events_correlation",
            "events",
            False,
            "`financing trace`",
            "CREATE INDEX CONCURRENTLY events_correlation ON events (correlation_id)"
            " WHERE correlation_id IS NOT NULL",
        ),
        Index(
            "snapshots_pkey",
            "snapshots",
            True,
            "one snapshot per aggregate",
            "ALTER TABLE snapshots ADD PRIMARY KEY (aggregate_id)",
            guards=True,
        ),
        Index(
            "processed_messages_pkey",
            "processed_messages",
            True,
            "one record per message and consumer (a copy delivered again: applied twice)",
            "ALTER TABLE processed_messages ADD PRIMARY KEY (consumer, message_id)",
            guards=True,
        ),
        Index(
            "processed_messages_correlation",
            "processed_messages",
            False,
            "`financing trace`",
            "CREATE INDEX CONCURRENTLY processed_messages_correlation ON"
            " processed_messages (correlation_id) WHERE correlation_id IS NOT NULL",
        ),
        Index(
            "processed_messages_age",
            "processed_messages",
            False,
            "pruning the deduplication records",
            "CREATE INDEX CONCURRENTLY processed_messages_age ON processed_messages (processed_at)",
        ),
        Index(
            "relay_checkpoints_pkey",
            "relay_checkpoints",
            True,
            "the relayer's checkpoint",
            "ALTER TABLE relay_checkpoints ADD PRIMARY KEY (name)",
            guards=True,
        ),
        Index(
            "event_store_identity_pkey",
            "event_store_identity",
            True,
            "the event store's one name",
            "ALTER TABLE event_store_identity ADD PRIMARY KEY (singleton)",
        ),
    ),
    "queries": (
        _read_models_key("investors", "investors_pkey", "one row per investor"),
        _read_models_key(
            "investors", "investors_created_key", "the order of creation", guards=False
        ),
        _read_models_key("invoices", "invoices_pkey", "one row per invoice"),
        _read_models_key("invoices", "invoices_created_key", "the order of creation", guards=False),
        _read_models_key("issuers", "issuers_pkey", "one row per issuer"),
        _read_models_key("issuers", "issuers_created_key", "the order of creation", guards=False),
        _read_models_key(
            "processed_messages",
            "processed_messages_pkey",
            "one record per projected message (a copy delivered again: projected twice)",
        ),
        Index(
            "processed_messages_age",
            f"{DEFAULT_SCHEMA}.processed_messages",
            False,
            "pruning the deduplication records",
            "CREATE INDEX CONCURRENTLY processed_messages_age"
            f" ON {DEFAULT_SCHEMA}.processed_messages (processed_at)",
        ),
        Index(
            "foreign_events_pkey",
            "foreign_events",
            True,
            "the order of another relayer's events",
            "ALTER TABLE foreign_events ADD PRIMARY KEY (position)",
        ),
        Index(
            "foreign_events_message_id_key",
            "foreign_events",
            True,
            "one copy of another relayer's event",
            "ALTER TABLE foreign_events ADD CONSTRAINT foreign_events_message_id_key"
            " UNIQUE (message_id)",
            guards=True,
        ),
        Index(
            "projected_event_store_pkey",
            "projected_event_store",
            True,
            "the one event store the read models are of",
            "ALTER TABLE projected_event_store ADD PRIMARY KEY (singleton)",
            guards=True,
        ),
    ),
}
# Of the indexes named (table, index, unique), those of a table there that it lacks, holds
# invalid (a CREATE INDEX CONCURRENTLY that failed half way), or holds not unique where
# it should be (one made again by hand without UNIQUE): how, and its name as a statement
# names it (the table's schema holds its indexes).
_INDEXES_LACKING = (
    "SELECT i.name, CASE WHEN x.indexrelid IS NULL THEN 'gone'"
    " WHEN NOT x.indisvalid THEN 'invalid' ELSE 'not unique' END AS state,"
    " quote_ident(n.nspname) || '.' || quote_ident(i.name) AS qualified"
    " FROM unnest($1::text[], $2::text[], $3::bool[]) WITH ORDINALITY"
    " AS i (tbl, name, uniq, ordinality)"
    " JOIN pg_class AS t ON t.oid = to_regclass(i.tbl)"
    " JOIN pg_namespace AS n ON n.oid = t.relnamespace"
    " LEFT JOIN (pg_index AS x JOIN pg_class AS c ON c.oid = x.indexrelid)"
    " ON x.indrelid = t.oid AND c.relname = i.name"
    " WHERE x.indexrelid IS NULL OR NOT x.indisvalid OR (i.uniq AND NOT x.indisunique)"
    " ORDER BY i.ordinality"
)


@dataclass(frozen=True)
class Lacking:
    """An index of INDEXES a database lacks: `gone`, `invalid` or `not unique`."""

    index: Index
    state: str
    qualified: str  # its name as a statement names it

    @property
    def remedy(self) -> str:
        """The statement that makes it again: an invalid one is built again where it is
        (made again beside itself, its name taken, the statement failed)."""
        if self.state == "invalid":
            return f"REINDEX INDEX CONCURRENTLY {self.qualified}"
        if self.state == "not unique":
            return f"DROP INDEX {self.qualified}, then {self.index.remedy}"
        return self.index.remedy


async def indexes_lacking(conn: Connection, name: str) -> list[Lacking]:
    """The indexes of INDEXES[name] the database lacks, holds invalid, or holds not unique
    (tables that are not there are `require_tables`' to say)."""
    indexes = {index.name: index for index in INDEXES[name]}
    rows = await conn.fetch(
        _INDEXES_LACKING,
        [index.table for index in indexes.values()],
        list(indexes),
        [index.unique for index in indexes.values()],
    )
    return [Lacking(indexes[row["name"]], row["state"], row["qualified"]) for row in rows]


def said_lacking(lacking: Lacking) -> str:
    """What the lack of an index does, and what makes it again."""
    index = lacking.index
    kind = "unique index" if index.unique else "index"
    state = "" if lacking.state == "gone" else f", {lacking.state}"
    return f"{kind} {index.name} of {index.table} ({index.serves}){state}: {lacking.remedy}"


def _session(
    pool_or_conn: asyncpg.Pool | Connection, database: str
) -> contextlib.AbstractAsyncContextManager[Connection]:
    """A session to ask the database on: one of the pool's, taken for the question, or the
    one the caller holds (the database's inspection asks everything on one session:
    taken three times in the line of a busy pool, a look took 14-20 s)."""
    if isinstance(pool_or_conn, asyncpg.Pool):
        return acquired(pool_or_conn, database)
    return contextlib.nullcontext(pool_or_conn)


class WritesRefused(AwaitingOperator):
    """What a database lacks refuses the service's writes, and what the projector alone
    reads (a write privilege, a unique index its writes rely on, writes taken at all,
    SELECT on another relayer's events): the tables the Queries API reads (LISTED) are
    read all the same, and its lists answered."""


async def require_indexes(pool: asyncpg.Pool | Connection, name: str) -> None:
    """AwaitingOperator while the database lacks an index of INDEXES[name] that guards its
    writes (an upsert fails without its own; a copy of a message would be applied twice),
    so they wait until it is made again."""
    async with _session(pool, DATABASES[name]) as conn:
        lacking = [gone for gone in await indexes_lacking(conn, name) if gone.index.guards]
    if lacking:
        raise WritesRefused(
            DATABASES[name],
            f"it lacks the unique index(es) its writes rely on, dropped or left invalid:"
            f" {'; '.join(said_lacking(gone) for gone in lacking)}; the service goes on"
            " by itself once they are made",
        )


# What brings a schema's tables back where they are gone. Not a restart of the command
# database's service first: on a schema renamed (the events all there, under another
# name), it told a DBA to start an empty event store.
_BRINGS_THEM_BACK = {
    "commands": "restore the database from a backup (a restart of the service on it would"
    " start a new, empty event store)",
    "queries": "`financing projections rebuild` builds them again from the event store,"
    " without a restart",
}
# The query database's tables outside the read models' schema, which a rebuild does not
# make (it replaces that schema alone), and what brings them back: its migrations, on
# the database made again.
OUTSIDE_READ_MODELS = tuple(
    table for table in NEEDED_TABLES["queries"] if not table.startswith(f"{DEFAULT_SCHEMA}.")
)
_BRINGS_OUTSIDE_BACK = (
    "restore the query database from a backup, or drop it, create it again empty and run"
    " `financing projections rebuild`, which makes its tables and builds the read models"
    " from the event store (what another relayer's events made of them, which"
    " `foreign_events` kept, is lost with it)"
)
# Of the tables named, those that do not exist (in the session's search_path), and those
# whose rows row-level security may hide from the session's role (enabled and forced, or
# enabled on a table the role does not own; the role not BYPASSRLS): its reads answer
# without them, and its writes are refused.
_ABSENT_OR_HIDDEN = (
    "SELECT array_agg(name) FILTER (WHERE to_regclass(name) IS NULL),"
    " array_agg(name) FILTER (WHERE row_security_active(to_regclass(name)))"
    " FROM unnest($1::text[]) AS name"
)
# Of the tables named, those that exist: a bare name in the schema the session creates
# tables in (not anywhere on its search_path), as CREATE TABLE would meet it.
_PRESENT = (
    "SELECT coalesce(array_agg(name ORDER BY name), '{}') FROM unnest($1::text[]) AS name"
    " WHERE to_regclass(CASE WHEN strpos(name, '.') > 0 THEN name"
    " ELSE quote_ident(current_schema()) || '.' || name END) IS NOT NULL"
)
# A table of the Go reference service's event store (esrc's), which keeps its own
# `events` and `snapshots` where this service's would go: a command database the
# reference ran on (by default, as this service's, the database `postgres`).
_REFERENCE_STREAMS = "event_streams"


async def require_tables(
    pool: asyncpg.Pool | Connection, name: str, *, rebuilding: bool = False
) -> None:
    """Unavailable (AwaitingOperator) unless every table of `NEEDED_TABLES[name]` exists
    and shows the service all its rows, saying what brings back those that are gone;
    `rebuilding`: of the query database, only those a rebuild of the read models does
    not make (OUTSIDE_READ_MODELS)."""
    database = DATABASES[name]
    needed = OUTSIDE_READ_MODELS if rebuilding else NEEDED_TABLES[name]
    async with _session(pool, database) as conn:
        row = await conn.fetchrow(_ABSENT_OR_HIDDEN, list(needed))
        assert row is not None  # an aggregate without GROUP BY gives one row
        absent: list[str] | None
        hidden: list[str] | None
        absent, hidden = row
        if absent:
            drop_stale(conn)  # its search_path may be the setting of another time
    listed = set(LISTED[name])
    if hidden:
        raise (AwaitingOperator if listed & set(hidden) else WritesRefused)(
            database,
            f"row-level security on its table(s) {', '.join(hidden)} hides rows from the"
            " service's role: its reads would answer without them, and its writes are"
            " refused. Turn it off (ALTER TABLE ... DISABLE ROW LEVEL SECURITY, or NO FORCE"
            " for a table the role owns) or give the role BYPASSRLS; the service goes on by"
            " itself",
        )
    if absent:
        remedy = (
            _BRINGS_OUTSIDE_BACK
            if set(absent) & set(OUTSIDE_READ_MODELS)
            else _BRINGS_THEM_BACK[name]
        )
        raise (AwaitingOperator if listed & set(absent) else WritesRefused)(
            database,
            f"its table(s) {', '.join(absent)} do not exist, or not in its sessions'"
            " search_path (their schema renamed, the search_path changed, the database"
            " dropped and created again or restored without them): where they were moved,"
            f" put them back, the service goes on by itself; where they are gone, {remedy}",
        )


# What the service's statements do to each table of a schema, beyond reading it (which
# `require_tables` covers): the privileges its role needs. An upsert needs INSERT and
# UPDATE; pruning the deduplication records DELETE, and UPDATE for the rows it locks.
WRITES = {
    "commands": {
        "events": "INSERT",
        "events_position_seq": "USAGE",  # its bigserial's; identity columns need none
        "snapshots": "INSERT, UPDATE",
        "processed_messages": "INSERT, UPDATE, DELETE",
        "relay_checkpoints": "INSERT, UPDATE",
    },
    "queries": {
        f"{DEFAULT_SCHEMA}.investors": "INSERT, UPDATE",
        f"{DEFAULT_SCHEMA}.invoices": "INSERT, UPDATE",
        f"{DEFAULT_SCHEMA}.issuers": "INSERT",
        f"{DEFAULT_SCHEMA}.processed_messages": "INSERT, UPDATE, DELETE",
        "foreign_events": "INSERT",
        "projected_event_store": "INSERT",  # the event store it projects, at its first start
    },
}
# The schemas the role may not use that hold the service's tables, and the tables named
# without a schema that one of them holds: of the schemas named ($1), those that exist;
# and those of the sessions' search_path that hold a table named as one of the tables
# named without a schema ($2), out of sight (a search_path passes over a schema its role
# may not use: `USAGE ON SCHEMA public` revoked was said as the tables gone, with a
# remedy that started an empty event store).
_UNUSABLE_SCHEMAS = (
    "SELECT coalesce(array_agg(DISTINCT name ORDER BY name), '{}'),"
    " coalesce(array_agg(DISTINCT tbl) FILTER (WHERE tbl IS NOT NULL), '{}') FROM ("
    " SELECT name, NULL::text AS tbl FROM unnest($1::text[]) AS name"
    " WHERE to_regnamespace(name) IS NOT NULL AND NOT has_schema_privilege(name, 'USAGE')"
    " UNION ALL SELECT n.nspname, c.relname::text FROM pg_class AS c"
    " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
    " WHERE c.relname = ANY($2::text[]) AND to_regclass(quote_ident(c.relname)) IS NULL"
    " AND NOT has_schema_privilege(n.oid, 'USAGE')"
    " AND n.nspname IN (SELECT replace(btrim(entry, ' \"'), '$user', current_user)"
    " FROM unnest(string_to_array(current_setting('search_path'), ',')) AS entry)"
    ") AS unusable"
)
# The service's table in the search_path besides those of NEEDED_TABLES: its migrations'.
_MIGRATIONS_TABLE = "schema_migrations"
# Whether the session's transactions are read-only (a standby, or read-only by default),
# and of each table (or sequence) and privilege named, those its role lacks
# (has_table_privilege given several says whether the role has any of them: one at a
# time).
_LACKING = (
    "SELECT current_setting('transaction_read_only') <> 'off',"
    " coalesce(array_agg(name || ' (' || privilege || ')' ORDER BY name, privilege)"
    " FILTER (WHERE NOT CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(c.oid, privilege)"
    " ELSE has_table_privilege(c.oid, privilege) END), '{}')"
    " FROM unnest($1::text[], $2::text[]) AS grant_(name, list)"
    " JOIN pg_class AS c ON c.oid = to_regclass(name),"
    " LATERAL unnest(string_to_array(list, ', ')) AS privilege"
)


async def require_grants(pool: asyncpg.Pool | Connection, name: str, *, writes: bool) -> None:
    """AwaitingOperator unless the pool's role may use the schemas and read the tables of
    `name` and, where the process `writes`, the database takes writes and the role may
    make those of WRITES: a server that answers while refusing the service's statements
    is out for it, and said so with what is lacking (WritesRefused where the reads lack
    nothing)."""
    database = DATABASES[name]
    schemas = sorted({table.split(".")[0] for table in NEEDED_TABLES[name] if "." in table})
    in_path = [table for table in NEEDED_TABLES[name] if "." not in table] + [_MIGRATIONS_TABLE]
    granted = dict.fromkeys(NEEDED_TABLES[name], "SELECT")
    for table, written in WRITES[name].items() if writes else ():
        granted[table] = f"{granted[table]}, {written}" if table in granted else written
    async with _session(pool, database) as conn:
        reach = await conn.fetchrow(_UNUSABLE_SCHEMAS, schemas, in_path)
        assert reach is not None  # an aggregate without GROUP BY gives one row
        unusable: list[str] = reach[0]
        # A table of a schema the role may not use cannot even be named.
        unreached = {
            table
            for table in granted
            if (table.split(".")[0] in unusable if "." in table else table in reach[1])
        }
        usable = {
            table: privilege for table, privilege in granted.items() if table not in unreached
        }
        row = await conn.fetchrow(_LACKING, list(usable), list(usable.values()))
    assert row is not None  # an aggregate without GROUP BY gives one row
    read_only, lacking = bool(row[0]), list(row[1])
    if writes and read_only:
        raise WritesRefused(database, READ_ONLY)
    listed = set(LISTED[name])
    read = {f"{table} (SELECT)" for table in listed}
    reads_lacking = bool(unreached & listed or read.intersection(lacking))
    lacking = [f"schema {schema} (USAGE)" for schema in unusable] + lacking
    if lacking:
        raise (AwaitingOperator if reads_lacking else WritesRefused)(
            database,
            f"its role lacks privileges the service needs: {', '.join(lacking)}; GRANT"
            " them, the service goes on by itself",
        )


def latest(name: str) -> int:
    """The version this release migrates the `name` schema to."""
    return _newest(sections(name))


def _newest(known: list[tuple[int, str]]) -> int:
    return max((version for version, _ in known), default=0)


def _refuse_ahead(name: str, applied: set[int], known: list[tuple[int, str]]) -> None:
    newest = _newest(known)
    ahead = sorted(version for version in applied if version > newest)
    if ahead:
        raise SchemaAhead(name, ahead, newest)


def sections(name: str) -> list[tuple[int, str]]:
    """The versioned sections of `sql/<name>.sql`, read from the installed package."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid migration name {name!r}")
    text = (
        resources.files("financing.adapters.postgres")
        .joinpath("sql", f"{name}.sql")
        .read_text(encoding="utf-8")
    )
    return parse_sections(text, f"sql/{name}.sql")


def parse_sections(text: str, where: str) -> list[tuple[int, str]]:
    """`(version, sql)` pairs of a migration file's `-- version: N` sections."""
    parts = _HEADER.split(text)
    if len(parts) == 1:
        return [(1, text)]
    if any(line.strip() and not line.lstrip().startswith("--") for line in parts[0].splitlines()):
        raise ValueError(f"{where}: statements before the first '-- version: N' header")
    found = [(int(version), sql) for version, sql in zip(parts[1::2], parts[2::2], strict=True)]
    versions = [version for version, _ in found]
    if versions != sorted(set(versions)):
        raise ValueError(f"{where}: versions must increase, got {versions}")
    return found


async def migrate(
    pool_or_conn: asyncpg.Pool | Connection,
    name: str,
    *,
    statement_timeout: float | None = None,
    if_new: str | None = None,
) -> None:
    """Bring the schema of `sql/<name>.sql` up to date; safe to run concurrently.

    `statement_timeout` bounds the wait for another migrating instance's lock and each
    migration's statements, which may take longer than a statement of the running
    service is given (an index built on a large table); None: the connection's own.
    `if_new`: a statement run in the migration's transaction where it made the schema
    from nothing (the empty read models dropped before any instance can read them)."""
    await apply(
        pool_or_conn, name, sections(name), statement_timeout=statement_timeout, if_new=if_new
    )


class SchemaElsewhere(Refused):
    """The session would create the schema's tables where they are not (`search_path`): in
    no schema at all, or in a schema before the one that holds them. Migrated there, the
    service would run on a new, empty event store beside the one it has (a schema made for
    the service's role, which a default `search_path` puts first), saying it is healthy."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(DATABASES.get(name, f"{name} database"), detail)


async def _refuse_misplaced(conn: Connection, name: str) -> None:
    """SchemaElsewhere unless the session creates tables in a schema, and in the one that
    holds the record of `name`'s migrations if a schema of the database holds one."""
    row = await conn.fetchrow(
        "SELECT current_schema() AS here, current_setting('search_path') AS path,"
        " array(SELECT n.nspname FROM pg_class AS c"
        " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE c.relname = 'schema_migrations' AND c.relkind = 'r'"
        " AND has_table_privilege(c.oid, 'SELECT')"
        " ORDER BY n.nspname) AS tables"
    )
    assert row is not None  # a SELECT without FROM: one row
    here, path = row["here"], row["path"]
    holders = []
    for schema in row["tables"]:  # another application's schema_migrations is no record
        # A savepoint each: a table without these columns fails its statement only.
        with contextlib.suppress(asyncpg.UndefinedColumnError):
            async with conn.transaction():
                if await conn.fetchval(
                    f"SELECT EXISTS (SELECT FROM {_identifier(schema)}.schema_migrations"
                    " WHERE name = $1)",
                    name,
                ):
                    holders.append(schema)
    if here is None:
        raise SchemaElsewhere(
            name,
            f"its search_path ({path}) names no schema that exists: set it (for the role, or"
            " `options=-csearch_path=...` in the connection string) to the schema that holds"
            " the service's tables",
        )
    if holders and here not in holders:
        raise SchemaElsewhere(
            name,
            f"its search_path ({path}) would create the service's tables in schema {here!r},"
            f" but schema {', '.join(map(repr, holders))} holds them: set search_path (for"
            " the role, or `options=-csearch_path=...` in the connection string) to that"
            " schema first, or move the tables (another deployment of the service needs a"
            " database of its own: the relayer's lock is the database's)",
        )


async def _refuse_occupied(conn: Connection, name: str) -> None:
    """SchemaElsewhere when a database that records none of `name`'s migrations already
    has tables they would create: another application's, which the first migration would
    fail on (the reference's `events`: an uncaught error on every start) or, where it
    creates tables only if absent, take for the service's."""
    needed = NEEDED_TABLES.get(name, ())
    present = await conn.fetchval(_PRESENT, [*needed, _REFERENCE_STREAMS])
    taken = [table for table in present if table in needed]
    if not taken:
        return
    whose = (
        "the Go reference service's event store (beside its event_streams)"
        if _REFERENCE_STREAMS in present
        else "another application's"
    )
    raise SchemaElsewhere(
        name,
        f"its table(s) {', '.join(taken)} are {whose}, not the service's (it records none of"
        " the service's migrations): give the service a database of its own, or a schema of"
        " its own beside them (CREATE SCHEMA financing, then `options=-csearch_path=financing`"
        " in the connection string)",
    )


# How long a migration waits for another session's migration lock before it says so: an
# instance started beside another that finds every migration applied holds the lock for
# milliseconds, and a warning for that said nothing an operator could act on.
WAITING_SAID_AFTER = 2.0
# How much longer than the server's lock_timeout the client waits for its answer.
LOCK_TIMEOUT_MARGIN = 5.0


async def _locked_within(conn: Connection, seconds: float) -> bool:
    """Whether this transaction took the migration lock within `seconds`; its wait given
    up (in a savepoint of its own), the transaction goes on without it."""
    previous = await conn.fetchval("SELECT current_setting('lock_timeout')")
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{seconds}s")
            # Bounded by the server's lock_timeout, not the session's answer timeout.
            wait = seconds + LOCK_TIMEOUT_MARGIN
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK, timeout=wait)
            await conn.execute("SELECT set_config('lock_timeout', $1, true)", previous)
    except asyncpg.LockNotAvailableError:
        return False
    return True


async def _report_waiting(conn: Connection, name: str) -> None:
    """One line naming the session that holds the migration lock this one waits for: a
    start-up that waits for another instance's migration (an index built on a large
    table) says so, rather than looking like a database that does not answer."""
    holder = await advisory_lock_holder(conn, MIGRATION_LOCK)
    log.warning(
        "migration waits for another session's migration lock",
        database=DATABASES.get(name, f"{name} database"),
        **({"holder": holder.describe(), "holder_pid": holder.pid} if holder else {}),
    )


async def _recorded(pool_or_conn: asyncpg.Pool | Connection, name: str) -> list[asyncpg.Record]:
    """The recorded versions of `name`; SchemaElsewhere when the `schema_migrations`
    the session finds is another application's (golang-migrate's, Rails', dbmate's)."""
    try:
        return await pool_or_conn.fetch(
            "SELECT version FROM schema_migrations WHERE name = $1", name
        )
    except (asyncpg.UndefinedColumnError, asyncpg.DatatypeMismatchError):
        raise SchemaElsewhere(
            name,
            "the table schema_migrations its search_path finds is another application's"
            " (it has no name and version of migrations): give the service a schema of its"
            " own (search_path, for the role or `options=-csearch_path=...` in the"
            " connection string)",
        ) from None


def _identifier(name: str) -> str:
    """`name` as a quoted SQL identifier, whatever its characters."""
    return '"' + name.replace('"', '""') + '"'


async def missing(pool_or_conn: asyncpg.Pool | Connection, name: str) -> list[int]:
    """The versions of `sql/<name>.sql` this database has not recorded (read only, for a
    server that takes no writes: a replica carries the schema its primary migrated)."""
    try:
        rows = await _recorded(pool_or_conn, name)
    except asyncpg.UndefinedTableError:
        rows = []
    applied = {row["version"] for row in rows}
    known = sections(name)
    _refuse_ahead(name, applied, known)
    return [version for version, _ in known if version not in applied]


async def apply(
    pool_or_conn: asyncpg.Pool | Connection,
    name: str,
    pending: list[tuple[int, str]],
    *,
    statement_timeout: float | None = None,
    if_new: str | None = None,
) -> None:
    """Apply the sections of migration `name` not yet recorded, in one locked transaction
    (with `if_new` where none was: `migrate`)."""
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with pool_or_conn.acquire() as conn:
            await _apply(conn, name, pending, statement_timeout, if_new)
    else:
        await _apply(pool_or_conn, name, pending, statement_timeout, if_new)


async def _apply(
    conn: Connection,
    name: str,
    pending: list[tuple[int, str]],
    statement_timeout: float | None,
    if_new: str | None = None,
) -> None:
    # READ COMMITTED whatever the database's default: the lock is the transaction's first
    # statement, and every later one must see what the previous lock holder committed
    # (under REPEATABLE READ or SERIALIZABLE the snapshot was taken while waiting for the
    # lock: instances starting together created the tables twice, and one crashed).
    began = time.monotonic()
    migrated: list[int] = []
    async with conn.transaction(isolation="read_committed"):
        taken = await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", MIGRATION_LOCK)
        if not taken and not await _locked_within(conn, WAITING_SAID_AFTER):
            await _report_waiting(conn, name)
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK, timeout=statement_timeout
            )
        await _refuse_misplaced(conn, name)
        # Made only where it is not: CREATE ... IF NOT EXISTS needs the CREATE privilege on
        # the schema even where the table exists, which a role that only runs the service
        # (its tables migrated by their owner) does not hold.
        if not await conn.fetchval(_PRESENT, ["schema_migrations"]):
            await conn.execute(
                """
            CREATE TABLE schema_migrations (
                name       text        NOT NULL,
                version    integer     NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (name, version)
            )
            """
            )
        applied = {row["version"] for row in await _recorded(conn, name)}
        _refuse_ahead(name, applied, pending)
        if not applied:
            await _refuse_occupied(conn, name)
        for version, sql in pending:
            if version in applied:
                continue
            try:
                # No arguments: the simple protocol, several statements.
                await conn.execute(sql, timeout=statement_timeout)
            except asyncpg.InvalidSchemaNameError as error:
                raise SchemaElsewhere(
                    name,
                    f"its migration {version} needs a schema the database does not have"
                    f" ({error}): create it, or give the service a database that has it",
                ) from None
            await conn.execute(
                "INSERT INTO schema_migrations (name, version) VALUES ($1, $2)", name, version
            )
            migrated.append(version)
        if if_new is not None and migrated and not applied:
            await conn.execute(if_new, timeout=statement_timeout)
    if migrated:  # said once committed: an instance that found it done says nothing
        log.info(
            "schema migrated",
            schema=name,
            from_version=max(applied, default=0),
            to_version=migrated[-1],
            seconds=round(time.monotonic() - began, 3),
        )
