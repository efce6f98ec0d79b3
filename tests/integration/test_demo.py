"""`make demo`, the service's main job for a newcomer: it tells its whole story and stops
the service cleanly."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


async def test_the_demo_tells_its_story_against_the_running_service() -> None:
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scripts.demo",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(demo.communicate(), 120)
    text = out.decode()

    assert demo.returncode == 0, f"{text}\n{err.decode()}"
    # Invoice A approved, B financed, C financed and then reversed; every investor shown
    # beside its events, and the event store's invariants hold.
    for status in ("APPROVED", "FINANCED", "REVERSED"):
        assert f"status {status}" in text, text
    assert text.count("INVESTOR ") == 3
    assert "violations: 0" in text
    assert text.rstrip().endswith("service stopped cleanly (exit code 0)")
