"""Config parsing: defaults, and one clear error naming the key for each mistake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from login_token_module import ConfigError, LoginTokenModule
from login_token_module.config import LoginTokenConfig
from login_token_module.host.config import load_config_file, parse_homeserver_config
from login_token_module.host.server import Homeserver
from tests.helpers import REACTOR, ROOT, homeserver_yaml


def test_defaults_follow_the_spec() -> None:
    config = LoginTokenModule.parse_config({})
    assert config == LoginTokenConfig()
    assert config.token_lifetime_ms == 120_000
    assert config.require_ui_auth is True
    assert config.ratelimit.burst_count == 1
    assert config.ratelimit.per_second == pytest.approx(1 / 60)
    assert config.store.type == "sqlite"


def test_a_full_config_is_read() -> None:
    config = LoginTokenModule.parse_config(
        {
            "token_lifetime_ms": 60_000,
            "require_ui_auth": False,
            "ratelimit": {"per_second": 0.5, "burst_count": 3},
            "failed_auth_ratelimit": {"per_second": 1, "burst_count": 10},
            "ui_auth_session_lifetime_ms": 5_000,
            "sweep_interval_ms": 1_000,
            "store": {"type": "memory"},
        }
    )
    assert config.token_lifetime_ms == 60_000
    assert config.require_ui_auth is False
    assert (config.ratelimit.per_second, config.ratelimit.burst_count) == (0.5, 3)
    assert config.failed_auth_ratelimit.burst_count == 10
    assert config.ui_auth_session_lifetime_ms == 5_000
    assert config.sweep_interval_ms == 1_000
    assert config.store.type == "memory"


BAD_CONFIGS: list[tuple[Any, str]] = [
    ([], "<top level>: must be a mapping"),
    (
        {"token_lifetime": 5},
        "token_lifetime: unknown option (expected one of: failed_auth_ratelimit, history_retention_ms,"
        " pairing, ratelimit, require_ui_auth, revoke_on_logout, store, sweep_interval_ms,"
        " token_lifetime_ms, ui_auth_session_lifetime_ms)",
    ),
    ({"token_lifetime_ms": -5}, "token_lifetime_ms: must be a whole number from 1 to 86400000, got -5"),
    ({"token_lifetime_ms": 0}, "token_lifetime_ms: must be a whole number from 1 to 86400000, got 0"),
    ({"token_lifetime_ms": "2m"}, "token_lifetime_ms: must be a whole number from 1 to 86400000, got '2m'"),
    ({"token_lifetime_ms": True}, "token_lifetime_ms: must be a whole number from 1 to 86400000, got True"),
    ({"token_lifetime_ms": 1.5}, "token_lifetime_ms: must be a whole number from 1 to 86400000, got 1.5"),
    (
        {"token_lifetime_ms": 10**12},
        "token_lifetime_ms: must be a whole number from 1 to 86400000, got 1000000000000",
    ),
    ({"require_ui_auth": "yes"}, "require_ui_auth: must be true or false, got 'yes'"),
    ({"ratelimit": 5}, "ratelimit: must be a mapping"),
    ({"ratelimit": {"per_second": "fast"}}, "ratelimit.per_second: must be a positive number, got 'fast'"),
    ({"ratelimit": {"per_second": 0}}, "ratelimit.per_second: must be a positive number, got 0"),
    ({"ratelimit": {"per_second": -1}}, "ratelimit.per_second: must be a positive number, got -1"),
    ({"ratelimit": {"per_second": float("nan")}}, "ratelimit.per_second: must be a positive number, got nan"),
    (
        {"ratelimit": {"burst_count": 0}},
        "ratelimit.burst_count: must be a whole number from 1 to 1000000, got 0",
    ),
    (
        {"ratelimit": {"burst": 2}},
        "ratelimit.burst: unknown option (expected one of: burst_count, per_second)",
    ),
    (
        {"failed_auth_ratelimit": {"burst_count": "x"}},
        "failed_auth_ratelimit.burst_count: must be a whole number from 1 to 1000000, got 'x'",
    ),
    (
        {"ui_auth_session_lifetime_ms": 10},
        "ui_auth_session_lifetime_ms: must be a whole number from 1000 to 86400000, got 10",
    ),
    ({"sweep_interval_ms": 0}, "sweep_interval_ms: must be a whole number from 10 to 86400000, got 0"),
    ({"store": {"type": "redis"}}, "store.type: must be 'memory', 'sqlite' or 'postgres', got 'redis'"),
    ({"store": {"type": "sqlite", "path": ""}}, "store.path: must be a non-empty file path"),
    ({"store": {"type": "sqlite", "path": 5}}, "store.path: must be a non-empty file path"),
    ({"store": {"type": "memory", "path": "x.db"}}, "store.path: only applies to the sqlite store"),
    ({"store": {"typ": "memory"}}, "store.typ: unknown option (expected one of: path, shared_state, type)"),
    (
        {"store": {"type": "memory", "shared_state": True}},
        "store.shared_state: the memory store cannot share state between processes",
    ),
    (
        {"store": {"type": "sqlite", "shared_state": "yes"}},
        "store.shared_state: must be true or false, got 'yes'",
    ),
    ({"store": {"type": "sqlite", "dsn": "postgresql://x"}}, "store.dsn: only applies to the postgres store"),
    (
        {"store": {"type": "postgres"}},
        "store.dsn: must be a URI such as postgresql://user:password@host:5432/dbname",
    ),
    (
        {"store": {"type": "postgres", "dsn": "host=db password=hunter2"}},
        "store.dsn: must be a URI such as postgresql://user:password@host:5432/dbname",
    ),
    (
        {"store": {"type": "postgres", "dsn": "postgresql://db/x", "path": "t.db"}},
        "store.path: only applies to the sqlite store",
    ),
    (
        {"store": {"type": "postgres", "dsn": "postgresql://db/x", "cp_max": 0}},
        "store.cp_max: must be a whole number from 1 to 100, got 0",
    ),
    (
        {"store": {"type": "postgres", "dsn": "postgresql://db/x", "cp_max": 101}},
        "store.cp_max: must be a whole number from 1 to 100, got 101",
    ),
    (
        {"store": {"type": "postgres", "dsn": "postgresql://db/x", "cp_min": 9}},
        "store.cp_min: must not be more than cp_max (5)",
    ),
    ({"store": {"type": "memory", "dsn": "postgresql://x"}}, "store.dsn: only applies to the postgres store"),
    (
        {"store": {"type": "postgres", "dsn": "postgresql://db/x", "cp_min": -1}},
        "store.cp_min: must be a whole number from 0 to 100, got -1",
    ),
    (
        {"store": {"type": "postgres", "dsn": "postgresql://db/x", "cp_min": 101, "cp_max": 100}},
        "store.cp_min: must be a whole number from 0 to 100, got 101",
    ),
    ({"store": {"type": "memory", "cp_max": 1}}, "store.cp_max: only applies to the postgres store"),
    ({"store": {"type": "sqlite", "cp_min": 1}}, "store.cp_min: only applies to the postgres store"),
    (
        {"pairing": {"lifetime_ms": 600_000, "interval_ms": 60_001}},
        "pairing.interval_ms: must be a whole number from 10 to 60000, got 60001",
    ),
    (
        {"pairing": {"lifetime_ms": 2000, "interval_ms": 2000}},
        "pairing.interval_ms: must be less than lifetime_ms (2000)",
    ),
    # Each number's bounds: one past either end is refused (the ends themselves are
    # accepted: test_each_number_may_sit_exactly_at_its_bounds).
    (
        {"token_lifetime_ms": 86_400_001},
        "token_lifetime_ms: must be a whole number from 1 to 86400000, got 86400001",
    ),
    (
        {"ui_auth_session_lifetime_ms": 999},
        "ui_auth_session_lifetime_ms: must be a whole number from 1000 to 86400000, got 999",
    ),
    (
        {"ui_auth_session_lifetime_ms": 86_400_001},
        "ui_auth_session_lifetime_ms: must be a whole number from 1000 to 86400000, got 86400001",
    ),
    ({"sweep_interval_ms": 9}, "sweep_interval_ms: must be a whole number from 10 to 86400000, got 9"),
    (
        {"sweep_interval_ms": 86_400_001},
        "sweep_interval_ms: must be a whole number from 10 to 86400000, got 86400001",
    ),
    (
        {"history_retention_ms": 59_999},
        "history_retention_ms: must be a whole number from 60000 to 31622400000, got 59999",
    ),
    (
        {"history_retention_ms": 31_622_400_001},
        "history_retention_ms: must be a whole number from 60000 to 31622400000, got 31622400001",
    ),
    (
        {"ratelimit": {"burst_count": 1_000_001}},
        "ratelimit.burst_count: must be a whole number from 1 to 1000000, got 1000001",
    ),
    (
        {"failed_auth_ratelimit": {"per_second": True}},
        "failed_auth_ratelimit.per_second: must be a positive number, got True",
    ),
    (
        {"pairing": {"lifetime_ms": 999}},
        "pairing.lifetime_ms: must be a whole number from 1000 to 86400000, got 999",
    ),
    (
        {"pairing": {"lifetime_ms": 86_400_001}},
        "pairing.lifetime_ms: must be a whole number from 1000 to 86400000, got 86400001",
    ),
    ({"pairing": {"interval_ms": 9}}, "pairing.interval_ms: must be a whole number from 10 to 60000, got 9"),
    ({"revoke_on_logout": "yes"}, "revoke_on_logout: must be true or false, got 'yes'"),
    ({"store": 5}, "store: must be a mapping"),
    ({"pairing": 5}, "pairing: must be a mapping"),
]


def test_each_number_may_sit_exactly_at_its_bounds() -> None:
    low = LoginTokenModule.parse_config(
        {
            "token_lifetime_ms": 1,
            "ui_auth_session_lifetime_ms": 1_000,
            "sweep_interval_ms": 10,
            "history_retention_ms": 60_000,
            "ratelimit": {"per_second": 1e-9, "burst_count": 1},
            "failed_auth_ratelimit": {"per_second": 1e-9, "burst_count": 1},
            "pairing": {"lifetime_ms": 1_000, "interval_ms": 10},
        }
    )
    assert (low.token_lifetime_ms, low.ui_auth_session_lifetime_ms, low.sweep_interval_ms) == (1, 1_000, 10)
    assert low.history_retention_ms == 60_000
    assert (low.ratelimit.per_second, low.ratelimit.burst_count) == (1e-9, 1)
    assert (low.failed_auth_ratelimit.per_second, low.failed_auth_ratelimit.burst_count) == (1e-9, 1)
    assert (low.pairing.lifetime_ms, low.pairing.interval_ms) == (1_000, 10)
    day = 86_400_000
    high = LoginTokenModule.parse_config(
        {
            "token_lifetime_ms": day,
            "ui_auth_session_lifetime_ms": day,
            "sweep_interval_ms": day,
            "history_retention_ms": 366 * day,
            "ratelimit": {"burst_count": 1_000_000},
            "failed_auth_ratelimit": {"burst_count": 1_000_000},
            "pairing": {"lifetime_ms": day, "interval_ms": 60_000},
        }
    )
    assert (high.token_lifetime_ms, high.ui_auth_session_lifetime_ms, high.sweep_interval_ms) == (
        day,
        day,
        day,
    )
    assert high.history_retention_ms == 366 * day
    assert high.ratelimit.burst_count == high.failed_auth_ratelimit.burst_count == 1_000_000
    assert (high.pairing.lifetime_ms, high.pairing.interval_ms) == (day, 60_000)


def test_a_wrong_dsn_is_never_echoed() -> None:
    """The DSN may carry a password: the error names the key, not the value."""
    with pytest.raises(ConfigError) as caught:
        LoginTokenModule.parse_config({"store": {"type": "postgres", "dsn": "host=db password=hunter2"}})
    assert "hunter2" not in str(caught.value)


def test_postgres_store_config_is_read() -> None:
    config = LoginTokenModule.parse_config(
        {"store": {"type": "postgres", "dsn": "postgresql://ltm@127.0.0.1:5432/ltm", "cp_max": 3}}
    )
    assert config.store.type == "postgres"
    assert config.store.dsn == "postgresql://ltm@127.0.0.1:5432/ltm"
    assert (config.store.cp_min, config.store.cp_max) == (1, 3)
    assert config.store.shared_state is None  # decided at start-up: shared, for postgres
    # libpq's short scheme too; a pool may keep no idle connection, or up to 100.
    short = LoginTokenModule.parse_config(
        {"store": {"type": "postgres", "dsn": "postgres://db/x", "cp_min": 0, "cp_max": 100}}
    )
    assert (short.store.dsn, short.store.cp_min, short.store.cp_max) == ("postgres://db/x", 0, 100)
    both = LoginTokenModule.parse_config(
        {"store": {"type": "postgres", "dsn": "postgres://db/x", "cp_min": 100, "cp_max": 100}}
    )
    assert both.store.cp_min == 100
    one = LoginTokenModule.parse_config(
        {
            "store": {
                "type": "postgres",
                "dsn": "postgres://db/x",
                "cp_min": 1,
                "cp_max": 1,
                "shared_state": False,
            }
        }
    )
    assert (one.store.cp_min, one.store.cp_max, one.store.shared_state) == (1, 1, False)


@pytest.mark.parametrize(("raw", "message"), BAD_CONFIGS)
def test_each_mistake_is_one_error_naming_the_key(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        LoginTokenModule.parse_config(raw)
    assert str(caught.value) == message


def test_module_errors_are_placed_within_the_homeserver_config(tmp_path: Path) -> None:
    raw = homeserver_yaml(tmp_path, {"ratelimit": {"per_second": "fast"}})
    with pytest.raises(ConfigError) as caught:
        Homeserver(parse_homeserver_config(raw, str(tmp_path)), REACTOR)
    assert str(caught.value).startswith("modules[0].config.ratelimit.per_second: must be a positive")


def test_an_unimportable_module_is_named(tmp_path: Path) -> None:
    raw = homeserver_yaml(tmp_path)
    raw["modules"][0]["module"] = "no_such_package.Module"
    with pytest.raises(ConfigError) as caught:
        Homeserver(parse_homeserver_config(raw, str(tmp_path)), REACTOR)
    assert str(caught.value).startswith("modules[0].module: cannot import no_such_package")


HOST_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"server_name": None}, "server_name: must be a host name"),
    ({"server_name": "bad name!"}, "server_name: must be a host name"),
    ({"listeners": []}, "listeners: must be a non-empty list"),
    ({"listeners": [{"port": 70000}]}, "listeners[0].port: must be a whole number"),
    ({"listeners": [{"port": 8008, "tls": True}]}, "listeners[0].tls: TLS is not supported"),
    ({"listeners": [{"port": 8008, "bind_addresses": []}]}, "listeners[0].bind_addresses"),
    ({"database": {"name": "postgres"}}, "database.name: must be 'sqlite3' or 'psycopg2'"),
    ({"database": {"name": "psycopg2"}}, "database.args.database: is required"),
    ({"database": {"name": "psycopg2", "args": {"database": ""}}}, "database.args.database: must be a"),
    ({"database": {"name": "psycopg2", "args": {"database": "x", "port": "5432"}}}, "database.args.port"),
    ({"database": {"name": "psycopg2", "args": {"dbname": "x", "database": "x"}}}, "database.args.dbname"),
    ({"database": {"name": "psycopg2", "args": {"database": "x", "colour": 1}}}, "database.args.colour"),
    ({"database": {"name": "psycopg2", "args": {"database": "x", "cp_min": 6}}}, "database.args.cp_min"),
    ({"database": {"name": "sqlite3", "args": {"host": "x"}}}, "database.args.host: unknown option"),
    ({"database": {"name": "sqlite3", "args": {"database": 3}}}, "database.args.database"),
    ({"bcrypt_rounds": 2}, "bcrypt_rounds: must be a whole number from 4 to 31"),
    ({"modules": {"module": "x"}}, "modules: must be a list"),
    ({"modules": [{"module": "nodots"}]}, "modules[0].module: must be a dotted path"),
    ({"modules": [{"module": "a.B", "config": []}]}, "modules[0].config: must be a mapping"),
    ({"max_request_body_size": 10}, "max_request_body_size: must be a whole number"),
    ({"pid_file": "x"}, "pid_file: unknown option"),
    ({"soft_file_limit": -1}, "soft_file_limit: must be a whole number, 0 or more"),
    ({"soft_file_limit": "4096"}, "soft_file_limit: must be a whole number, 0 or more"),
    ({"soft_file_limit": 1.5}, "soft_file_limit: must be a whole number, 0 or more"),
    ({"soft_file_limit": True}, "soft_file_limit: must be a whole number, 0 or more"),
    ({"soft_file_limit": None}, "soft_file_limit: must be a whole number, 0 or more"),
]


@pytest.mark.parametrize(("change", "message"), HOST_ERRORS)
def test_homeserver_config_errors_name_the_key(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    raw = homeserver_yaml(tmp_path)
    raw.update(change)
    with pytest.raises(ConfigError) as caught:
        parse_homeserver_config(raw, str(tmp_path))
    assert str(caught.value).startswith(message), str(caught.value)


def test_soft_file_limit_is_0_the_hard_limit_unless_set(tmp_path: Path) -> None:
    raw = homeserver_yaml(tmp_path)
    assert parse_homeserver_config(raw, str(tmp_path)).soft_file_limit == 0
    raw["soft_file_limit"] = 65536
    assert parse_homeserver_config(raw, str(tmp_path)).soft_file_limit == 65536


def test_postgres_database_config_is_read_in_synapse_shape(tmp_path: Path) -> None:
    raw = homeserver_yaml(tmp_path)
    raw["database"] = {
        "name": "psycopg2",
        "args": {
            "host": "127.0.0.1",
            "port": 5433,
            "user": "synapse",
            "password": "secret",
            "database": "homeserver",
            "cp_min": 2,
            "cp_max": 4,
        },
    }
    database = parse_homeserver_config(raw, str(tmp_path)).database
    assert database.name == "psycopg2"
    assert dict(database.args) == {
        "host": "127.0.0.1",
        "port": 5433,
        "user": "synapse",
        "password": "secret",
        "dbname": "homeserver",
    }
    assert (database.cp_min, database.cp_max) == (2, 4)


def test_sample_config_is_valid_and_resolves_paths_beside_itself() -> None:
    config = load_config_file(str(ROOT / "sample_config.yaml"))
    assert config.server_name == "localhost"
    assert config.listeners[0].port == 8008
    assert config.database_path == str(ROOT / "homeserver.db")
    module_config = LoginTokenModule.parse_config(dict(config.modules[0].config))
    assert module_config.token_lifetime_ms == 120_000
    assert module_config.store.path == "login_tokens.db"


def start_with_store(tmp_path: Path, store: dict[str, Any]) -> Homeserver:
    return Homeserver(
        parse_homeserver_config(homeserver_yaml(tmp_path, {"store": store}), str(tmp_path)), REACTOR
    )


def test_an_unusable_store_path_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "no such folder" / "tokens.db"
    with pytest.raises(ConfigError) as caught:
        start_with_store(tmp_path, {"type": "sqlite", "path": str(missing)})
    assert str(caught.value) == f"modules[0].config.store.path: the folder {missing.parent} does not exist"

    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("not a database\n" * 100)
    with pytest.raises(ConfigError) as caught:
        start_with_store(tmp_path, {"type": "sqlite", "path": "notes.txt"})
    assert str(caught.value).startswith(
        f"modules[0].config.store.path: cannot use {not_a_database} as an SQLite database: "
    ), str(caught.value)


@pytest_twisted.ensureDeferred
async def test_store_paths_relative_absolute_and_in_memory(tmp_path: Path) -> None:
    config_dir, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    (config_dir / "data").mkdir(parents=True)
    elsewhere.mkdir()
    cases = [
        ("data/tokens.db", config_dir / "data" / "tokens.db"),
        (str(elsewhere / "t.db"), elsewhere / "t.db"),
    ]
    for path, expected in cases:
        hs = start_with_store(config_dir, {"type": "sqlite", "path": path})
        try:
            assert expected.exists(), path
        finally:
            await hs.stop()
    before = set(config_dir.iterdir())
    hs = start_with_store(config_dir, {"type": "sqlite", "path": ":memory:"})
    try:
        store = hs.modules[0].store
        await store.add_token(b"h" * 32, "@alice:test.local", 2**62)
        assert await store.count_tokens() == 1
        # SQLite's own in-memory database: no file appears beside the config.
        assert set(config_dir.iterdir()) == before
    finally:
        await hs.stop()


def test_whether_a_store_was_named_is_remembered() -> None:
    parse_config = LoginTokenModule.parse_config
    # A host that keeps the tokens itself (Synapse) refuses a named store rather than ignore it.
    assert parse_config({}).store_configured is False
    assert parse_config({"token_lifetime_ms": 1000}).store_configured is False
    assert parse_config({"store": {"type": "memory"}}).store_configured is True
    assert parse_config({"store": None}).store_configured is True
