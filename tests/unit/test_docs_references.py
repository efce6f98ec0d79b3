"""Every file and test the documentation names is in the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from financing import metrics, release
from financing.adapters.postgres import schema
from financing.entrypoints.grpc.codec import MAX_REQUEST_BYTES, REQUEST_TIMEOUT
from tests.support.metrics import alert_rules

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)|::(test_\w+)")
PATH_REFERENCE = re.compile(r"`((?:src|tests|scripts|docs|deploy|protos)/[\w./-]*[\w/])`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    }


def _references() -> list[tuple[str, str, str]]:
    """(where, file, test) for each `::test`, with the test file named last before it on its
    line."""
    found = []
    for document in DOCUMENTS:
        for number, line in enumerate(document.read_text().splitlines(), 1):
            current = None
            for match in TEST_REFERENCE.finditer(line):
                if match.group(1):
                    current = match.group(1)
                    continue
                where = f"{document.name}:{number}"
                assert current is not None, f"{where}: {match.group(0)} names no file"
                found.append((where, current, match.group(2)))
    return found


def test_the_documents_name_tests() -> None:
    assert len(_references()) >= 10


def test_every_test_the_documents_name_exists_in_the_file_they_name() -> None:
    missing = [
        f"{where}: {file}::{test}"
        for where, file, test in _references()
        if not (ROOT / file).is_file() or test not in _tests_in(ROOT / file)
    ]
    assert missing == []


def test_every_path_the_documents_name_exists() -> None:
    missing = [
        f"{document.name}:{number}: {match.group(1)}"
        for document in DOCUMENTS
        for number, line in enumerate(document.read_text().splitlines(), 1)
        for match in PATH_REFERENCE.finditer(line)
        if not (ROOT / match.group(1)).exists()
    ]
    assert missing == []


def test_the_changelog_begins_with_this_release_and_its_schema_versions() -> None:
    version = release()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    [first, *_] = re.findall(r"^## (\S+)\n\n(.+)$", changelog, re.MULTILINE)
    assert first == (
        version,
        f"Commands schema {schema.latest('commands')}, queries schema {schema.latest('queries')}.",
    )


def test_the_request_limits_the_contract_states_are_the_services() -> None:
    contract = " ".join((ROOT / "docs" / "contract.md").read_text().split())
    assert MAX_REQUEST_BYTES % 1024 == 0
    assert f"A request message longer than {MAX_REQUEST_BYTES // 1024} KiB" in contract
    assert (
        f"ended its side within {REQUEST_TIMEOUT:g} s is answered `DEADLINE_EXCEEDED`" in contract
    )


METRIC_ROW = re.compile(r"^\| `((?:financing|grpc)_\w+)` \| (counter|gauge|histogram) \|", re.M)
METRIC_NAME = re.compile(r"\b((?:financing|grpc_server)_\w+)")
SERIES_OF = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def test_every_metric_the_alert_rules_name_is_one_the_readme_lists() -> None:
    """The rules of docs/deployment.md, "What to alert on", name series the service
    exports (the README's table lists every metric and its type)."""
    series = {
        name + suffix
        for name, kind in METRIC_ROW.findall((ROOT / "README.md").read_text())
        for suffix in SERIES_OF[kind]
    }
    rules = alert_rules()
    named = set(METRIC_NAME.findall(re.sub(r'"[^"]*"', '""', rules)))  # not label values
    assert named and named <= series, sorted(named - series)


def test_the_readme_lists_every_metric_of_the_service_with_its_type() -> None:
    """The README's table and the metrics module agree, name and type: a metric added
    without its row, or a row left for a metric gone, is found here."""
    exported: set[tuple[str, str]] = set()
    for value in vars(metrics).values():
        if isinstance(value, metrics.SetGauge):
            exported.add((value.name, "gauge"))
        elif isinstance(value, Counter | Gauge | Histogram):
            for family in value.describe():
                suffix = "_total" if family.type == "counter" else ""
                exported.add((family.name + suffix, family.type))
    listed = set(METRIC_ROW.findall((ROOT / "README.md").read_text()))
    assert exported == listed, (sorted(exported - listed), sorted(listed - exported))
