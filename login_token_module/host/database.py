"""The host's own tables: users, devices and access tokens.

Functions here take a :class:`login_token_module.stores.engines.connection.Conn` (SQLite or
PostgreSQL) and run in a database thread (or directly, from command-line
tools). Access tokens are stored as SHA-256 hashes. ``open_database`` picks the
engine from the ``database:`` config and prepares the schema at start-up.
"""

from __future__ import annotations

import time
from typing import Any

from login_token_module.config import ConfigError
from login_token_module.host.config import DatabaseConfig
from login_token_module.stores.engines.connection import Conn, Database
from login_token_module.stores.engines.schema import Migration, Schema

RATELIMIT_TABLE = "homeserver_ratelimits"

SCHEMA = Schema(
    "homeserver",
    (
        # 1: what the first SQLite host created (hence IF NOT EXISTS there).
        Migration(
            sqlite=(
                "CREATE TABLE IF NOT EXISTS users ("
                " user_id TEXT PRIMARY KEY, password_hash TEXT, created_at_ms INTEGER NOT NULL)",
                "CREATE TABLE IF NOT EXISTS devices ("
                " user_id TEXT NOT NULL, device_id TEXT NOT NULL, display_name TEXT,"
                " created_at_ms INTEGER NOT NULL, PRIMARY KEY (user_id, device_id))",
                "CREATE TABLE IF NOT EXISTS access_tokens ("
                " token_hash BLOB PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT NOT NULL,"
                " created_at_ms INTEGER NOT NULL) WITHOUT ROWID",
                "CREATE INDEX IF NOT EXISTS access_tokens_device ON access_tokens (user_id, device_id)",
            ),
            postgres=(
                "CREATE TABLE users ("
                " user_id TEXT PRIMARY KEY, password_hash TEXT, created_at_ms BIGINT NOT NULL)",
                "CREATE TABLE devices ("
                " user_id TEXT NOT NULL, device_id TEXT NOT NULL, display_name TEXT,"
                " created_at_ms BIGINT NOT NULL, PRIMARY KEY (user_id, device_id))",
                "CREATE TABLE access_tokens ("
                " token_hash BYTEA PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT NOT NULL,"
                " created_at_ms BIGINT NOT NULL)",
                "CREATE INDEX access_tokens_device ON access_tokens (user_id, device_id)",
            ),
        ),
        # 2: rc_login buckets, shared by worker processes (stores/sql.py's rate-limit shape).
        Migration(
            sqlite=(
                f"CREATE TABLE {RATELIMIT_TABLE} ("
                " limiter TEXT NOT NULL, key TEXT NOT NULL, drained_at REAL NOT NULL,"
                " PRIMARY KEY (limiter, key)) WITHOUT ROWID",
                f"CREATE INDEX {RATELIMIT_TABLE}_drained ON {RATELIMIT_TABLE} (limiter, drained_at)",
            ),
            postgres=(
                f"CREATE TABLE {RATELIMIT_TABLE} ("
                " limiter TEXT NOT NULL, key TEXT NOT NULL, drained_at DOUBLE PRECISION NOT NULL,"
                " PRIMARY KEY (limiter, key))",
                f"CREATE INDEX {RATELIMIT_TABLE}_drained ON {RATELIMIT_TABLE} (limiter, drained_at)",
            ),
        ),
    ),
)


def _now_ms() -> int:
    return int(time.time() * 1000)


class UserExistsError(Exception):
    pass


def create_user(conn: Conn, user_id: str, password_hash: str) -> None:
    cursor = conn.execute(
        "INSERT INTO users (user_id, password_hash, created_at_ms) VALUES (?, ?, ?)"
        " ON CONFLICT (user_id) DO NOTHING",
        (user_id, password_hash, _now_ms()),
    )
    if cursor.rowcount != 1:
        raise UserExistsError(user_id)


def set_password_hash(conn: Conn, user_id: str, password_hash: str) -> bool:
    cursor = conn.execute("UPDATE users SET password_hash = ? WHERE user_id = ?", (password_hash, user_id))
    return cursor.rowcount == 1


def get_password_hash(conn: Conn, user_id: str) -> str | None:
    row = conn.execute("SELECT password_hash FROM users WHERE user_id = ?", (user_id,)).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def user_exists(conn: Conn, user_id: str) -> bool:
    return conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is not None


def log_in_device(
    conn: Conn,
    user_id: str,
    device_id: str,
    display_name: str | None,
    token_hash: bytes,
) -> bool:
    """Create or reuse the device and give it this access token alone.

    Per the spec, logging in to an existing device replaces its old access
    tokens. Returns False (and changes nothing) if the user does not exist.
    """

    now = _now_ms()
    if conn.engine == "postgres":
        # One statement (one round trip, one transaction): the DELETE's snapshot
        # does not see the token the same statement adds.
        row = conn.execute(
            "WITH known AS (SELECT user_id FROM users WHERE user_id = ?),"
            " device AS (INSERT INTO devices (user_id, device_id, display_name, created_at_ms)"
            "  SELECT user_id, ?, ?, ? FROM known ON CONFLICT (user_id, device_id) DO NOTHING),"
            " dropped AS (DELETE FROM access_tokens"
            "  WHERE user_id IN (SELECT user_id FROM known) AND device_id = ?),"
            " added AS (INSERT INTO access_tokens (token_hash, user_id, device_id, created_at_ms)"
            "  SELECT ?, user_id, ?, ? FROM known RETURNING 1)"
            " SELECT count(*) FROM added",
            (user_id, device_id, display_name, now, device_id, token_hash, device_id, now),
        ).fetchone()
        return bool(row[0])

    def run(txn: Conn) -> bool:
        if not user_exists(txn, user_id):
            return False
        txn.execute(
            "INSERT INTO devices (user_id, device_id, display_name, created_at_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (user_id, device_id) DO NOTHING",
            (user_id, device_id, display_name, now),
        )
        txn.execute("DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?", (user_id, device_id))
        txn.execute(
            "INSERT INTO access_tokens (token_hash, user_id, device_id, created_at_ms) VALUES (?, ?, ?, ?)",
            (token_hash, user_id, device_id, now),
        )
        return True

    return conn.transaction(run)


def get_access_token_owner(conn: Conn, token_hash: bytes) -> tuple[str, str] | None:
    row = conn.execute(
        "SELECT user_id, device_id FROM access_tokens WHERE token_hash = ?", (token_hash,)
    ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


def device_signed_in(conn: Conn, user_id: str, device_id: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM access_tokens WHERE user_id = ? AND device_id = ? LIMIT 1", (user_id, device_id)
    ).fetchone()
    return row is not None


def log_out_device(conn: Conn, user_id: str, device_id: str) -> None:
    """Delete the device and every access token it holds."""

    def run(txn: Conn) -> None:
        txn.execute("DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?", (user_id, device_id))
        txn.execute("DELETE FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id))

    conn.transaction(run)


def log_out_all(conn: Conn, user_id: str) -> list[str]:
    """Delete every device of the user and their access tokens; returns the devices."""

    def run(txn: Conn) -> list[str]:
        txn.execute("DELETE FROM access_tokens WHERE user_id = ?", (user_id,))
        rows = txn.execute("DELETE FROM devices WHERE user_id = ? RETURNING device_id", (user_id,)).fetchall()
        return sorted(str(row[0]) for row in rows)

    return conn.transaction(run)


def list_devices(conn: Conn, user_id: str) -> list[tuple[str, str | None]]:
    rows = conn.execute(
        "SELECT device_id, display_name FROM devices WHERE user_id = ? ORDER BY created_at_ms", (user_id,)
    ).fetchall()
    return [(str(r[0]), None if r[1] is None else str(r[1])) for r in rows]


def open_database(config: DatabaseConfig, reactor: Any, *, name: str = "homeserver-db") -> Database:
    """The host's database from its ``DatabaseConfig``, schema prepared; ConfigError if unusable.

    Runs at start-up (it blocks while it connects and migrates), before anything is served.
    """
    if config.name == "psycopg2":
        from login_token_module.stores.engines import postgres

        problem = postgres.start_up_problem(None, config.args, SCHEMA)
        if problem is not None:
            raise ConfigError(["database"], problem)
        return postgres.PostgresDatabase(
            reactor, args=config.args, cp_min=config.cp_min, cp_max=config.cp_max, name=name
        )
    from login_token_module.stores.engines.sqlite import SqliteDatabase, unusable_database_reason

    problem = unusable_database_reason(config.path, SCHEMA)
    if problem is not None:
        raise ConfigError(["database", "args", "database"], problem)
    return SqliteDatabase(reactor, config.path, schema=SCHEMA, name=name)


def connect_now(config: DatabaseConfig) -> Conn:
    """A blocking connection with the schema in place, for command-line tools; ConfigError if unusable."""
    if config.name == "psycopg2":
        from login_token_module.stores.engines import postgres

        problem = postgres.start_up_problem(None, config.args, SCHEMA)
        if problem is not None:
            raise ConfigError(["database"], problem)
        return postgres.connect(None, config.args)
    from login_token_module.stores.engines.sqlite import SqliteDatabase, unusable_database_reason

    problem = unusable_database_reason(config.path, SCHEMA)
    if problem is not None:
        raise ConfigError(["database", "args", "database"], problem)
    return SqliteDatabase(None, config.path, schema=SCHEMA).connect()
