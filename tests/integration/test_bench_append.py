"""The append bench's baseline: the statements of one unit of work, as it captures them."""

from __future__ import annotations

from scripts import bench_append


async def test_the_baseline_holds_the_unit_of_works_own_statements_and_not_the_bell() -> None:
    async with bench_append.event_store_database("fin_bench_append") as db:
        captured = await bench_append.capture(db)
    queries = [" ".join(record.query.split()) for record in captured.statements]
    # The load, then the one writing statement; the commit bell's ring, which the unit
    # of work sent on the same connection, and the pool's reset are left out.
    assert len(queries) == 2, queries
    assert queries[0].startswith("WITH snapshot AS")
    assert queries[1].startswith("WITH appended AS")
    script = bench_append.pgbench_script(captured)
    assert script.statements == 2
    assert "pg_notify" not in script.text
