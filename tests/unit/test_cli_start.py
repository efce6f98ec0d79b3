"""The command line stops cleanly on a signal from its first line on (`cli.main`); what
Python imports before that line runs is the window in which a SIGTERM kills it without a
word, so it imports next to nothing."""

from __future__ import annotations

import json
import subprocess
import sys

# Heavy modules that must not be imported before `main` runs.
HEAVY = ("importlib.metadata", "asyncio", "email", "structlog", "financing.config")


def test_the_command_lines_entry_imports_nothing_heavy_before_it_handles_signals() -> None:
    """Regression: the package imported `importlib.metadata` (for its release) as the
    command line began, 50 ms during which a SIGTERM killed `financing` without a word
    (exit 143), where a later one says `stopped by SIGTERM`."""
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys; before = set(sys.modules);"
            " from financing.entrypoints.cli import main;"
            " print(json.dumps(sorted(set(sys.modules) - before)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = json.loads(found.stdout)
    assert not [name for name in imported if name.startswith(HEAVY)], imported
