"""One aggregate's row in the read models, as it is stored (`financing events`)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from financing.adapters.postgres.connection import QUERY_DATABASE, acquired
from financing.adapters.postgres.read_models import DEFAULT_SCHEMA, quoted_schema
from financing.domain.aggregates import Investor, Invoice, Issuer

# The read-model table of each aggregate type.
TABLES = {
    Investor.aggregate_type: "investors",
    Invoice.aggregate_type: "invoices",
    Issuer.aggregate_type: "issuers",
}
# Columns that only order the lists.
_INTERNAL = frozenset({"id", "created"})


async def read_model_row(
    pool: asyncpg.Pool, aggregate_id: UUID, aggregate_type: str | None = None
) -> tuple[str, dict[str, Any]] | None:
    """(table, columns) of the aggregate's row; every table is searched when the type is
    not known. None when no read model has a row for it."""
    tables = [TABLES[aggregate_type]] if aggregate_type in TABLES else list(TABLES.values())
    schema = quoted_schema(DEFAULT_SCHEMA)
    async with acquired(pool, QUERY_DATABASE) as conn:
        for table in tables:
            row = await conn.fetchrow(f"SELECT * FROM {schema}.{table} WHERE id = $1", aggregate_id)
            if row is not None:
                return table, {key: value for key, value in row.items() if key not in _INTERNAL}
    return None
