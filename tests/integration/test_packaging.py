"""What `financing serve` needs at run time ships in the wheel, not only in the checkout."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def image_build_context(into: Path) -> Path:
    """The files `.dockerignore` lets into the image's build context: it shuts out
    everything (`*`) but the paths it lists with `!`, and then the paths after them."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the context is an allow-list"
    let_in = [line[1:] for line in lines if line.startswith("!")]
    for path in let_in:
        source = ROOT / path.rstrip("/")
        if source.is_dir():
            shutil.copytree(
                source,
                into / path,
                ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "*.py[cod]"),
            )
        else:
            (into / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / path)
    return into


@pytest.mark.parametrize("source", ["checkout", "image build context"])
def test_the_wheel_ships_sql_generated_code_and_the_console_script(
    tmp_path: Path, source: str
) -> None:
    """Regression (image build context): `.dockerignore` left LICENSE out, so the image's
    wheel, unlike the checkout's, carried no licence."""
    root = ROOT if source == "checkout" else image_build_context(tmp_path / "context")
    wheels = tmp_path / "wheels"
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
            str(wheels),
            str(root),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    [wheel] = wheels.glob("financing-*.whl")
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
    assert "financing/generated/financing.binpb" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)


def test_the_sdist_carries_the_license_and_the_protos_the_code_is_generated_from(
    tmp_path: Path,
) -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
            str(tmp_path),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=180,
    )
    [sdist] = tmp_path.glob("financing-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "protos/financing.proto", "pyproject.toml"} <= names


def _distribution(requirement: str) -> str:
    name = re.split(r"[<>=!~\[; (]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_extras(requirement: str) -> set[str]:
    """The distribution `requirement` names, and those its extras add (read from the
    installed distribution's metadata)."""
    name = _distribution(requirement)
    extras = (
        re.findall(r"[\w-]+", requirement.split("[", 1)[1].split("]")[0])
        if "[" in requirement
        else []
    )
    added = {
        _distribution(dependency)
        for dependency in importlib.metadata.requires(name) or []
        for extra in extras
        if re.search(rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]", dependency)
    }
    return {name, *added}


def test_the_image_lock_pins_every_dependency_of_the_project() -> None:
    """The image installs only what deploy/requirements.lock pins (--no-deps): a dependency
    added to pyproject.toml without running deploy/lock.sh would be missing at run time,
    and so would one that an extra of a dependency adds."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = (ROOT / "deploy" / "requirements.lock").read_text()
    pinned = {_distribution(line) for line in lock.splitlines() if "==" in line}
    wanted = {name for requirement in project["dependencies"] for name in _with_extras(requirement)}
    missing = wanted - pinned
    assert not missing, f"run deploy/lock.sh: {sorted(missing)} not in deploy/requirements.lock"
    assert "betterproto-rust-codec" in wanted  # the extras are read


def test_protobuf_messages_are_parsed_and_serialised_by_the_compiled_codec() -> None:
    """betterproto's `rust-codec` extra replaces its pure-Python wire codec (about 150 µs
    to parse a request, 100 µs to serialise one) when `betterproto_rust_codec` imports."""
    import betterproto
    import betterproto_rust_codec  # noqa: F401 - installed by the extra

    from financing.generated import BidOnInvoiceCommand, Money, Uuid

    assert betterproto.Message.parse.__name__ == "__parse_patch"
    command = BidOnInvoiceCommand(Uuid("investor"), Uuid("invoice"), Money(15.0))
    assert BidOnInvoiceCommand().parse(bytes(command)) == command
