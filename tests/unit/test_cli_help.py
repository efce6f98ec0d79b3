"""The command line's own answers: its version, what each subcommand reads, refused arguments."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

import pytest

from financing import release
from financing.adapters.postgres import schema
from financing.config import (
    AMQP_ADDRESS,
    COMMAND_DB,
    DB_TIMEOUT,
    DEDUP_RETENTION,
    LOGGER_LEVEL,
    METRICS_ADDRESS,
    QUERY_DB,
    QUEUE_TYPE,
    VARIABLES,
    Variable,
)
from financing.entrypoints.cli import COMMAND_GROUPS, main
from tests.support.service import ROOT, free_port, run_cli

# Each subcommand and the environment variables it reads.
READS: dict[tuple[str, ...], tuple[Variable, ...]] = {
    ("serve",): VARIABLES,
    ("populate",): (AMQP_ADDRESS, QUEUE_TYPE),
    ("projections", "rebuild"): (COMMAND_DB, QUERY_DB, DB_TIMEOUT),
    ("check",): (COMMAND_DB, QUERY_DB, DB_TIMEOUT),
    ("dead-letters", "list"): (AMQP_ADDRESS, QUEUE_TYPE),
    ("dead-letters", "requeue"): (AMQP_ADDRESS, QUEUE_TYPE, DEDUP_RETENTION),
    ("dead-letters", "discard"): (AMQP_ADDRESS, QUEUE_TYPE),
    ("trace",): (COMMAND_DB, DB_TIMEOUT, AMQP_ADDRESS),
    ("events",): (COMMAND_DB, QUERY_DB, DB_TIMEOUT),
    ("tail",): (AMQP_ADDRESS,),
    ("status",): (COMMAND_DB, QUERY_DB, DB_TIMEOUT, AMQP_ADDRESS, METRICS_ADDRESS),
    ("relay", "rewind"): (COMMAND_DB, DB_TIMEOUT, DEDUP_RETENTION),
    ("broker", "hand-back"): (AMQP_ADDRESS,),
}


def answer(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    code = exited.value.code
    return code if isinstance(code, int) else 1, out, err


def test_version_is_the_newest_release_and_its_schema_versions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Regression: two releases with different schemas both said `financing 0.1.0`, so an
    operator rolling one out could not tell which an instance or a command was."""
    code, out, _ = answer(capsys, "--version")

    assert code == 0
    commands, queries = schema.latest("commands"), schema.latest("queries")
    assert commands >= 4 and queries >= 1
    assert out.strip() == (
        f"financing {release()} (commands schema {commands}, queries schema {queries})"
    )


def test_a_source_tree_run_over_an_install_says_its_own_release(tmp_path: Path) -> None:
    """Regression (a probe): the release said (`--version`, the ready line, the build
    info metric) was the installed package's metadata: another release's source put on
    PYTHONPATH over an install said the installed release, and a mixed fleet so run
    looked like one release to `count by (release)`."""
    tree = tmp_path / "financing"
    shutil.copytree(ROOT / "src" / "financing", tree)
    init = tree / "__init__.py"
    init.write_text(init.read_text().replace(f'"{release()}"', '"9.8.7"'))

    answered = subprocess.run(
        [sys.executable, "-m", "financing", "--version"],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert answered.stdout.startswith("financing 9.8.7 ("), answered
    assert metadata.version("financing") != "9.8.7"


@pytest.mark.parametrize("command", list(READS), ids=" ".join)
def test_every_subcommand_help_lists_the_variables_it_reads_with_their_defaults(
    capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    code, out, _ = answer(capsys, *command, "--help")

    assert code == 0
    listed = out.split("environment variables read:", 1)[1]
    for variable in (*READS[command], LOGGER_LEVEL):
        [line] = [line for line in listed.splitlines() if line.split()[:1] == [variable.name]]
        assert f"(default: {variable.default})" in line, line
    unread = {v.name for v in VARIABLES} - {v.name for v in (*READS[command], LOGGER_LEVEL)}
    assert not [name for name in unread if name in listed], listed


def test_serve_help_names_the_retention_window(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = answer(capsys, "serve", "--help")

    assert f"{DEDUP_RETENTION.name}  " in out
    assert "(default: 7d)" in out


def test_status_help_says_what_healthy_means(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = answer(capsys, "status", "--help")

    assert "Healthy (exit code 0; otherwise 1) means:" in out
    assert "has at least one consumer" in out
    assert "--max-relay-lag" in out


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("dead-letters", "discard"), "say which (--queue, --message-id, --aggregate) or --all"),
        # Regression (a probe): given both, it was told to say which or --all.
        (
            ("dead-letters", "discard", "--all", "--queue", "SellInvoice"),
            "--all discards every dead letter: give it alone, or no --all",
        ),
    ],
    ids=["nothing said", "all and a filter"],
)
def test_discarding_needs_a_filter_or_all_but_not_both(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], said: str
) -> None:
    code, _, err = answer(capsys, *args)

    assert code == 2
    assert said in err
    assert err.startswith("usage: financing dead-letters discard ")


@pytest.mark.parametrize("verb", ["list", "requeue", "discard"])
def test_a_dead_letter_selection_by_an_aggregate_that_is_no_uuid_is_refused(
    capsys: pytest.CaptureFixture[str], verb: str
) -> None:
    """Regression (a probe): any text was taken, and matched nothing: `0 dead letter(s)`,
    exit 0, where `events not-a-uuid` says it is no UUID."""
    code, _, err = answer(capsys, "dead-letters", verb, "--aggregate", "not-a-uuid")

    assert code == 2
    assert "'not-a-uuid' is not a UUID" in err


@pytest.mark.parametrize(
    "args",
    [("status", "--bogus"), ("dead-letters", "list", "--bogus"), ("check", "extra")],
)
def test_an_unknown_argument_is_refused_under_the_usage_of_its_command(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...]
) -> None:
    """Regression: argparse left it to the top parser, which printed its own usage."""
    code, _, err = answer(capsys, *args)

    assert code == 2
    command = " ".join(args[:-1])
    assert err.startswith(f"usage: financing {command} "), err
    assert f"financing {command}: error: unrecognized arguments: {args[-1]}" in err


@pytest.mark.parametrize(
    ("group", "choices"),
    [
        ("dead-letters", "{list,requeue,discard}"),
        ("projections", "{rebuild}"),
        ("relay", "{rewind}"),
        ("broker", "{hand-back}"),
    ],
)
def test_a_missing_subcommand_is_said_by_its_choices(
    capsys: pytest.CaptureFixture[str], group: str, choices: str
) -> None:
    """Regression: it was said by the attribute argparse parses it into
    (`the following arguments are required: dead_letters_command`)."""
    code, _, err = answer(capsys, group)

    assert code == 2
    assert err.splitlines()[-1] == (
        f"financing {group}: error: the following arguments are required: {choices}"
    )


def test_an_aggregate_id_that_is_not_a_uuid_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = answer(capsys, "events", "not-a-uuid")

    assert code == 2
    assert "'not-a-uuid' is not a UUID" in err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("populate", "--balance", "1e20"), "from 0 to 999999999999.99"),
        (("populate", "--balance", "-1"), "from 0 to 999999999999.99"),
        (("populate", "--balance", "nan"), "from 0 to 999999999999.99"),
        (("populate", "--balance", "10.001"), "at most 2 decimal places"),
        (("trace", ""), "must not be empty"),
        (("trace", "  "), "must not be empty"),
        # Bytes that are not UTF-8 (a probe): the database driver's traceback before.
        (("trace", "abc\udcff"), "'abc\\udcff' is not UTF-8 text"),
        # Beyond what the event store holds a version in: a traceback and exit 1 before.
        (("events", str(uuid.UUID(int=1)), "--from-version", "2147483648"), "<= 2147483647"),
        (("events", str(uuid.UUID(int=1)), "--last", "9223372036854775808"), "<= 2147483647"),
        # A value that begins with a dash was taken for an option: "expected one argument".
        (("relay", "rewind", "--since", "-5m"), "written without a sign (5m)"),
        (("relay", "rewind", "--since=-5m"), "written without a sign (5m)"),
        (("relay", "rewind", "--since", "-2026-12-07T14:00:00Z"), "a time is written without"),
        # A duration out of range (a probe): "neither a time ... nor a duration" before.
        (("relay", "rewind", "--since", "0m"), "--since must be at least 1s, got '0m'"),
        (("events", str(uuid.UUID(int=1)), "--from-version", "-1x"), "'-1x' is not a whole"),
        (("populate", "--balance", "-1e3"), "from 0 to 999999999999.99"),
    ],
)
def test_an_argument_the_service_would_not_take_is_refused(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], says: str
) -> None:
    """Regression: `populate --balance 1e20` said it had registered investors whose events
    the service then dead-lettered; `trace ''` listed every letter without a correlation."""
    code, _, err = answer(capsys, *args)

    assert code == 2
    assert says in err, err


async def test_the_service_reports_a_configuration_error_as_one_json_line_and_exits_2() -> None:
    run = await run_cli({"PATH": os.environ["PATH"], "LOGGER_LEVEL": "LOUD"}, "serve")

    assert run.exit_code == 2, run.describe()
    [line] = run.stderr.splitlines()
    logged = json.loads(line)
    assert logged["event"] == "configuration error"
    assert logged["level"] == "error"
    assert "LOGGER_LEVEL" in logged["error"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        # The flag's, not FINANCING_COMPONENTS's (which its error named).
        (("serve", "--components", "bogus"), "argument --components: unknown component(s) bogus"),
        (("serve", "--nope"), "unrecognized arguments: --nope"),
    ],
)
async def test_the_services_usage_errors_are_one_json_line_too(
    args: tuple[str, ...], says: str
) -> None:
    """Regression: argparse wrote them as two plain-text lines among the service's JSON."""
    run = await run_cli({"PATH": os.environ["PATH"]}, *args)

    assert run.exit_code == 2, run.describe()
    [line] = run.stderr.splitlines()
    logged = json.loads(line)
    assert (logged["event"], logged["level"]) == ("configuration error", "error")
    assert says in logged["error"], logged


@pytest.mark.parametrize("command", [("check",), ("dead-letters", "list")])
async def test_an_operators_command_reports_a_configuration_error_as_text(
    command: tuple[str, ...],
) -> None:
    """Regression (a probe): began `financing:`, where every other line of an operator's
    command begins with the command's whole name."""
    run = await run_cli({"PATH": os.environ["PATH"], "LOGGER_LEVEL": "LOUD"}, *command)

    assert run.exit_code == 2, run.describe()
    prefix = " ".join(("financing", *command))
    assert run.stderr.startswith(f"{prefix}: configuration error: LOGGER_LEVEL"), run.stderr


def test_a_variable_a_command_does_not_read_does_not_stop_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: every command parsed every variable of the service, so a listen address
    set for `serve` alone, and wrong, made `events` exit 2."""
    monkeypatch.setenv("METRICS_ADDRESS", "bad")
    monkeypatch.setenv("FINANCING_SNAPSHOT_INTERVAL", "often")
    # Nothing listens there: the command runs, and fails to reach its database.
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    monkeypatch.setenv("COMMAND_DB_CONNECTION_STRING", nowhere)
    code, _, err = answer(capsys, "events", str(uuid.uuid4()))
    assert code == 1, err
    assert "configuration error" not in err, err

    monkeypatch.setenv("FINANCING_DB_TIMEOUT", "soon")  # one it reads
    code, _, err = answer(capsys, "events", str(uuid.uuid4()))
    assert code == 2, err
    assert "FINANCING_DB_TIMEOUT" in err, err


# Runs `financing ARGS` in a process that sends itself SIGNAL while the command's modules
# are imported (as an orchestrator's stop right after a start would land).
SIGNALLED_WHILE_IMPORTING = """
import importlib.abc, os, signal, sys

class SignalOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "financing.entrypoints.cli.commands":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        return None

sys.meta_path.insert(0, SignalOnImport())
from financing.entrypoints.cli import main
main(sys.argv[2:])
"""


# The same, with SIGNAL sent once every module is imported, while the settings are read:
# before the command hands the signals to its event loop.
SIGNALLED_WHILE_CONFIGURING = """
import os, signal, sys
from financing.config import Settings

read = Settings.from_env.__func__

def signalled(cls, *args, **kwargs):
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return read(cls, *args, **kwargs)

Settings.from_env = classmethod(signalled)
from financing.entrypoints.cli import main
main(sys.argv[2:])
"""


# The same, with SIGNAL handled inside a callback whose exceptions Python ignores, as
# the import system's callbacks for its module locks are (a weak reference's).
SIGNALLED_IN_A_CALLBACK = """
import os, signal, sys, weakref

class Held:
    pass

def gone(reference):
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    sum(range(1000))  # the signal's handler runs here, inside the callback

class SignalInACallback:
    def find_spec(self, name, path, target=None):
        if name == "financing.entrypoints.cli.commands":
            sys.meta_path.remove(self)
            held = Held()
            reference = weakref.ref(held, gone)
            del held
        return None

sys.meta_path.insert(0, SignalInACallback())
from financing.entrypoints.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize(
    "script",
    [SIGNALLED_WHILE_IMPORTING, SIGNALLED_WHILE_CONFIGURING, SIGNALLED_IN_A_CALLBACK],
    ids=["importing", "configuring", "in a callback"],
)
@pytest.mark.parametrize(
    ("sent", "command", "code"),
    [
        ("SIGTERM", "serve", 0),
        ("SIGINT", "serve", 0),
        ("SIGINT", "status", 130),
        ("SIGTERM", "status", 143),
        ("SIGTERM", "projections rebuild", 143),
        # Regression (a probe): a SIGHUP killed the process without a word (129).
        ("SIGHUP", "serve", 0),
        ("SIGHUP", "status", 129),
    ],
)
def test_a_signal_before_the_command_handles_signals_stops_it_with_one_line(
    script: str, sent: str, command: str, code: int
) -> None:
    """Regression: a SIGINT printed Python's KeyboardInterrupt traceback, and a SIGTERM
    killed the process without a word (exit -15), while the modules were imported and,
    after that, until the event loop took the signals over. And (a probe) one handled
    inside a callback of the import system was lost: the command ran on."""
    run = subprocess.run(
        [sys.executable, "-c", script, sent, *command.split()],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert run.returncode == code, run.stderr
    [line] = run.stderr.splitlines()
    if command != "serve":  # as an operator's command says it when stopped later
        assert line == f"financing {command}: stopped by {sent}"
        return
    logged = json.loads(line)
    assert (logged["event"], logged["signal"]) == ("stopped while starting", sent), logged


def test_the_probe_in_its_module_form_reads_only_its_own_variables() -> None:
    """The container's HEALTHCHECK runs the probe as a module: a wrong variable that only
    `serve` reads must not make it a configuration error (exit 2) rather than a probe."""
    run = subprocess.run(
        [sys.executable, "-m", "financing.entrypoints.cli.health_check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            "FINANCING_SNAPSHOT_INTERVAL": "often",  # wrong, and not the probe's
            "FINANCING_COMPONENTS": "relayer",  # checked at its metrics endpoint alone
            "METRICS_ADDRESS": f"127.0.0.1:{free_port()}",  # where nothing listens
        },
    )
    assert run.returncode == 1, run.stderr
    assert "configuration error" not in run.stderr, run.stderr


@pytest.mark.parametrize(("argument", "code"), [("--help", 0), ("--verbose", 2)])
def test_the_probe_in_its_module_form_answers_its_arguments_as_the_command_does(
    argument: str, code: int
) -> None:
    """Regression: the module form took no arguments and probed whatever it was given:
    `--help` printed "not healthy" lines, a mistyped option passed unnoticed."""
    run = subprocess.run(
        [sys.executable, "-m", "financing.entrypoints.cli.health_check", argument],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            "METRICS_ADDRESS": f"127.0.0.1:{free_port()}",  # where nothing listens
        },
    )
    assert run.returncode == code, run.stderr
    assert "not healthy" not in run.stderr, run.stderr
    if argument == "--help":
        assert run.stdout.startswith("usage: financing health-check"), run.stdout
    else:
        assert "unrecognized arguments: --verbose" in run.stderr, run.stderr


# A command whose output outgrows what a pipe holds, as a long listing does.
WRITES_MORE_THAN_A_PIPE_HOLDS = """
from financing.entrypoints.cli import commands
def listing(argv, *, overrides):
    for number in range(100_000):
        print(f"dead letter {number}")
commands._run = listing
commands.run([])
"""


def test_output_whose_reader_has_gone_ends_the_command_quietly() -> None:
    """Regression: `financing dead-letters list | head -3` ended with an "uncaught
    exception" line and a BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        run = subprocess.run(
            [sys.executable, "-c", WRITES_MORE_THAN_A_PIPE_HOLDS],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
    finally:
        os.close(write_end)
    assert run.returncode == 128 + signal.SIGPIPE, run.stderr
    assert run.stderr == ""


def test_the_commands_named_by_two_words_are_those_of_the_groups() -> None:
    """A signal before the command line is parsed names the command as its two words
    (`financing projections rebuild: stopped by SIGTERM`) for these groups alone."""
    assert set(COMMAND_GROUPS) == {words[0] for words in READS if len(words) == 2}


@pytest.mark.parametrize("command", ["serve", "status"])
def test_a_signal_while_importing_stops_the_command_though_its_log_is_full(
    command: str,
) -> None:
    """Regression (a probe): its log a pipe already full, its reader stopped, a SIGTERM in
    the second the modules take to import left the process waiting to write its one
    line until the reader read again."""
    reader, writer = os.pipe()
    own = os.open(f"/proc/self/fd/{writer}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        with contextlib.suppress(BlockingIOError):
            for chunk in (b"\n" * 4096, b"\n"):
                while True:
                    os.write(own, chunk)
        started = subprocess.Popen(
            [sys.executable, "-c", SIGNALLED_WHILE_IMPORTING, "SIGTERM", command],
            stdout=subprocess.DEVNULL,
            stderr=writer,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        try:
            code = started.wait(timeout=30)
        finally:
            started.kill()
    finally:
        for fd in (own, reader, writer):
            os.close(fd)
    assert code == (0 if command == "serve" else 143)
