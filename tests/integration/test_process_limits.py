"""Limits the platform sets on the process, met at start-up with a line that says which."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.service import financing_command

# Where a cgroup limiting the number of tasks (processes and threads) can be made: the
# pids controller of cgroup v1, or cgroup v2's hierarchy.
_PIDS_HIERARCHIES = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))
NO_DATABASE = "financing_test_no_such_database"


def limited_run(
    *args: str, preexec_fn: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    """`args` run with the databases and the broker named by host and never reached."""
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=preexec_fn,
        # Host names, to be looked up; nothing that could be reached or changed.
        env={
            **os.environ,
            "COMMAND_DB_CONNECTION_STRING": f"postgresql://postgres@localhost/{NO_DATABASE}",
            "QUERY_DB_CONNECTION_STRING": f"postgresql://postgres@localhost/{NO_DATABASE}",
            "AMQP_ADDRESS": "amqp://guest:guest@localhost:1/",
        },
    )


def _pids_hierarchy() -> Path | None:
    for root in _PIDS_HIERARCHIES:
        controllers = root / "cgroup.controllers"  # v2 names its controllers
        if controllers.exists() and "pids" not in controllers.read_text().split():
            continue
        if (root / "cgroup.procs").exists() and os.access(root, os.W_OK):
            return root
    return None


@contextlib.contextmanager
def tasks_limited(most: int) -> Iterator[Path]:
    """A cgroup in which at most `most` tasks may run; its `cgroup.procs`."""
    root = _pids_hierarchy()
    if root is None:
        pytest.skip("no cgroup limiting tasks can be made here (needs a writable pids controller)")
    group = root / f"financing_test_{uuid.uuid4().hex[:12]}"
    group.mkdir()
    try:
        (group / "pids.max").write_text(str(most))
        yield group / "cgroup.procs"
    finally:
        group.rmdir()


@pytest.mark.parametrize("command", ["serve", "status"])
def test_a_limit_on_threads_that_leaves_the_event_loop_too_few_is_a_configuration_error(
    command: str,
) -> None:
    """Regression: under a limit of tasks too low for the threads of the event loop's
    library (4, beside the main one), the process aborted at its first name lookup
    (SIGABRT, exit 134) without a line."""
    with tasks_limited(3) as procs:
        done = limited_run(
            "sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *financing_command(), command
        )
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    said = done.stderr.strip().splitlines()[-1]
    if command == "serve":  # the service's lines are JSON
        line = json.loads(said)
        assert line["event"] == "configuration error", line
        said = line["error"]
    assert "may not start the 4 threads its event loop needs" in said, said


def test_an_address_space_too_small_for_the_threads_stacks_is_named_as_the_cause() -> None:
    """Regression (a probe): under `ulimit -v`, threads whose stacks could not be mapped
    were said to meet a limit on processes or threads, which raising would not help."""

    def stacks_beyond_the_address_space() -> None:
        # Each thread's stack is mapped at the stack limit's size: 4 of 1 GiB in 3 GiB.
        resource.setrlimit(resource.RLIMIT_STACK, (1 << 30, resource.RLIM_INFINITY))
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))

    done = limited_run(*financing_command(), "status", preexec_fn=stacks_beyond_the_address_space)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    said = done.stderr.strip().splitlines()[-1]
    assert "the address space the process may map (ulimit -v, 3072 MiB)" in said, said


@pytest.mark.parametrize("limit", [8, 12, 24, 40])
def test_a_descriptor_limit_below_what_the_service_needs_is_a_configuration_error(
    limit: int,
) -> None:
    """Regression (probes): under `ulimit -n 8` the event loop could not be made, and the
    process ended with an uncaught exception's traceback (exit 1); under 12 or 13 its
    start failed with another (the loop "already running"), under 20 or 24 the "service
    ready" line did; 16 failed at start-up after its whole budget."""

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    done = limited_run(*financing_command(), "serve", preexec_fn=few_descriptors)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    line = json.loads(done.stderr.strip().splitlines()[-1])
    assert line["event"] == "configuration error", line
    assert f"may open {limit} files (ulimit -n), where it needs 52 at least" in line["error"]


def test_the_descriptors_needed_count_only_the_pools_the_components_open() -> None:
    """The Commands API alone opens no database pool: 40 descriptors are enough for it
    (it then fails only for want of a broker here)."""

    def forty_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    done = subprocess.run(
        [*financing_command(), "serve", "--components", "commands-api"],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=forty_descriptors,
        env={
            **os.environ,
            "AMQP_ADDRESS": "amqp://guest:guest@localhost:1/",
            "FINANCING_STARTUP_TIMEOUT": "1",
        },
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    line = json.loads(done.stderr.strip().splitlines()[-1])
    assert line["event"] == "start-up failed", line
    assert "ulimit" not in line["error"], line


def test_the_address_space_left_under_a_limit_is_measured_against_what_is_mapped() -> None:
    """Regression (a probe): under `ulimit -v` a little above what the process maps at rest,
    "service ready" and a healthy /health came first, then every large list failed for
    want of memory; the process now warns as it is ready (`address_space_to_spare`)."""
    script = (
        "import resource\n"
        "from financing.entrypoints.supervisor import address_space_to_spare\n"
        "print(address_space_to_spare())\n"
        "mapped = int(next(line for line in open('/proc/self/status')"
        " if line.startswith('VmSize:')).split()[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (mapped + (100 << 20), resource.RLIM_INFINITY))\n"
        "print(address_space_to_spare() >> 20)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    unlimited, spare_mib = done.stdout.split()
    assert unlimited == "None"
    assert 90 <= int(spare_mib) <= 100, spare_mib


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one_as_gos_runtime_does() -> None:
    """The reference, a Go program, ran with its soft limit raised to its hard one (Go
    1.19 and later): under systemd's default (1,024 soft) it held many more connections."""
    script = (
        "import resource\n"
        "from financing.entrypoints.connections import raise_descriptor_limit\n"
        "raise_descriptor_limit()\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )

    def soft_below_hard() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        preexec_fn=soft_below_hard,
    )
    assert done.stdout.split() == ["4096", "4096"]
