"""The alert rules of docs/deployment.md, "What to alert on", evaluated by Prometheus's own
`promtool` against series shaped as the service exports them
(tests/unit/alert_rules_test.yml): each rule fires on what it is for, and is quiet
otherwise.

`promtool` comes with Debian's `prometheus` package; `.ci/run` installs it and sets
FINANCING_REQUIRE_PROMTOOL, so that CI never passes without these tests. Elsewhere a
machine without it skips them, saying so."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.metrics import alert_rules

CASES = Path(__file__).with_name("alert_rules_test.yml")


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("FINANCING_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is required here: apt-get install prometheus")
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return found


def test_the_alert_rules_are_valid(promtool: str, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(alert_rules())
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_alert_rules_fire_on_what_they_are_for(promtool: str, tmp_path: Path) -> None:
    """Regression: `FinancingDeadLetters` took only `increase`, which counts nothing into a
    series' first sample: the letters of an instance new to Prometheus (a poison message
    waiting as it started, dead-lettered before its first scrape) never fired it; and no
    rule fired once every process that reads the queues was gone."""
    (tmp_path / "rules.yml").write_text(alert_rules())
    shutil.copy(CASES, tmp_path / CASES.name)
    tested = subprocess.run(
        [promtool, "test", "rules", CASES.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
