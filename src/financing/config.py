"""Settings, read once at start-up from the environment (docs/contract.md section 3)."""

from __future__ import annotations

import difflib
import math
import os
import re
import ssl
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlsplit, urlunsplit

from yarl import URL

from financing.tls_files import UnusableFiles, load_authorities, load_key_pair, unreadable

DEFAULT_COMMAND_DB = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_QUERY_DB = "postgresql://postgres@127.0.0.1:5432/queries"
DEFAULT_AMQP = "amqp://guest:guest@localhost:5672/"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "FATAL")
# What `financing serve` can run, alone or together (docs/architecture.md).
COMPONENTS = (
    "commands-api",
    "queries-api",
    "commands",
    "integration",
    "policies",
    "relayer",
    "projector",
)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Variable:
    """An environment variable, its default and what it sets (for --help and errors)."""

    name: str
    default: str
    meaning: str


COMMAND_SERVER_ADDRESS = Variable(
    "COMMAND_SERVER_ADDRESS", "0.0.0.0:8080", "gRPC Commands listen address"
)
QUERY_SERVER_ADDRESS = Variable(
    "QUERY_SERVER_ADDRESS", "0.0.0.0:8081", "gRPC Queries listen address"
)
COMMAND_DB = Variable("COMMAND_DB_CONNECTION_STRING", DEFAULT_COMMAND_DB, "event store database")
QUERY_DB = Variable("QUERY_DB_CONNECTION_STRING", DEFAULT_QUERY_DB, "read-model database")
AMQP_ADDRESS = Variable(
    "AMQP_ADDRESS", DEFAULT_AMQP, "broker URL, vhost included (several: comma-separated)"
)
LOGGER_LEVEL = Variable("LOGGER_LEVEL", "INFO", "log level: " + ", ".join(LOG_LEVELS))
SNAPSHOT_INTERVAL = Variable(
    "FINANCING_SNAPSHOT_INTERVAL", "100", "events between aggregate snapshots"
)
STARTUP_TIMEOUT = Variable(
    "FINANCING_STARTUP_TIMEOUT",
    "30",
    "seconds start-up waits for PostgreSQL and RabbitMQ (a whole number, at most"
    " 3153600000: 36500 days)",
)
DEDUP_RETENTION = Variable(
    "FINANCING_DEDUP_RETENTION",
    "7d",
    "how long processed message ids are kept to deduplicate redeliveries"
    " (7d, 12h, 90m, or seconds; at least 1h)",
)
AGGREGATE_WAIT = Variable(
    "FINANCING_AGGREGATE_WAIT",
    "1m",
    "how long a message naming an aggregate that does not exist yet (a bid whose investor"
    " is still being registered) waits for it, deferred, before it is dead-lettered"
    " (1m, 30s, or seconds)",
)
COMPONENTS_VARIABLE = Variable(
    "FINANCING_COMPONENTS",
    ",".join(COMPONENTS),
    "the components `serve` runs, comma-separated (--components overrides it)",
)
QUEUE_TYPES = ("classic", "quorum")
QUEUE_TYPE = Variable(
    "FINANCING_QUEUE_TYPE",
    "classic",
    "type of the queues the service declares: classic (as the reference's), or quorum"
    " (replicated across a RabbitMQ cluster)",
)
DB_TIMEOUT = Variable(
    "FINANCING_DB_TIMEOUT",
    "10",
    "how long PostgreSQL may take to answer a statement or a new connection before the"
    " database counts as unavailable (30s, 1m, or seconds)",
)
METRICS_ADDRESS = Variable(
    "METRICS_ADDRESS",
    "0.0.0.0:8082",
    "Prometheus /metrics and /health listen address (set empty: none)",
)
GRPC_TLS_CERT_FILE = Variable(
    "GRPC_TLS_CERT_FILE",
    "",
    "PEM certificate chain both gRPC ports serve TLS with (with GRPC_TLS_KEY_FILE; unset:"
    " plaintext)",
)
GRPC_TLS_KEY_FILE = Variable(
    "GRPC_TLS_KEY_FILE", "", "PEM private key of GRPC_TLS_CERT_FILE's certificate, unencrypted"
)
GRPC_TLS_CLIENT_CA_FILE = Variable(
    "GRPC_TLS_CLIENT_CA_FILE",
    "",
    "PEM CA certificates: when set, gRPC clients must present a certificate one of them"
    " issued (mutual TLS)",
)
GRPC_TLS_VARIABLES = (GRPC_TLS_CERT_FILE, GRPC_TLS_KEY_FILE, GRPC_TLS_CLIENT_CA_FILE)
VARIABLES = (
    COMMAND_SERVER_ADDRESS,
    QUERY_SERVER_ADDRESS,
    COMMAND_DB,
    QUERY_DB,
    AMQP_ADDRESS,
    LOGGER_LEVEL,
    SNAPSHOT_INTERVAL,
    STARTUP_TIMEOUT,
    DEDUP_RETENTION,
    AGGREGATE_WAIT,
    DB_TIMEOUT,
    METRICS_ADDRESS,
    COMPONENTS_VARIABLE,
    QUEUE_TYPE,
    *GRPC_TLS_VARIABLES,
)


@dataclass(frozen=True)
class Database:
    """A PostgreSQL connection: asyncpg keyword arguments, the pool size, and how long
    the server may take to answer (a statement, or a connection attempt unless the
    connection string sets its own `connect_timeout`)."""

    connect_kwargs: Mapping[str, Any]
    pool_max_size: int = 10
    answer_timeout: float = 10.0

    def dsn(self) -> str:
        """A `postgresql://` URL (with the password) for tools that want one."""
        kw = self.connect_kwargs
        auth = quote(str(kw.get("user", "postgres")), safe="")
        if kw.get("password"):
            auth += ":" + quote(str(kw["password"]), safe="")
        host = str(kw.get("host", "127.0.0.1"))
        netloc = f"{auth}@{host}:{kw.get('port', 5432)}"
        return urlunsplit(
            ("postgresql", netloc, "/" + quote(str(kw.get("database", "")), safe=""), "", "")
        )

    def __repr__(self) -> str:
        return (
            f"Database({self.describe()}, pool_max_size={self.pool_max_size},"
            f" answer_timeout={self.answer_timeout})"
        )

    def describe(self) -> str:
        """Where the database is, without the password: safe to log."""
        kw = self.connect_kwargs
        where = f"{kw.get('host', '')}:{kw.get('port', '')}/{kw.get('database', '')}"
        return f"{kw.get('user', '')}@{where}"

    def with_database(self, name: str) -> Database:
        return replace(self, connect_kwargs={**self.connect_kwargs, "database": name})


@dataclass(frozen=True)
class GrpcTls:
    """The files both gRPC ports serve TLS with (`entrypoints/grpc/tls.py`)."""

    cert_file: str
    key_file: str
    # Set: clients must present a certificate one of its CAs issued.
    client_ca_file: str | None = None


@dataclass(frozen=True)
class Settings:
    command_address: tuple[str, int] = ("0.0.0.0", 8080)
    query_address: tuple[str, int] = ("0.0.0.0", 8081)
    command_db: Database = field(default_factory=lambda: parse_database(DEFAULT_COMMAND_DB))
    query_db: Database = field(default_factory=lambda: parse_database(DEFAULT_QUERY_DB))
    amqp_url: str = field(default=DEFAULT_AMQP, repr=False)
    log_level: str = "INFO"
    snapshot_interval: int = 100
    # How long start-up waits for PostgreSQL and RabbitMQ before giving up.
    startup_timeout: float = 30.0
    # How long a consumer remembers a message id, so that a redelivery changes nothing.
    dedup_retention: timedelta = timedelta(days=7)
    # How long a delivery may wait for an aggregate another message creates (seconds).
    aggregate_wait: float = 60.0
    # Where /metrics is served; None: nowhere.
    metrics_address: tuple[str, int] | None = ("0.0.0.0", 8082)
    components: tuple[str, ...] = COMPONENTS
    # The type of every queue the service declares (QUEUE_TYPES).
    queue_type: str = "classic"
    # TLS on the gRPC ports; None: plaintext.
    grpc_tls: GrpcTls | None = None

    @property
    def amqp_urls(self) -> list[str]:
        """AMQP_ADDRESS may list several brokers, comma-separated: the first that answers."""
        return [url.strip() for url in self.amqp_url.split(",") if url.strip()]

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, reads: Iterable[Variable] | None = None
    ) -> Settings:
        """The settings the environment gives; with `reads`, only those variables are read
        and the others keep their defaults (an operator's command reads what its --help
        lists: a variable set for another one, even wrong, does not stop it)."""
        source = os.environ if env is None else env
        read = None if reads is None else {variable.name for variable in (*reads, LOGGER_LEVEL)}
        # As in the reference (Go's os.Getenv), a variable set to "" counts as unset.
        env = {
            key: value
            for key, value in source.items()
            if value != "" and (read is None or key in read)
        }

        def value(variable: Variable) -> str:
            return env.get(variable.name, variable.default)

        if read is None or {COMMAND_DB.name, QUERY_DB.name} & read:
            _check_driver_variables(source)
        given = value(LOGGER_LEVEL)
        level = given.upper()
        if level == "WARN":
            level = "WARNING"
        if level not in LOG_LEVELS:
            raise ConfigError(
                f"LOGGER_LEVEL must be one of {', '.join(LOG_LEVELS)} (WARN for WARNING), in"
                f" any letter case, got {given!r}"
            )
        answer_timeout = parse_duration(
            DB_TIMEOUT.name, value(DB_TIMEOUT), most=POSTGRES_TIMEOUT_MOST
        ).total_seconds()
        return cls(
            command_address=parse_address(
                value(COMMAND_SERVER_ADDRESS), COMMAND_SERVER_ADDRESS.name
            ),
            query_address=parse_address(value(QUERY_SERVER_ADDRESS), QUERY_SERVER_ADDRESS.name),
            command_db=replace(
                _named(COMMAND_DB, parse_database, value), answer_timeout=answer_timeout
            ),
            query_db=replace(
                _named(QUERY_DB, parse_database, value), answer_timeout=answer_timeout
            ),
            amqp_url=parse_amqp_urls(value(AMQP_ADDRESS)),
            log_level=level,
            snapshot_interval=_positive_int(SNAPSHOT_INTERVAL.name, value(SNAPSHOT_INTERVAL)),
            startup_timeout=_positive_int(
                STARTUP_TIMEOUT.name,
                value(STARTUP_TIMEOUT),
                most=int(DURATION_MOST.total_seconds()),
            ),
            dedup_retention=parse_duration(
                DEDUP_RETENTION.name, value(DEDUP_RETENTION), least=RETENTION_LEAST
            ),
            aggregate_wait=parse_duration(
                AGGREGATE_WAIT.name, value(AGGREGATE_WAIT)
            ).total_seconds(),
            # Unlike the other variables, an empty METRICS_ADDRESS means something: no endpoint.
            metrics_address=(
                None
                if source.get(METRICS_ADDRESS.name) == ""
                else parse_address(value(METRICS_ADDRESS), METRICS_ADDRESS.name)
            ),
            components=_named(COMPONENTS_VARIABLE, parse_components, value),
            queue_type=parse_queue_type(value(QUEUE_TYPE)),
            grpc_tls=parse_grpc_tls(*(env.get(variable.name) for variable in GRPC_TLS_VARIABLES)),
        )


def parse_grpc_tls(cert: str | None, key: str | None, client_ca: str | None) -> GrpcTls | None:
    """The gRPC ports' TLS files (None: plaintext); whether they can be used is known once
    they are read, at start-up."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError(
                f"{GRPC_TLS_CLIENT_CA_FILE.name} asks gRPC clients for certificates, over TLS:"
                f" set {GRPC_TLS_CERT_FILE.name} and {GRPC_TLS_KEY_FILE.name} too"
            )
        return None
    if cert is None or key is None:
        given, missing = (
            (GRPC_TLS_KEY_FILE, GRPC_TLS_CERT_FILE)
            if cert is None
            else (GRPC_TLS_CERT_FILE, GRPC_TLS_KEY_FILE)
        )
        raise ConfigError(
            f"{given.name} is set and {missing.name} is not: TLS needs the certificate and"
            " its private key"
        )
    return GrpcTls(cert, key, client_ca)


def parse_queue_type(value: str) -> str:
    queue_type = value.strip().lower()
    if queue_type not in QUEUE_TYPES:
        raise ConfigError(
            f"{QUEUE_TYPE.name} must be one of {', '.join(QUEUE_TYPES)}, got {value!r}"
        )
    return queue_type


def parse_components(value: str) -> tuple[str, ...]:
    """A comma-separated list of component names (FINANCING_COMPONENTS, `--components`);
    ConfigError names any unknown one."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in COMPONENTS]
    if unknown or not names:
        raise ConfigError(
            f"unknown component(s) {', '.join(unknown) or '(none given)'};"
            f" choose from {', '.join(COMPONENTS)}"
        )
    return names


def _positive_int(name: str, raw: str, *, most: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")
    if most is not None and value > most:
        shown = raw if len(raw) <= 24 else f"{raw[:20]}... ({len(raw)} digits)"
        raise ConfigError(f"{name} may be at most {most}, got {shown}")
    return value


_DURATION = re.compile(r"([0-9]+)\s*([smhd]?)")
_SECONDS_PER_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


# The longest duration a variable may give: dates and intervals reckoned from it (a
# retention's oldest record kept) must stay within what Python's and PostgreSQL's dates
# hold, which a few million days do not.
DURATION_MOST = timedelta(days=36500)
# The shortest deduplication retention: a redelivery comes within seconds to minutes
# (a consumer's connection lost, a relayer taking over), and a record pruned before it
# comes lets it apply twice. One second was accepted: a service killed under load and
# restarted pruned the records of what it had just handled, and redeliveries and the
# relayer's repeats released funds twice.
RETENTION_LEAST = timedelta(hours=1)
# PostgreSQL's session timeouts are milliseconds in a 32-bit integer: a longer one makes
# the server refuse every session.
POSTGRES_TIMEOUT_MOST = timedelta(milliseconds=2**31 - 1)


def parse_duration(
    name: str,
    raw: str,
    *,
    most: timedelta = DURATION_MOST,
    least: timedelta = timedelta(seconds=1),
) -> timedelta:
    """`7d`, `12h`, `30m`, `45s` or a bare number of seconds; at least `least` (a second
    unless said), at most `most`."""
    match = _DURATION.fullmatch(raw.strip().lower())
    if match is None:
        raise ConfigError(
            f"{name} must be a duration such as 7d, 12h, 90m or 3600 (seconds), got {raw!r}"
        )
    seconds = int(match[1]) * _SECONDS_PER_UNIT[match[2]]
    if seconds > most.total_seconds():
        raise ConfigError(f"{name} may be at most {said(most)}, got {raw!r}")
    if seconds < least.total_seconds():
        raise ConfigError(f"{name} must be at least {said(least)}, got {raw!r}")
    return timedelta(seconds=seconds)


def said(duration: timedelta) -> str:
    """`duration` as a duration variable is written (`7d`, `36h`, `90m`, `45s`)."""
    seconds = int(duration.total_seconds())
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % length == 0:
            return f"{seconds // length}{unit}"
    return f"{seconds}s"


def parse_address(address: str, name: str = "a listen address") -> tuple[str, int]:
    """`host:port`, `:port` (all interfaces) or `[v6]:port`; `name` says whose, in errors."""
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise ConfigError(f"{name} must be host:port, got {address!r}")
    if int(port) > 65535:
        raise ConfigError(f"{name}: a port is at most 65535, got {address!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


_KEYWORD = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*")

# libpq keyword -> asyncpg.connect keyword
_LIBPQ_TO_ASYNCPG = {
    "host": "host",
    "hostaddr": "host",
    "port": "port",
    "user": "user",
    "password": "password",
    "dbname": "database",
    "sslmode": "ssl",
    "connect_timeout": "timeout",
    "options": "server_settings",
}
# The keywords of libpq and of the reference's driver (pgx and its pool) the service does
# not read: refused, and named as such, a connection string of the reference's carrying
# one (`pool_min_conns`) being no typo.
_NOT_READ = frozenset(
    {
        "application_name",
        "channel_binding",
        "client_encoding",
        "fallback_application_name",
        "gssencmode",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "krbsrvname",
        "load_balance_hosts",
        "passfile",
        "require_auth",
        "requirepeer",
        "service",
        "sslcert",
        "sslcompression",
        "sslcrl",
        "sslkey",
        "sslpassword",
        "sslrootcert",
        "sslsni",
        "ssl_max_protocol_version",
        "ssl_min_protocol_version",
        "target_session_attrs",
        "tcp_user_timeout",
        "default_query_exec_mode",
        "description_cache_capacity",
        "pool_health_check_period",
        "pool_max_conn_idle_time",
        "pool_max_conn_lifetime",
        "pool_max_conn_lifetime_jitter",
        "pool_min_conns",
        "statement_cache_capacity",
    }
)
# What the server splits `options` at (C's isspace in the C locale).
_OPTIONS_WHITESPACE = frozenset(" \t\n\v\f\r")
# A setting as `options` gives it: `-c name=value` (or `-cname=value`, `--name=value`).
_SETTING = re.compile(r"(?:-c|--)([A-Za-z_][A-Za-z0-9_.-]*)=(.*)", re.DOTALL)


AMQP_SCHEMES = ("amqp", "amqps")
# The numbers a broker URL's query may set, as the AMQP client reads them.
AMQP_COUNTS = {
    "heartbeat": "seconds; 0 turns heartbeats off",
    "frame_max": "bytes",
    "channel_max": "channels",
}
# The largest each may be: AMQP carries them in 16 or 32 bits, and the AMQP client turns
# a heartbeat of 65535 or more into none at all.
AMQP_COUNTS_MOST = {"heartbeat": 65534, "frame_max": 2**32 - 1, "channel_max": 65535}


def parse_amqp_urls(value: str) -> str:
    """AMQP_ADDRESS, each of its comma-separated URLs checked (the value never echoed:
    it holds a password)."""
    urls = [url.strip() for url in value.split(",") if url.strip()]
    if not urls:
        raise ConfigError("AMQP_ADDRESS: no broker URL")
    for url in urls:
        parts = split_url(url, "AMQP_ADDRESS")
        try:
            # As the AMQP client reads it, which refuses more than urlsplit does: read
            # only when the service connects to that broker, a backslash in a password or a
            # host IDNA cannot decode stopped the service at its first failover to it.
            URL(url).host  # noqa: B018 - decoded here so that a bad host fails now
        except (ValueError, UnicodeError):
            raise ConfigError(
                "AMQP_ADDRESS: a broker URL cannot be read as written; percent-encode a"
                " password that holds characters other than letters, digits and '-._~',"
                " and give a host that is a valid name or address"
            ) from None
        if parts.scheme not in AMQP_SCHEMES:
            raise ConfigError(
                f"AMQP_ADDRESS: the scheme must be amqp or amqps, not {parts.scheme!r}"
            )
        if not parts.hostname:
            raise ConfigError("AMQP_ADDRESS: a broker URL names no host")
        query = parse_qsl(parts.query, keep_blank_values=True)
        _known_amqp_keys([key for key, _ in query], tls=parts.scheme == "amqps")
        for key, raw in query:
            if key not in AMQP_COUNTS:
                continue
            # The AMQP client reads what is not a number as 0: heartbeats off, silently.
            if not (raw.isascii() and raw.isdigit()) or int(raw) > AMQP_COUNTS_MOST[key]:
                raise ConfigError(
                    f"AMQP_ADDRESS: {key} must be a whole number from 0 to"
                    f" {AMQP_COUNTS_MOST[key]} ({AMQP_COUNTS[key]}), got {raw!r}"
                )
        tls = broker_tls(url)
        if broker_auth(url) == "external" and (tls is None or tls.certfile is None):
            raise ConfigError(
                "AMQP_ADDRESS: auth_mechanism=external logs in with the client certificate:"
                " give certfile and keyfile on an amqps:// URL"
            )
        try:
            if tls is not None:
                tls.context()  # the files read now: one that cannot be used stops start-up
        except UnusableFiles as error:
            raise ConfigError(f"AMQP_ADDRESS: {error}") from None
    return value


# A broker URL's TLS settings, by RabbitMQ's names for them (its URI query parameters,
# which the reference's client reads) and by the AMQP client's.
AMQP_TLS_KEYS = ("cacertfile", "cafile", "capath", "certfile", "keyfile", "verify", "no_verify_ssl")
# Its other settings: the counts above, the connection's name, the authentication
# mechanism (PLAIN with the URL's user and password, or EXTERNAL: the client certificate).
AMQP_KEYS = (*AMQP_COUNTS, "name", "auth_mechanism", "auth")
AUTH_MECHANISMS = ("plain", "external")


def _known_amqp_keys(keys: list[str], *, tls: bool) -> None:
    """ConfigError naming a key of a broker URL the service does not read (a misspelt
    `cacertfile` was dropped, leaving the broker's certificate to be checked against
    the system's CAs), or a TLS setting on a plaintext URL (dropped: the URL's TLS
    files asked for TLS, and the service connected without it)."""
    read = [*AMQP_KEYS, *AMQP_TLS_KEYS]
    unknown = sorted({key for key in keys if key not in read})
    if unknown:
        named = [
            repr(key) + (f" (close to {close[0]!r})" if close else "")
            if _KEYWORD.fullmatch(f"{key}=")
            else "a key that is no keyword"
            for key in unknown
            for close in [difflib.get_close_matches(key.lower(), read, n=1, cutoff=0.7)]
        ]
        raise ConfigError(
            f"AMQP_ADDRESS: unknown key(s) in a broker URL: {', '.join(named)}; the keys read"
            f" are {', '.join(AMQP_KEYS)}, and over amqps:// {', '.join(AMQP_TLS_KEYS)}"
        )
    plaintext = sorted({key for key in keys if key in AMQP_TLS_KEYS}) if not tls else []
    if plaintext:
        raise ConfigError(
            f"AMQP_ADDRESS: {', '.join(plaintext)} set on an amqp:// URL, which connects"
            " without TLS: use amqps:// for TLS"
        )


@dataclass(frozen=True)
class BrokerTls:
    """What an amqps:// URL connects with: the CAs its broker's certificate must chain to
    (the system's without `cafile` and `capath`), a client certificate and its key, and
    whether the broker's certificate is verified at all."""

    cafile: str | None = None
    capath: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True

    def context(self) -> ssl.SSLContext:
        """A client context, the files read now; UnusableFiles naming the setting and why."""
        if self.cafile is None and self.capath is None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # the system's CAs
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if self.cafile is not None:
                load_authorities(context, self.cafile, "cacertfile", issuing=False)
            if self.capath is not None:
                try:
                    context.load_verify_locations(capath=self.capath)
                except OSError as error:
                    raise UnusableFiles(unreadable("capath", self.capath, error)) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certfile is not None and self.keyfile is not None:
            load_key_pair(context, self.certfile, self.keyfile, cert="certfile", key="keyfile")
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def broker_tls(url: str) -> BrokerTls | None:
    """The TLS settings of broker URL `url`; None for an amqp:// one. ConfigError for
    settings that do not go together."""
    parsed = URL(url)
    if parsed.scheme != "amqps":
        return None
    query = parsed.query
    if "cacertfile" in query and "cafile" in query:
        raise ConfigError("AMQP_ADDRESS: cacertfile and cafile name the same file: give one")
    if ("certfile" in query) != ("keyfile" in query):
        raise ConfigError(
            "AMQP_ADDRESS: certfile and keyfile go together: the client certificate and its"
            " private key"
        )
    verify = query.get("verify", "verify_peer")
    if verify not in ("verify_peer", "verify_none"):
        raise ConfigError(
            f"AMQP_ADDRESS: verify must be verify_peer or verify_none, got {verify!r}"
        )
    no_verify = query.get("no_verify_ssl", "0")
    if no_verify not in ("0", "1"):
        raise ConfigError(f"AMQP_ADDRESS: no_verify_ssl must be 0 or 1, got {no_verify!r}")
    return BrokerTls(
        cafile=query.get("cacertfile") or query.get("cafile") or None,
        capath=query.get("capath") or None,
        certfile=query.get("certfile") or None,
        keyfile=query.get("keyfile") or None,
        verify=verify == "verify_peer" and no_verify == "0",
    )


def broker_auth(url: str) -> str:
    """The authentication mechanism broker URL `url` asks for (AUTH_MECHANISMS)."""
    query = URL(url).query
    mechanism = (query.get("auth_mechanism") or query.get("auth") or "plain").lower()
    if mechanism not in AUTH_MECHANISMS:
        raise ConfigError(
            f"AMQP_ADDRESS: auth_mechanism must be one of {', '.join(AUTH_MECHANISMS)},"
            f" got {mechanism!r}"
        )
    return mechanism


def split_url(url: str, what: str) -> SplitResult:
    """`url`'s parts; a ConfigError when it cannot be one URL as written. A password holding
    `/`, `?`, `#` or `@` must be percent-encoded: unencoded, it ends the URL's credentials
    early and the rest of it lands in the host, path or fragment, where it would be shown."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed "[", or a character NFKC turns into one of "/?#@:"
        raise ConfigError(
            f"{what}: the URL cannot be read as written; percent-encode a password that"
            " holds characters other than letters, digits and '-._~', and close an IPv6"
            " address's '['"
        ) from None
    if "@" in parts.path or "@" in parts.query or parts.fragment:
        raise ConfigError(
            f"{what}: the URL cannot be read as written; percent-encode a password that"
            " holds '/', '?', '#' or '@'"
        )
    try:
        parts.port  # noqa: B018 - parsed here so that a bad port fails now
    except ValueError:
        raise ConfigError(f"{what}: the port must be a number from 0 to 65535") from None
    return parts


_Parsed = TypeVar("_Parsed")


def _named(
    variable: Variable, parse: Callable[[str], _Parsed], value: Callable[[Variable], str]
) -> _Parsed:
    """`variable`'s value parsed; its errors say which variable they are about."""
    try:
        return parse(value(variable))
    except ConfigError as error:
        raise ConfigError(f"{variable.name}: {error}") from None


def parse_database(value: str) -> Database:
    """A database from a `postgresql://` URL or a libpq `key=value` string.

    `pool_max_conns` (in either form) sizes the pool; any other key than those of
    `_LIBPQ_TO_ASYNCPG` is refused, as libpq refuses a keyword it does not know.
    """
    value = value.strip()
    if value.startswith(("postgres://", "postgresql://")):
        return _parse_url(value)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value):
        # Only the scheme: what follows may hold a password.
        scheme = value.partition("://")[0]
        raise ConfigError(
            f"connection string: a URL's scheme must be postgresql:// or postgres://, got"
            f" {scheme!r}"
        )
    return _parse_keywords(value)


def _parse_url(url: str) -> Database:
    authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    if "," in authority.rpartition("@")[2]:  # hosts, not a password holding a comma
        raise _several_servers("the URL")
    parts = split_url(url, "connection string")
    # As libpq reads a URL's query: percent-escapes decoded, a `+` kept (not a space),
    # an empty value the same as none.
    query: dict[str, str] = {}
    unshown: set[str] = set()  # the keys after the password, which may be part of it
    # The keys the URL's own parts give (its user, host, port and database).
    given = {
        key
        for key, part in (
            ("user", parts.username),
            ("host", parts.hostname),
            ("port", parts.port),
            ("dbname", parts.path.strip("/")),
        )
        if part
    }
    for key, _, raw in (item.partition("=") for item in parts.query.split("&") if item):
        key = unquote(key)
        if "password" in query and key != "password":
            if key in given or key in query:
                raise _given_again(key)
            unshown.add(key)
        if raw:
            query[key] = unquote(raw)
    pool_size = _pool_size(query.pop("pool_max_conns", None), shown="pool_max_conns" not in unshown)
    port = parts.port
    user = unquote(parts.username or "postgres")
    kwargs: dict[str, Any] = {
        "host": _url_host(parts) or "127.0.0.1",
        "port": port or 5432,
        "user": user,
        # libpq: the database defaults to the user's name
        "database": unquote(parts.path.lstrip("/")) or user,
    }
    if parts.password:
        kwargs["password"] = unquote(parts.password)
    _known_keys(query, unshown)
    kwargs.update(_asyncpg_keywords(query, unshown))
    return Database(kwargs, pool_size)


def _url_host(parts: SplitResult) -> str:
    """The host of a URL as written (a socket directory's case kept), percent-decoded:
    `%2Fvar%2Frun%2Fpostgresql` is the directory of a Unix socket, as libpq reads it."""
    host = parts.netloc.rpartition("@")[2]
    if host.startswith("["):
        return host[1 : host.find("]")]
    return unquote(host.partition(":")[0])


def _parse_keywords(text: str) -> Database:
    pairs: dict[str, str] = {}
    unshown: set[str] = set()  # the keys after a bare password, which may be part of it
    bare_password = False
    pos = 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        match = _KEYWORD.match(text, pos)
        if not match:
            # No excerpt of the text: it may be part of a password.
            raise ConfigError(f"connection string: expected key=value at character {pos}")
        key = match.group(1)
        pos = match.end()
        if bare_password:
            if key in pairs:
                raise _given_again(key)
            unshown.add(key)
        quoted = text.startswith("'", pos)
        value, pos = _libpq_value(text, pos)
        pairs[key] = value
        bare_password = bare_password or (key == "password" and not quoted)
    pool_size = _pool_size(pairs.pop("pool_max_conns", None), shown="pool_max_conns" not in unshown)
    _known_keys(pairs, unshown)
    kwargs: dict[str, Any] = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
    kwargs.update(_asyncpg_keywords(pairs, unshown))
    kwargs.setdefault("database", kwargs["user"])
    return Database(kwargs, pool_size)


def _asyncpg_keywords(pairs: Mapping[str, str], unshown: Set[str]) -> dict[str, Any]:
    """asyncpg's keywords for libpq's: `hostaddr`, where given, is where to connect
    whatever the order of the keys, as libpq connects to it rather than to `host`. The
    values of the keys in `unshown` are never echoed."""
    ordered = sorted(pairs.items(), key=lambda pair: pair[0] == "hostaddr")
    for key, raw in ordered:
        if key in ("host", "hostaddr", "port") and "," in raw:
            raise _several_servers(key)
    typed = {
        _LIBPQ_TO_ASYNCPG[key]: _typed(key, raw, shown=key not in unshown) for key, raw in ordered
    }
    return {key: value for key, value in typed.items() if value is not None}


def _given_again(key: str) -> ConfigError:
    """A key given again after a password that may hold it: a bare password holding a
    space (a URL's holding '&') read as a password and more keys, whose values then
    named the role, the host or the database in every error and in `status`."""
    return ConfigError(
        f"connection string: {key!r} is given again after the password, which may hold"
        " it: quote a password that holds spaces, password='...', and percent-encode '&'"
        " and '=' in a URL's"
    )


def _several_servers(what: str) -> ConfigError:
    return ConfigError(
        f"connection string: {what} names several servers; give one (a load balancer's or"
        " a proxy's address for several)"
    )


def _known_keys(keys: Iterable[str], unshown: Set[str]) -> None:
    """ConfigError naming the keys the service does not read: a misspelt `dbname`
    would otherwise leave the service on the user's default database. The keys in
    `unshown` are not named: they follow a password that may hold them (a bare one
    holding a space, a URL's holding '&'), and their names were a part of it; the key
    the service reads that one is close to is named instead (`dbnme`: `dbname`)."""
    unknown = sorted(key for key in keys if key not in _LIBPQ_TO_ASYNCPG)
    if not unknown:
        return
    read = sorted([*_LIBPQ_TO_ASYNCPG, "pool_max_conns"])
    # A key is named only when it is a keyword: nothing else of the text is echoed. A
    # keyword of libpq's or pgx's own is named wherever it is: it is no password's part.
    named = [
        f"{key!r} (libpq's or pgx's, not read by the service)"
        if key in _NOT_READ
        else _after_the_password(key, read)
        if key in unshown
        else repr(key)
        if _KEYWORD.fullmatch(f"{key}=")
        else "a key that is no keyword"
        for key in unknown
    ]
    hidden = (
        f"; a key after the password is {AFTER_THE_PASSWORD}"
        if any(key in unshown and key not in _NOT_READ for key in unknown)
        else ""
    )
    raise ConfigError(
        f"connection string: unknown or unsupported key(s): {', '.join(named)};"
        f" the keys read are {', '.join(read)}{hidden}"
    )


def _after_the_password(key: str, read: list[str]) -> str:
    close = difflib.get_close_matches(key.lower(), read, n=1, cutoff=0.7)
    return "a key after the password" + (f" close to {close[0]!r}" if close else "")


def _libpq_value(text: str, pos: int) -> tuple[str, int]:
    """One value: bare up to whitespace, or single-quoted with backslash escapes."""
    out = []
    if pos < len(text) and text[pos] == "'":
        pos += 1
        while pos < len(text):
            char = text[pos]
            if char == "\\" and pos + 1 < len(text):
                out.append(text[pos + 1])
                pos += 2
                continue
            if char == "'":
                return "".join(out), pos + 1
            out.append(char)
            pos += 1
        raise ConfigError("connection string: unterminated quoted value")
    while pos < len(text) and not text[pos].isspace():
        if text[pos] == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
            continue
        out.append(text[pos])
        pos += 1
    return "".join(out), pos


# The most sessions a pool may hold: asyncpg sets up every one of them at start-up, and
# no PostgreSQL server takes more sessions than this from one client in earnest.
POOL_MOST = 10_000


# Why a key, or a value, that follows a password in a connection string is not shown.
AFTER_THE_PASSWORD = (
    "not shown: the password may hold it; quote a password that holds spaces,"
    " password='...', and percent-encode '&' and '=' in a URL's"
)


def _got(raw: str, shown: bool) -> str:
    """How an error quotes a value it refuses."""
    return repr(raw) if shown else f"a value after the password ({AFTER_THE_PASSWORD})"


def _pool_size(raw: str | None, *, shown: bool) -> int:
    if raw is None:
        return 10
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= POOL_MOST:
        raise ConfigError(
            f"pool_max_conns must be an integer from 1 to {POOL_MOST}, got {_got(raw, shown)}"
        )
    return int(raw)


def _typed(key: str, raw: str, *, shown: bool) -> Any:
    if key == "port":
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 65535:
            raise ConfigError(
                f"connection string: port must be from 1 to 65535, got {_got(raw, shown)}"
            )
        return int(raw)
    if key == "connect_timeout":
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and 0 <= seconds <= POSTGRES_TIMEOUT_MOST.total_seconds()):
            raise ConfigError(
                "connection string: connect_timeout must be a number of seconds, got"
                f" {_got(raw, shown)}"
            )
        # libpq's 0 is no timeout of its own: FINANCING_DB_TIMEOUT bounds the attempt.
        return seconds or None
    if key == "options":
        return _settings(raw, shown)
    if key == "sslmode":
        if raw not in SSL_MODES:
            raise ConfigError(
                f"connection string: sslmode must be one of {', '.join(SSL_MODES)}, got"
                f" {_got(raw, shown)}"
            )
        return {"disable": False}.get(raw, raw)
    return raw


def _settings(raw: str, shown: bool) -> dict[str, str]:
    """The server settings of libpq's `options` (`-c search_path=app -c work_mem=64MB`),
    sent when a session starts, split into words as the server splits them
    (`pg_split_opts`): at ASCII whitespace, a backslash taking the next character as it
    is (one at the end taken for nothing); a name's '-' read as '_'."""
    words: list[str] = []
    word: list[str] = []
    escaped = False
    for char in raw:
        if escaped:
            word.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in _OPTIONS_WHITESPACE:
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(char)
    if word:
        words.append("".join(word))
    settings: dict[str, str] = {}
    pending = iter(words)
    for each in pending:
        setting = f"-c{next(pending, '')}" if each == "-c" else each
        match = _SETTING.fullmatch(setting)
        if not match:
            raise ConfigError(
                "connection string: options holds something other than settings"
                f" (-c name=value): {_got(setting, shown)}"
            )
        settings[match.group(1).replace("-", "_")] = match.group(2)
    return settings


def _check_driver_variables(source: Mapping[str, str]) -> None:
    """The libpq variables the driver reads itself where a connection string says nothing
    of them (docs/contract.md section 3), each one of the values libpq takes, whatever
    the connection strings say (a wrong one is a mistake either way): a wrong one failed
    at the first connection, said to be the database's refusal, without naming the
    variable. Empty, the TLS versions are unset (for libpq and the driver alike); the
    others are refused, as libpq refuses them."""
    for name, values in DRIVER_VARIABLES.items():
        value = source.get(name)
        if value is None or (value == "" and name in EMPTY_IS_UNSET):
            continue
        if value not in values:
            raise ConfigError(f"{name} must be one of {', '.join(values)}, got {value!r}")


# libpq's sslmode values, which asyncpg takes too.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
# The libpq variables of a fixed set of values that the driver reads itself.
DRIVER_VARIABLES = {
    "PGSSLMODE": SSL_MODES,
    "PGSSLNEGOTIATION": ("postgres", "direct"),
    "PGTARGETSESSIONATTRS": (
        "any",
        "primary",
        "standby",
        "prefer-standby",
        "read-write",
        "read-only",
    ),
    "PGSSLMINPROTOCOLVERSION": TLS_VERSIONS,
    "PGSSLMAXPROTOCOLVERSION": TLS_VERSIONS,
}
EMPTY_IS_UNSET = frozenset({"PGSSLMINPROTOCOLVERSION", "PGSSLMAXPROTOCOLVERSION"})
