"""Create the databases the configuration names, when they are missing (for `make serve`).

The service creates its schemas itself, but not databases: on a local
PostgreSQL the default query database (`queries`) usually does not exist yet.
"""

from __future__ import annotations

import asyncio

import asyncpg

from financing.config import Database, Settings


async def ensure(db: Database) -> None:
    name = db.connect_kwargs["database"]
    admin = await asyncpg.connect(**{**db.connect_kwargs, "database": "postgres"})
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}"')
            print(f"created database {db.describe()}")
    finally:
        await admin.close()


async def main() -> None:
    settings = Settings.from_env()
    for db in (settings.command_db, settings.query_db):
        await ensure(db)


if __name__ == "__main__":
    asyncio.run(main())
