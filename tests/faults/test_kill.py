"""SIGKILL at random moments under load: nothing is lost, doubled or left half done.

The service is killed (no chance to finish anything: in-flight RPCs,
unacked messages, open transactions, the relayer between publishing and
moving its checkpoint) at seeded random moments while concurrent sagas run,
and restarted each time; some restarts are killed too, while the service
starts up. Clients retry only the calls that failed. Afterwards
the invariant checker passes, the read models equal a replay of the event
store, and every saga ended exactly as planned.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

from tests.faults.conftest import Deploy, add_figure, record_workload
from tests.faults.workload import Workload, settle, suite_seed, verify_effects

KILLS = 6


async def test_service_killed_at_random_moments_loses_and_doubles_nothing(deploy: Deploy) -> None:
    seed = suite_seed()
    schedule = random.Random(f"kill/{seed}")
    target = await deploy("kill")
    workload = Workload(target, seed=seed, concurrency=12)
    enough = asyncio.Event()
    running = asyncio.create_task(workload.run(until=enough))
    kills = 0
    try:
        for _ in range(KILLS):
            # The fault schedule: sometimes right after a restart, while it recovers.
            await asyncio.sleep(schedule.uniform(0.1, 1.5))
            assert not running.done(), running.result()  # a failed workload shows its error
            await target.service.kill()
            kills += 1
            if schedule.random() < 0.3:
                starting = asyncio.create_task(target.service.start())
                await asyncio.sleep(schedule.uniform(0.05, 0.6))
                kills += target.service.running
                await target.service.kill()
                # Killed before it was ready (start() fails) or just after.
                with contextlib.suppress(AssertionError):
                    await starting
            if not target.service.running:
                await target.service.start()
        enough.set()
        await running
    finally:
        running.cancel()
    assert workload.stats.failures, "no call failed: the kills did not hit the workload"

    await settle(target)
    await verify_effects(target, workload)
    add_figure("kills survived (SIGKILL under load)", kills)
    record_workload(workload)
