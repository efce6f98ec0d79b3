"""What `financing serve` needs at run time ships in the wheel, not only in the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_ships_sql_generated_code_and_the_console_script(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    [wheel] = tmp_path.glob("financing-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert "financing/adapters/postgres/sql/commands.sql" in names
    assert "financing/adapters/postgres/sql/queries.sql" in names
    assert "financing/generated/__init__.py" in names
    assert "financing/py.typed" in names
    assert "financing = financing.entrypoints.cli:main" in scripts
    assert not any(name.startswith(("tests/", "scripts/")) for name in names)
