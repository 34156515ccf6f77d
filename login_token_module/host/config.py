"""The homeserver's YAML config, with Synapse's key names where they exist."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from login_token_module.config import (
    ConfigError,
    RatelimitConfig,
    parse_ratelimit,
    reject_unknown,
    whole_number,
)

SERVER_NAME_RE = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


@dataclass(frozen=True)
class ListenerConfig:
    port: int
    bind_addresses: tuple[str, ...]
    # http: the client API; metrics: Prometheus metrics (Synapse's listener types).
    type: Literal["http", "metrics"] = "http"
    # Take the client's address from X-Forwarded-For (set by a reverse proxy in
    # front); otherwise the header is ignored, so clients cannot choose their address.
    x_forwarded: bool = False


# Synapse's rc_failed_login default; Synapse's address and account defaults are
# stricter (0.003/s, burst 5), which would make trying the server painful.
DEFAULT_RC_LOGIN = RatelimitConfig(per_second=0.17, burst_count=3)


@dataclass(frozen=True)
class RcLoginConfig:
    """Synapse's ``rc_login``: logins per client address, per account, and failed attempts per account."""

    address: RatelimitConfig = DEFAULT_RC_LOGIN
    account: RatelimitConfig = DEFAULT_RC_LOGIN
    failed_attempts: RatelimitConfig = DEFAULT_RC_LOGIN


@dataclass(frozen=True)
class ModuleConfig:
    module: str
    config: Mapping[str, Any]


@dataclass(frozen=True)
class DatabaseConfig:
    """Synapse's ``database:`` block: sqlite3 (a file) or psycopg2 (PostgreSQL)."""

    name: Literal["sqlite3", "psycopg2"] = "sqlite3"
    # sqlite3: the file, resolved against the config file's folder.
    path: str = ""
    # psycopg2: libpq connection keywords (host, port, user, password, dbname, ...).
    args: Mapping[str, Any] = field(default_factory=dict)
    cp_min: int = 1
    cp_max: int = 5


@dataclass(frozen=True)
class HomeserverConfig:
    server_name: str
    listeners: tuple[ListenerConfig, ...]
    database: DatabaseConfig
    bcrypt_rounds: int
    modules: tuple[ModuleConfig, ...]
    config_directory: str
    max_request_body_size: int = 64 * 1024
    rc_login: RcLoginConfig = field(default_factory=RcLoginConfig)
    # A Python logging config (YAML, logging.config.dictConfig's shape), as Synapse's log_config.
    log_config: str | None = None
    # A request must arrive whole (headers and body) within this, and an idle
    # keep-alive connection is closed after it: a client that sends slowly, or not
    # at all, cannot hold a connection (and a file descriptor) for long.
    request_timeout_ms: int = 60_000
    # Threads that run bcrypt (None: the cores less one, at least one), and how many
    # password checks may wait for one before a request is refused with 429.
    bcrypt_threads: int | None = None
    bcrypt_max_queued: int = 16
    # The open-files soft limit set at start (Synapse's key): 0 is the hard limit, and
    # a larger figure than the hard limit gets the hard limit.
    soft_file_limit: int = 0
    # Where clients reach this homeserver (Synapse's key), ending in "/"; None: the
    # first client listener's own address (right only when clients reach it directly).
    public_baseurl: str | None = None

    @property
    def database_path(self) -> str:
        """The SQLite file ('' on PostgreSQL)."""
        return self.database.path


def _listener(value: Any, path: list[str | int]) -> ListenerConfig:
    if not isinstance(value, Mapping):
        raise ConfigError(path, "must be a mapping with 'port' and 'bind_addresses'")
    reject_unknown(value, {"port", "bind_addresses", "type", "tls", "x_forwarded", "resources"}, path)
    kind = value.get("type", "http")
    if kind not in ("http", "metrics"):
        raise ConfigError([*path, "type"], f"must be 'http' or 'metrics', got {kind!r}")
    if value.get("tls", False) is not False:
        raise ConfigError([*path, "tls"], "TLS is not supported; put a reverse proxy in front")
    x_forwarded = value.get("x_forwarded", False)
    if not isinstance(x_forwarded, bool):
        raise ConfigError([*path, "x_forwarded"], f"must be true or false, got {x_forwarded!r}")
    port = whole_number(value.get("port"), [*path, "port"], 0, 65535)
    addresses = value.get("bind_addresses", ["127.0.0.1"])
    if (
        not isinstance(addresses, list)
        or not addresses
        or not all(isinstance(a, str) and a for a in addresses)
    ):
        raise ConfigError([*path, "bind_addresses"], "must be a non-empty list of addresses")
    return ListenerConfig(port=port, bind_addresses=tuple(addresses), type=kind, x_forwarded=x_forwarded)


def _rc_login(value: Any) -> RcLoginConfig:
    path: list[str | int] = ["rc_login"]
    if value is None:
        return RcLoginConfig()
    if not isinstance(value, Mapping):
        raise ConfigError(path, "must be a mapping with address, account and failed_attempts")
    reject_unknown(value, {"address", "account", "failed_attempts"}, path)
    return RcLoginConfig(
        **{
            name: parse_ratelimit(value.get(name), [*path, name], DEFAULT_RC_LOGIN)
            for name in ("address", "account", "failed_attempts")
        }
    )


# libpq keywords the reference host passes on (Synapse passes ``args`` to psycopg2 the same way).
_PG_TEXT_ARGS = {"host", "user", "password", "database", "dbname", "sslmode", "application_name"}
_PG_ARGS = _PG_TEXT_ARGS | {"port", "connect_timeout", "cp_min", "cp_max"}


def _database(value: Any, base: str) -> DatabaseConfig:
    if not isinstance(value, Mapping):
        raise ConfigError(["database"], "must be a mapping with 'name' and 'args'")
    reject_unknown(value, {"name", "args"}, ["database"])
    name = value.get("name", "sqlite3")
    if name not in ("sqlite3", "psycopg2"):
        raise ConfigError(["database", "name"], f"must be 'sqlite3' or 'psycopg2', got {name!r}")
    args = value.get("args")
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ConfigError(["database", "args"], "must be a mapping")
    if name == "psycopg2":
        return _postgres(args)
    reject_unknown(args, {"database"}, ["database", "args"])
    path = args.get("database", "homeserver.db")
    if not isinstance(path, str) or not path:
        raise ConfigError(["database", "args", "database"], "must be a file path")
    return DatabaseConfig(name="sqlite3", path=resolve_path(base, path))


def _postgres(args: Mapping[str, Any]) -> DatabaseConfig:
    where: list[str | int] = ["database", "args"]
    reject_unknown(args, _PG_ARGS, where)
    connect: dict[str, Any] = {}
    for key in sorted(_PG_TEXT_ARGS & set(args)):
        text = args[key]
        if not isinstance(text, str) or (key != "password" and not text):
            raise ConfigError([*where, key], "must be a non-empty string")
        connect["dbname" if key == "database" else key] = text
    if "database" in args and "dbname" in args:
        raise ConfigError([*where, "dbname"], "give 'database' or 'dbname', not both")
    if "dbname" not in connect:
        raise ConfigError([*where, "database"], "is required: the PostgreSQL database to use")
    if "port" in args:
        connect["port"] = whole_number(args["port"], [*where, "port"], 1, 65535)
    if "connect_timeout" in args:
        connect["connect_timeout"] = whole_number(
            args["connect_timeout"], [*where, "connect_timeout"], 1, 600
        )
    cp_min = whole_number(args.get("cp_min", 1), [*where, "cp_min"], 0, 100)
    cp_max = whole_number(args.get("cp_max", 5), [*where, "cp_max"], 1, 100)
    if cp_min > cp_max:
        raise ConfigError([*where, "cp_min"], f"must not be more than cp_max ({cp_max})")
    return DatabaseConfig(name="psycopg2", args=connect, cp_min=cp_min, cp_max=cp_max)


def resolve_path(base: str, path: str) -> str:
    if path == ":memory:" or os.path.isabs(path):
        return path
    return os.path.join(base, path)


def _modules(value: Any) -> tuple[ModuleConfig, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(["modules"], "must be a list")
    modules = []
    for index, entry in enumerate(value):
        path: list[str | int] = ["modules", index]
        if not isinstance(entry, Mapping):
            raise ConfigError(path, "must be a mapping with 'module' and 'config'")
        reject_unknown(entry, {"module", "config"}, path)
        name = entry.get("module")
        if not isinstance(name, str) or "." not in name:
            raise ConfigError([*path, "module"], "must be a dotted path such as package.ClassName")
        config = entry.get("config")
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise ConfigError([*path, "config"], "must be a mapping")
        modules.append(ModuleConfig(module=name, config=config))
    return tuple(modules)


def parse_homeserver_config(raw: Any, config_directory: str) -> HomeserverConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError([], "the config file must be a YAML mapping")
    reject_unknown(
        raw,
        {
            "server_name",
            "listeners",
            "database",
            "bcrypt_rounds",
            "modules",
            "max_request_body_size",
            "rc_login",
            "log_config",
            "request_timeout_ms",
            "bcrypt_threads",
            "bcrypt_max_queued",
            "soft_file_limit",
            "public_baseurl",
        },
        [],
    )
    server_name = raw.get("server_name")
    if not isinstance(server_name, str) or not SERVER_NAME_RE.match(server_name):
        raise ConfigError(["server_name"], f"must be a host name such as 'localhost', got {server_name!r}")
    listeners_raw = raw.get("listeners")
    if not isinstance(listeners_raw, list) or not listeners_raw:
        raise ConfigError(["listeners"], "must be a non-empty list")
    listeners = tuple(_listener(entry, ["listeners", i]) for i, entry in enumerate(listeners_raw))
    if not any(listener.type == "http" for listener in listeners):
        raise ConfigError(["listeners"], "needs at least one 'http' listener")
    log_config = raw.get("log_config")
    if log_config is not None:
        if not isinstance(log_config, str) or not log_config:
            raise ConfigError(["log_config"], "must be the path of a logging config file")
        log_config = resolve_path(config_directory, log_config)
        if not os.path.isfile(log_config):
            raise ConfigError(["log_config"], f"{log_config} is not a file")
    return HomeserverConfig(
        server_name=server_name,
        listeners=listeners,
        database=_database(raw.get("database", {"name": "sqlite3"}), config_directory),
        bcrypt_rounds=whole_number(raw.get("bcrypt_rounds", 12), ["bcrypt_rounds"], 4, 31),
        modules=_modules(raw.get("modules")),
        config_directory=config_directory,
        max_request_body_size=whole_number(
            raw.get("max_request_body_size", 64 * 1024), ["max_request_body_size"], 1024, 100 * 1024 * 1024
        ),
        rc_login=_rc_login(raw.get("rc_login")),
        log_config=log_config,
        request_timeout_ms=whole_number(
            raw.get("request_timeout_ms", 60_000), ["request_timeout_ms"], 1_000, 3_600_000
        ),
        bcrypt_threads=(
            None
            if raw.get("bcrypt_threads") is None
            else whole_number(raw.get("bcrypt_threads"), ["bcrypt_threads"], 1, 256)
        ),
        bcrypt_max_queued=whole_number(raw.get("bcrypt_max_queued", 16), ["bcrypt_max_queued"], 0, 100_000),
        soft_file_limit=_soft_file_limit(raw.get("soft_file_limit", 0)),
        public_baseurl=_public_baseurl(raw.get("public_baseurl")),
    )


_BASEURL_RE = re.compile(
    r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/\-]*)?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?(/[A-Za-z0-9._~/\-]*)?"
)


def _public_baseurl(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _BASEURL_RE.fullmatch(value):
        raise ConfigError(
            ["public_baseurl"], "must be an http or https URL such as https://matrix.example.org/"
        )
    return value if value.endswith("/") else value + "/"


def _soft_file_limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            ["soft_file_limit"], f"must be a whole number, 0 or more (0: the hard limit), got {value!r}"
        )
    return value


def load_config_file(path: str) -> HomeserverConfig:
    """Read and validate a config file; raises ConfigError (OSError if unreadable)."""
    with open(path, encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError([], f"not valid YAML{where}") from None
    return parse_homeserver_config(raw, os.path.dirname(os.path.abspath(path)))
