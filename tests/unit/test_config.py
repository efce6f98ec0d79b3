from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from financing.adapters.rabbitmq import connection as connection_module
from financing.adapters.rabbitmq.connection import describe_url
from financing.config import (
    AMQP_ADDRESS,
    DEFAULT_AMQP,
    ConfigError,
    Database,
    Settings,
    parse_address,
    parse_database,
)

SECRET = "s3cr3t-Pa55"


def kwargs(value: str) -> dict[str, Any]:
    return dict(parse_database(value).connect_kwargs)


# Defaults (docs/contract.md section 3)


def test_defaults_match_the_reference() -> None:
    settings = Settings.from_env({})
    assert settings.command_address == ("0.0.0.0", 8080)
    assert settings.query_address == ("0.0.0.0", 8081)
    assert settings.amqp_url == DEFAULT_AMQP == "amqp://guest:guest@localhost:5672/"
    assert settings.log_level == "INFO"
    assert settings.command_db.connect_kwargs["database"] == "postgres"
    assert settings.query_db.connect_kwargs["database"] == "queries"
    for db in (settings.command_db, settings.query_db):
        assert db.connect_kwargs["port"] == 5432
        assert db.connect_kwargs["host"] in ("127.0.0.1", "localhost")


def test_variables_set_to_the_empty_string_count_as_unset() -> None:
    names = [
        "COMMAND_SERVER_ADDRESS",
        "QUERY_SERVER_ADDRESS",
        "COMMAND_DB_CONNECTION_STRING",
        "QUERY_DB_CONNECTION_STRING",
        "AMQP_ADDRESS",
        "LOGGER_LEVEL",
    ]
    assert Settings.from_env(dict.fromkeys(names, "")) == Settings.from_env({})


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "COMMAND_SERVER_ADDRESS": "127.0.0.1:9080",
            "QUERY_SERVER_ADDRESS": ":9081",
            "COMMAND_DB_CONNECTION_STRING": "postgresql://app@db:6432/commands",
            "QUERY_DB_CONNECTION_STRING": "host=db dbname=reads user=app",
            "AMQP_ADDRESS": "amqp://u:p@rabbit:5672/financing",
            "LOGGER_LEVEL": "debug",
        }
    )
    assert settings.command_address == ("127.0.0.1", 9080)
    assert settings.query_address == ("0.0.0.0", 9081)
    assert settings.command_db.connect_kwargs["database"] == "commands"
    assert settings.query_db.connect_kwargs["database"] == "reads"
    assert settings.amqp_url == "amqp://u:p@rabbit:5672/financing"
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    "level", ["DEBUG", "INFO", "WARNING", "ERROR", "warning", "WARN", "FATAL", "fatal"]
)
def test_a_known_logger_level_is_accepted(level: str) -> None:
    """FATAL too: the reference takes it (only what stops the service is written)."""
    accepted = Settings.from_env({"LOGGER_LEVEL": level}).log_level
    assert accepted == {"WARN": "WARNING"}.get(level, level.upper())


@pytest.mark.parametrize("level", ["VERBOSE", "trace", "5"])
def test_an_unknown_logger_level_is_a_config_error(level: str) -> None:
    """Regression (a probe): the error quoted the value upper-cased, which the operator
    had not written, and left out WARN, which is taken."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"LOGGER_LEVEL": level})
    assert str(caught.value) == (
        "LOGGER_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, FATAL (WARN for WARNING),"
        f" in any letter case, got {level!r}"
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FINANCING_SNAPSHOT_INTERVAL", "0"),
        ("FINANCING_SNAPSHOT_INTERVAL", "often"),
        ("FINANCING_STARTUP_TIMEOUT", "0"),
        ("FINANCING_STARTUP_TIMEOUT", "soon"),
        ("FINANCING_DB_TIMEOUT", "0"),
        ("FINANCING_DB_TIMEOUT", "-5"),
        ("FINANCING_DB_TIMEOUT", "a while"),
        # PostgreSQL refused every session given a timeout beyond its 32-bit milliseconds.
        ("FINANCING_DB_TIMEOUT", "30d"),
        # Dates reckoned from it overflowed: the retention stopped the service (exit 1).
        ("FINANCING_DEDUP_RETENTION", "3000000d"),
        ("FINANCING_AGGREGATE_WAIT", "99999999999d"),
    ],
)
def test_a_bad_tuning_variable_is_a_config_error(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize(
    ("name", "longest", "too_long"),
    [
        # README: durations are at most 36500d; the database's timeouts, PostgreSQL's own
        # limit of 2,147,483 s (its 32-bit milliseconds).
        ("FINANCING_DEDUP_RETENTION", "36500d", "36501d"),
        ("FINANCING_AGGREGATE_WAIT", "36500d", "36501d"),
        ("FINANCING_DB_TIMEOUT", "2147483", "2147484s"),
        # Regression: 400 digits overflowed the start-up's deadline (a traceback, exit 1).
        ("FINANCING_STARTUP_TIMEOUT", str(36500 * 86400), "9" * 400),
    ],
)
def test_a_duration_is_taken_up_to_its_limit_and_refused_beyond(
    name: str, longest: str, too_long: str
) -> None:
    Settings.from_env({name: longest})
    with pytest.raises(ConfigError, match=f"{name} may be at most"):
        Settings.from_env({name: too_long})


def test_the_amqp_address_may_list_several_brokers_separated_by_commas() -> None:
    settings = Settings.from_env({"AMQP_ADDRESS": "amqp://a:5672/, amqp://b:5672/,"})
    assert settings.amqp_urls == ["amqp://a:5672/", "amqp://b:5672/"]


def test_one_amqp_address_is_one_broker() -> None:
    assert Settings.from_env({}).amqp_urls == [DEFAULT_AMQP]


# Listen addresses


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),
        ("localhost:1", ("localhost", 1)),
        (":8081", ("0.0.0.0", 8081)),
        ("[::1]:50051", ("::1", 50051)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
    ],
)
def test_a_listen_address_is_host_and_port(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["8080", "host:", "host:http", "host:-1", ""])
def test_a_listen_address_without_a_valid_port_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError, match="host:port"):
        parse_address(address)


def test_a_listen_address_with_a_port_out_of_range_says_so() -> None:
    """Regression (a probe): said only "must be host:port", which it was."""
    with pytest.raises(ConfigError, match="a port is at most 65535, got 'host:99999'"):
        parse_address("host:99999")


def test_a_connection_string_of_another_scheme_names_the_scheme_and_nothing_after() -> None:
    """Regression (a probe): read as libpq keywords, it was said to lack `key=value` at
    character 0."""
    with pytest.raises(ConfigError) as raised:
        parse_database(f"mysql://app:{SECRET}@db/x")
    assert str(raised.value) == (
        "connection string: a URL's scheme must be postgresql:// or postgres://, got 'mysql'"
    )


@pytest.mark.parametrize(
    "variable", ["COMMAND_SERVER_ADDRESS", "QUERY_SERVER_ADDRESS", "METRICS_ADDRESS"]
)
def test_a_bad_listen_address_is_named_by_its_variable(variable: str) -> None:
    with pytest.raises(ConfigError, match=f"^{variable} must be host:port, got 'bad'"):
        Settings.from_env({variable: "bad"})


@pytest.mark.parametrize("variable", ["COMMAND_DB_CONNECTION_STRING", "QUERY_DB_CONNECTION_STRING"])
@pytest.mark.parametrize(
    "value", ["postgresql://db:port/x", "host=db port=x", "host=db pool_max_conns=0", "host='db"]
)
def test_a_bad_connection_string_is_named_by_its_variable(variable: str, value: str) -> None:
    """Regression: both databases' errors said "connection string", not which one."""
    with pytest.raises(ConfigError, match=f"^{variable}: ") as raised:
        Settings.from_env({variable: value})
    assert "port=x" not in str(raised.value) and "'db" not in str(raised.value)


# Connection strings: URLs


def test_a_url_gives_the_driver_its_keywords() -> None:
    db = parse_database(f"postgresql://app:{SECRET}@db.example:6432/financing")
    assert dict(db.connect_kwargs) == {
        "host": "db.example",
        "port": 6432,
        "user": "app",
        "password": SECRET,
        "database": "financing",
    }
    assert db.pool_max_size == 10


def test_a_url_password_is_percent_decoded() -> None:
    assert kwargs("postgres://app:p%40ss%20w%3Ard@db/x")["password"] == "p@ss w:rd"


def test_a_url_sizes_the_pool_with_pool_max_conns() -> None:
    db = parse_database("postgresql://app@db/x?pool_max_conns=3&sslmode=disable")
    assert db.pool_max_size == 3
    assert "pool_max_conns" not in db.connect_kwargs
    assert db.connect_kwargs["ssl"] is False


def test_url_query_values_are_percent_decoded() -> None:
    assert kwargs("postgresql://app@/x?host=%2Fvar%2Frun%2Fpostgresql")["host"] == (
        "/var/run/postgresql"
    )


def test_a_url_host_may_be_a_percent_encoded_socket_directory_as_libpq_reads_it() -> None:
    assert kwargs("postgresql://app@%2Fvar%2Frun%2FPostgreSQL/x")["host"] == ("/var/run/PostgreSQL")
    assert kwargs("postgresql://app@[::1]:6432/x")["host"] == "::1"


def test_a_plus_in_a_url_query_is_a_plus_as_libpq_reads_it() -> None:
    assert kwargs("postgresql://app@db/x?password=a+b%2Bc")["password"] == "a+b+c"


def test_hostaddr_is_where_to_connect_whatever_the_order_of_the_keys() -> None:
    for value in (
        "hostaddr=127.0.0.1 host=db.invalid dbname=x",
        "host=db.invalid hostaddr=127.0.0.1 dbname=x",
    ):
        assert kwargs(value)["host"] == "127.0.0.1"


def test_a_url_without_a_database_names_the_user_database_as_libpq_does() -> None:
    assert kwargs("postgresql://alice@db")["database"] == "alice"


@pytest.mark.parametrize(
    "value",
    ["postgresql://app@db:port/x", "postgresql://app@db/x?pool_max_conns=0"],
)
def test_a_malformed_url_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_database(value)


def test_a_url_naming_several_servers_is_refused_for_that() -> None:
    with pytest.raises(ConfigError, match="several servers"):
        parse_database("postgresql://app@db1:5432,db2:5432/x")


def test_a_comma_elsewhere_in_a_url_names_no_second_server() -> None:
    assert kwargs("postgresql://app:pa,ss@db/x")["password"] == "pa,ss"
    assert kwargs("postgresql://app@db?password=a,b&dbname=x")["password"] == "a,b"


def test_an_empty_value_in_a_url_query_is_none_as_libpq_reads_it() -> None:
    assert kwargs("postgresql://app@db/x?port=&sslmode=")["port"] == 5432


def test_a_connect_timeout_of_0_leaves_the_attempt_to_the_database_timeout() -> None:
    """libpq's 0 is no timeout of its own; asyncpg's 0 gave up at once."""
    assert "timeout" not in kwargs("host=db dbname=x connect_timeout=0")
    assert kwargs("host=db dbname=x connect_timeout=2.5")["timeout"] == 2.5


@pytest.mark.parametrize(
    "value",
    ["postgresql://app@db/x?sslmode=bogus", "host=db dbname=x sslmode=REQUIRE"],
)
def test_an_sslmode_libpq_does_not_have_is_a_config_error(value: str) -> None:
    """Regression: the driver refused it only when connecting, an outage's exit code (1)
    rather than a configuration error's (2)."""
    with pytest.raises(ConfigError, match="sslmode must be one of disable, allow, prefer"):
        parse_database(value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PGSSLMODE", "bogus"),
        ("PGSSLMODE", ""),
        ("PGTARGETSESSIONATTRS", "bogus"),
        ("PGSSLNEGOTIATION", "bogus"),
        ("PGSSLMINPROTOCOLVERSION", "SSLv3"),
        ("PGSSLMAXPROTOCOLVERSION", "bogus"),
    ],
)
def test_a_driver_variable_of_a_value_libpq_does_not_take_is_a_config_error_naming_it(
    variable: str, value: str
) -> None:
    """Regression (probes): the driver reads these itself and refused a wrong one only
    when connecting, said to be the database's refusal, without naming the variable:
    `serve` exited 2 on a line that named none, `check` 1 as for an outage."""
    with pytest.raises(ConfigError, match=f"^{variable} must be one of "):
        Settings.from_env({variable: value})
    # A command that opens no database is not stopped by it.
    Settings.from_env({variable: value}, reads=[AMQP_ADDRESS])


def test_the_driver_variables_take_what_libpq_takes() -> None:
    taken = {
        "PGSSLMODE": "verify-full",
        "PGTARGETSESSIONATTRS": "prefer-standby",
        "PGSSLNEGOTIATION": "direct",
        "PGSSLMINPROTOCOLVERSION": "TLSv1.2",
        "PGSSLMAXPROTOCOLVERSION": "TLSv1.3",
    }
    assert Settings.from_env(taken) == Settings.from_env({})
    # Empty, the TLS versions are unset, for libpq and the driver alike (a review).
    unset = {"PGSSLMINPROTOCOLVERSION": "", "PGSSLMAXPROTOCOLVERSION": ""}
    assert Settings.from_env(unset) == Settings.from_env({})


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer", "require", "verify-ca"])
def test_each_sslmode_of_libpq_is_taken(mode: str) -> None:
    assert "ssl" in kwargs(f"host=db dbname=x sslmode={mode}")


@pytest.mark.parametrize(
    ("value", "settings"),
    [
        ("host=db options=-csearch_path=financing", {"search_path": "financing"}),
        (
            "host=db options='-c search_path=app,public -c work_mem=64MB'",
            {"search_path": "app,public", "work_mem": "64MB"},
        ),
        (
            "postgresql://app@db/x?options=-c%20search_path%3Dfinancing",
            {"search_path": "financing"},
        ),
        ("host=db options=--search-path=financing", {"search_path": "financing"}),
        (r"host=db options='-c search_path=a\\ b'", {"search_path": "a b"}),
        # A backslash at the end is taken for nothing, as the server takes it.
        (r"host=db options='-csearch_path=fin\\'", {"search_path": "fin"}),
        # Only ASCII whitespace splits, as the server splits.
        ("host=db options='-csearch_path=a\u00a0b'", {"search_path": "a\u00a0b"}),
    ],
)
def test_options_sets_server_settings_as_libpq_sends_them(
    value: str, settings: dict[str, str]
) -> None:
    """Regression: `options` was refused as an unknown key, while the service's own
    errors about a schema told the operator to set search_path with it."""
    assert kwargs(value)["server_settings"] == settings


@pytest.mark.parametrize("value", ["host=db options=-B", "host=db options='-c search_path'"])
def test_options_other_than_settings_are_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="options holds something other than settings"):
        parse_database(value)


# Connection strings: libpq keywords


def test_the_reference_compose_connection_string_is_understood() -> None:
    db = parse_database(
        "user=postgres password=postgres host=postgres port=5432 dbname=postgres pool_max_conns=10"
    )
    assert dict(db.connect_kwargs) == {
        "host": "postgres",
        "port": 5432,
        "user": "postgres",
        "password": "postgres",
        "database": "postgres",
    }
    assert db.pool_max_size == 10


def test_pool_max_conns_sizes_the_pool() -> None:
    assert parse_database("host=db pool_max_conns=25").pool_max_size == 25


def test_a_quoted_value_may_hold_spaces_and_escaped_quotes() -> None:
    assert kwargs(r"password='my pa\'ss \\ word' host=db")["password"] == r"my pa'ss \ word"


def test_a_bare_value_honours_backslash_escapes() -> None:
    assert kwargs(r"password=a\ b\\c")["password"] == "a b\\c"


def test_an_empty_quoted_value_is_empty() -> None:
    assert kwargs("password='' host=db")["password"] == ""


def test_spaces_around_the_equals_sign_are_allowed() -> None:
    assert kwargs("host = db  port= 6432 dbname =x")["port"] == 6432


def test_keywords_default_as_libpq_does() -> None:
    assert kwargs("user=alice") == {
        "host": "127.0.0.1",
        "port": 5432,
        "user": "alice",
        "database": "alice",
    }


@pytest.mark.parametrize(
    "value",
    [
        "user=postgres host=db db_name=financing",  # misspelt: libpq refuses it too
        "user=postgres host=db database=financing",  # the driver's name, not libpq's
        "host=db dbname=financing sslmod=require",
        "host=db dbname=financing sslrootcert=/ca.pem",  # libpq's, not read here
        "postgresql://postgres@db/financing?sslmod=require",
    ],
)
def test_a_key_the_service_does_not_read_is_refused_by_name(value: str) -> None:
    """Regression: such keys were dropped without a word, so a misspelt `dbname` left
    the service on the user's default database, where it created its tables."""
    with pytest.raises(ConfigError, match="unknown or unsupported key") as raised:
        parse_database(value)
    assert repr(value.replace("?", " ").split()[-1].split("=")[0]) in str(raised.value)


@pytest.mark.parametrize(
    "value",
    [
        "host=db password='unterminated",
        "host=db port=abc",
        "host=db pool_max_conns=zero",
        "host=db pool_max_conns=0",
        # asyncpg sets up every session of the pool at start-up: the process hung, growing.
        "host=db pool_max_conns=99999999999999999999",
        "host=db =value",
        "host=db port=65536",
        "host=db port=-5",
        "host=db connect_timeout=nan",
        "host=db connect_timeout=-1",
        "host=db connect_timeout=soon",
        "host=db connect_timeout=inf",
        "host=db1,db2 dbname=x",
    ],
)
def test_a_malformed_keyword_string_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_database(value)


def test_a_malformed_keyword_string_error_quotes_no_part_of_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_database(f"host=db password={SECRET[:4]} {SECRET[4:]}")
    assert SECRET[4:] not in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [
        # A bare password holding a space: libpq reads what follows as more keys.
        "host=db user=app password=correct S3CRETfragment=battery dbname=x",
        "host=db password=S3CRETa sslmode=S3CRETfragment",
        "host=db password=S3CRETa port=S3CRETfragment",
        "host=db password=S3CRETa connect_timeout=S3CRETfragment",
        "host=db password=S3CRETa pool_max_conns=S3CRETfragment",
        # A URL's password holding '&' and '=': the rest reads as more parameters.
        "postgresql://app@db/x?password=Xy7pQ&S3CRETfragment=Lm2",
        "postgresql://app@db/x?password=Xy7pQ&sslmode=S3CRETfragment",
        "postgresql://app@db/x?password=Xy7pQ&pool_max_conns=S3CRETfragment",
    ],
)
def test_a_refused_key_or_value_after_the_password_is_not_quoted(value: str) -> None:
    """Regression: the part of a password after a space (or a URL's '&') was named as an
    unknown key, or its value quoted, in the configuration error."""
    with pytest.raises(ConfigError) as caught:
        parse_database(value)
    assert "S3CRET" not in str(caught.value)
    assert "after the password" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("user=postgres password=x host=db pool_max_conns=5 pool_min_conns=1", "pool_min_conns"),
        ("postgresql://app@db/x?password=Xy7pQ&application_name=ref", "application_name"),
    ],
)
def test_a_key_of_libpq_or_pgx_the_service_does_not_read_is_named_wherever_it_is(
    value: str, key: str
) -> None:
    """Regression (a probe): a key the reference's driver reads (`pool_min_conns`) after
    the password, as the reference's connection strings put them, was said to be "close
    to 'pool_max_conns'", as if misspelt."""
    with pytest.raises(ConfigError) as caught:
        parse_database(value)
    said = str(caught.value)
    assert f"unknown or unsupported key(s): {key!r} (libpq's or pgx's, not read by the" in said
    assert "not shown" not in said


@pytest.mark.parametrize(
    ("value", "misspelt", "close"),
    [
        ("user=postgres password=x host=db dbnme=q", "dbnme", "dbname"),
        ("user=postgres password=x host=db SSLMODE=require", "SSLMODE", "sslmode"),
        ("postgresql://app@db/x?password=Xy7pQ&pool_max_con=4", "pool_max_con", "pool_max_conns"),
    ],
)
def test_a_misspelt_key_after_the_password_is_said_close_to_the_key_it_resembles(
    value: str, misspelt: str, close: str
) -> None:
    """Regression (a probe): a misspelt key after a bare password, as the README's example
    writes them, was refused naming nothing, in a garbled sentence."""
    with pytest.raises(ConfigError) as caught:
        parse_database(value)
    said = str(caught.value)
    assert f"unknown or unsupported key(s): a key after the password close to {close!r};" in said
    assert said.endswith(
        "a key after the password is not shown: the password may hold it;"
        " quote a password that holds spaces, password='...', and"
        " percent-encode '&' and '=' in a URL's"
    )
    assert repr(misspelt) not in said


@pytest.mark.parametrize(
    "value",
    [
        "host=127.0.0.1 user=u password=correct user=S3CRETfragment dbname=x",
        "host=127.0.0.1 user=u password=correct host=S3CRETfragment dbname=x",
        "host=127.0.0.1 user=u dbname=x password=correct dbname=S3CRETfragment",
        "postgresql://u@127.0.0.1/db?password=Xy7pQ&dbname=S3CRETfragment",
        "postgresql://u@127.0.0.1/db?password=Xy7pQ&user=S3CRETfragment",
        "postgresql://u@127.0.0.1:5433/db?password=Xy7pQ&port=S3CRETfragment",
    ],
)
def test_a_key_given_again_after_the_password_is_refused_without_its_value(value: str) -> None:
    """Regression: the part of a password after a space that read as a key given before
    (`user=`, `host=`, `dbname=`) replaced it, and its value named the role, the host or
    the database in every error and in `status`."""
    with pytest.raises(ConfigError, match="is given again after the password") as caught:
        parse_database(value)
    assert "S3CRET" not in str(caught.value)


def test_a_key_after_the_password_that_was_not_given_before_is_taken() -> None:
    assert kwargs("user=u password=secret host=db dbname=x")["host"] == "db"
    assert kwargs("postgresql://db/x?password=secret&user=u")["user"] == "u"


def test_a_refused_key_before_the_password_or_after_a_quoted_one_is_still_named() -> None:
    with pytest.raises(ConfigError, match="'db_name'"):
        parse_database("host=db db_name=x password=secret")
    with pytest.raises(ConfigError, match="'db_name'"):
        parse_database("host=db password='two words' db_name=x")
    with pytest.raises(ConfigError, match="'sslmod'"):
        parse_database("postgresql://app:secret@db/x?sslmod=require")


# Passwords never appear in logs


def test_the_password_never_appears_in_the_representation_of_the_settings() -> None:
    settings = Settings.from_env(
        {
            "COMMAND_DB_CONNECTION_STRING": f"postgresql://app:{SECRET}@db/commands",
            "QUERY_DB_CONNECTION_STRING": f"host=db user=app password='{SECRET}' dbname=q",
            "AMQP_ADDRESS": f"amqp://app:{SECRET}@rabbit:5672/",
        }
    )
    for text in (repr(settings), str(settings), repr(settings.command_db), str(settings.query_db)):
        assert SECRET not in text
    assert settings.command_db.connect_kwargs["password"] == SECRET
    assert settings.query_db.connect_kwargs["password"] == SECRET
    assert "app@db:5432/commands" in settings.command_db.describe()


def test_a_database_turns_back_into_a_url_with_its_password() -> None:
    db = parse_database(f"host=db port=6432 user=app password='{SECRET} x' dbname=financing")
    assert parse_database(db.dsn()) == db


def test_another_database_on_the_same_server_keeps_everything_else() -> None:
    db = replace(
        parse_database(f"postgresql://app:{SECRET}@db:6432/a?pool_max_conns=4"), answer_timeout=3
    )
    other = db.with_database("b")
    assert other == Database({**db.connect_kwargs, "database": "b"}, 4, 3)


def test_both_databases_get_ten_seconds_to_answer_unless_told_otherwise() -> None:
    default = Settings.from_env({})
    assert default.command_db.answer_timeout == default.query_db.answer_timeout == 10
    told = Settings.from_env({"FINANCING_DB_TIMEOUT": "1m"})
    assert told.command_db.answer_timeout == told.query_db.answer_timeout == 60
    assert Settings.from_env({"FINANCING_DB_TIMEOUT": "3"}).query_db.answer_timeout == 3


# Queue type (quorum queues for a clustered broker)


def test_an_unknown_component_is_named_with_its_variable() -> None:
    with pytest.raises(ConfigError, match=r"^FINANCING_COMPONENTS: unknown component"):
        Settings.from_env({"FINANCING_COMPONENTS": "bogus"})


def test_queues_are_classic_unless_quorum_is_asked_for() -> None:
    assert Settings.from_env({}).queue_type == "classic"
    assert Settings.from_env({"FINANCING_QUEUE_TYPE": "quorum"}).queue_type == "quorum"
    assert Settings.from_env({"FINANCING_QUEUE_TYPE": " Quorum "}).queue_type == "quorum"


@pytest.mark.parametrize("value", ["stream", "quorum,classic", "mirrored"])
def test_an_unknown_queue_type_is_a_config_error_naming_the_choices(value: str) -> None:
    with pytest.raises(ConfigError, match="FINANCING_QUEUE_TYPE must be one of classic, quorum"):
        Settings.from_env({"FINANCING_QUEUE_TYPE": value})


# Broker URLs


@pytest.mark.parametrize(
    "address",
    [
        f"amqp://guest:{SECRET}@rabbit:99999/",  # a port out of range
        f"amqp://guest:{SECRET}@rabbit:port/",
        f"ampq://guest:{SECRET}@rabbit/",  # a misspelt scheme
        f"amqp://guest:{SECRET}@/",  # no host
        f"amqp://guest:12/{SECRET}@rabbit/",  # unencoded '/' in the password
        f"amqp://guest:77#{SECRET}@rabbit:5672/",  # unencoded '#'
        f"amqp://guest:{SECRET}#x@rabbit:5672/",
        f"amqp://guest:a?{SECRET}@rabbit/",  # unencoded '?'
        f"amqp://guest:{SECRET}\uff20x@rabbit:5672/v",  # a character NFKC makes '@'
        f"amqp://guest:{SECRET}@[::1:5672/",  # an IPv6 address left open
        f"amqp://guest:guest@rabbit/, amqp://guest:{SECRET}@other:99999/",  # the second
        " , ",
        # What the AMQP client refuses where urlsplit does not: found only at the first
        # failover to that broker, which stopped a running service (exit 1).
        f"amqp://guest:{SECRET}\\x@rabbit:5672/v",  # an unencoded backslash
        f"amqp://guest:guest@rabbit/, amqp://guest:{SECRET}\\x@standby/",
        f"amqp://guest:{SECRET}@xn--a:5672/v",  # a host IDNA cannot decode
    ],
)
def test_a_broker_url_that_cannot_be_read_as_written_is_a_config_error_that_hides_it(
    address: str,
) -> None:
    """Regression: such a URL reached the broker client, which raised a bug (exit 1, a
    traceback), and the password could be shown where the URL was described."""
    with pytest.raises(ConfigError) as error:
        Settings.from_env({"AMQP_ADDRESS": address})
    assert "AMQP_ADDRESS" in str(error.value)
    assert SECRET not in str(error.value)


def test_broker_urls_with_an_encoded_password_or_several_brokers_are_taken() -> None:
    address = "amqps://app:p%2F%23%3F%40ss@rabbit:5671/v, amqp://app:x@other/"
    assert Settings.from_env({"AMQP_ADDRESS": address}).amqp_urls == [
        "amqps://app:p%2F%23%3F%40ss@rabbit:5671/v",
        "amqp://app:x@other/",
    ]


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://postgres:12/{SECRET}@db:5432/postgres",  # an unencoded '/'
        f"postgresql://postgres:12\uff0f{SECRET}@db:5432/postgres",  # NFKC makes it '/'
        f"postgresql://postgres:{SECRET}@[::1:5432/postgres",  # an IPv6 address left open
    ],
)
def test_a_database_url_that_cannot_be_read_as_written_is_refused_unshown(url: str) -> None:
    """Regression: the last two raised urllib's ValueError, a bug (exit 1, a traceback
    that could show the password)."""
    with pytest.raises(ConfigError) as error:
        parse_database(url)
    assert SECRET not in str(error.value)


def test_a_broker_url_that_cannot_be_read_is_never_described_with_its_parts() -> None:
    assert describe_url(f"amqp://guest:{SECRET}#x@rabbit:5672/") == (
        "(a broker URL that cannot be read)"
    )
    assert describe_url(f"amqp://guest:{SECRET}@rabbit:5672/v") == "amqp://rabbit:5672/v"


@pytest.mark.parametrize(
    "query",
    [
        "heartbeat=abc",
        "heartbeat=10s",
        "heartbeat=",
        "frame_max=-1",
        # The AMQP client turns a heartbeat of 65535 or more into none at all.
        "heartbeat=65535",
        "heartbeat=99999999",
        "channel_max=65536",
        "frame_max=4294967296",
    ],
)
def test_a_broker_url_setting_a_number_that_is_none_is_a_config_error(query: str) -> None:
    """Regression: `heartbeat=abc` (or a typo such as `10s`) was read by the AMQP client
    as 0, which turned heartbeats off without a word: a frozen broker went unnoticed."""
    with pytest.raises(ConfigError, match=f"AMQP_ADDRESS: {query.split('=')[0]} must be"):
        Settings.from_env({"AMQP_ADDRESS": f"amqp://app:{SECRET}@rabbit:5672/v?{query}"})


def test_a_broker_url_may_set_its_heartbeat_and_turn_it_off() -> None:
    for query in ("heartbeat=10", "heartbeat=0&frame_max=131072&name=financing"):
        address = f"amqp://app:x@rabbit:5672/v?{query}"
        assert Settings.from_env({"AMQP_ADDRESS": address}).amqp_urls == [address]


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("ca_file=/etc/ca.pem", "unknown key(s) in a broker URL: 'ca_file' (close to 'cafile')"),
        ("connection_attempts=3", "unknown key(s) in a broker URL: 'connection_attempts'"),
    ],
)
def test_a_broker_url_key_the_service_does_not_read_is_a_config_error(
    query: str, said: str
) -> None:
    """Regression: a key the service does not read was dropped: a misspelt `cacertfile`
    left the broker's certificate to be checked against the system's CAs."""
    with pytest.raises(ConfigError) as error:
        Settings.from_env({"AMQP_ADDRESS": f"amqps://app:{SECRET}@rabbit:5671/v?{query}"})
    assert said in str(error.value)
    assert SECRET not in str(error.value)


def test_tls_settings_on_a_plaintext_broker_url_are_a_config_error(tmp_path: Path) -> None:
    """Regression: `amqp://...?cafile=...&certfile=...` connected without TLS, silently."""
    address = f"amqp://app:{SECRET}@rabbit:5672/v?cafile={tmp_path}/ca.pem"
    with pytest.raises(ConfigError, match=r"cafile set on an amqp:// URL.*use amqps://"):
        Settings.from_env({"AMQP_ADDRESS": address})


@pytest.fixture
def broker_files(tmp_path: Path) -> dict[str, str]:
    """A CA, and a client certificate and key another CA issued, in files."""
    ca, client = trustme.CA(), trustme.CA().issue_cert("financing")
    paths = {name: str(tmp_path / f"{name}.pem") for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    client.cert_chain_pems[0].write_to_path(paths["cert"])
    client.private_key_pem.write_to_path(paths["key"])
    return paths


def amqps(query: str) -> str:
    return f"amqps://app:{SECRET}@rabbit:5671/v?{query}"


def test_a_broker_urls_tls_files_are_read_at_start_up(broker_files: dict[str, str]) -> None:
    files = broker_files
    for query in (
        f"cacertfile={files['ca']}&certfile={files['cert']}&keyfile={files['key']}",
        f"cafile={files['ca']}",  # the AMQP client's name for it
        f"cacertfile={files['ca']}&certfile={files['cert']}&keyfile={files['key']}"
        "&auth_mechanism=external",
    ):
        assert Settings.from_env({"AMQP_ADDRESS": amqps(query)}).amqp_urls == [amqps(query)]


def test_broker_tls_files_that_cannot_be_used_stop_start_up_naming_the_setting(
    broker_files: dict[str, str], tmp_path: Path
) -> None:
    """Regression: a missing CA file, a key that is not the certificate's, or one that
    is encrypted, was an outage of the broker retried for the whole start-up budget,
    said as `FileNotFoundError`, `PEM lib` or `KEY_VALUES_MISMATCH` with no file named;
    the encrypted key had OpenSSL ask for its pass phrase on the terminal."""
    files, missing = broker_files, tmp_path / "missing.pem"
    other = trustme.CA().issue_cert("financing")
    other.private_key_pem.write_to_path(tmp_path / "other.key")
    key = serialization.load_pem_private_key(other.private_key_pem.bytes(), password=None)
    (tmp_path / "encrypted.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass phrase"),
        )
    )
    pair = f"cacertfile={files['ca']}&certfile={files['cert']}"
    for query, said in [
        (f"cacertfile={missing}", f"cacertfile: cannot read {missing}"),
        (f"cacertfile={files['key']}", "cacertfile: "),
        (f"{pair}&keyfile={tmp_path}/other.key", "keyfile: the private key in"),
        (f"{pair}&keyfile={tmp_path}/encrypted.key", "is encrypted"),
        (f"certfile={files['cert']}", "certfile and keyfile go together"),
        ("verify=yes", "verify must be verify_peer or verify_none"),
        ("auth_mechanism=external", "auth_mechanism=external logs in with the client cert"),
        ("auth_mechanism=kerberos", "auth_mechanism must be one of plain, external"),
    ]:
        with pytest.raises(ConfigError) as error:
            Settings.from_env({"AMQP_ADDRESS": amqps(query)})
        assert str(error.value).startswith("AMQP_ADDRESS: "), query
        assert said in str(error.value), (query, str(error.value))
        assert SECRET not in str(error.value)


def test_the_amqp_client_is_given_the_url_without_its_tls_files() -> None:
    url = amqps("cacertfile=/ca.pem&certfile=/c.pem&keyfile=/k.pem&auth_mechanism=EXTERNAL")
    given = connection_module._client_url(url, "financing")
    assert dict(given.query) == {"auth": "external", "heartbeat": "10", "name": "financing"}
