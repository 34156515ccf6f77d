"""The host's own tables: users, devices and access tokens.

Functions here take a ``sqlite3.Connection`` and run in a database thread (or
directly, from command-line tools). Access tokens are stored as SHA-256 hashes.
"""

from __future__ import annotations

import sqlite3
import time

from login_token_module.sqlite import transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    password_hash TEXT,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    display_name TEXT,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
CREATE TABLE IF NOT EXISTS access_tokens (
    token_hash BLOB PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS access_tokens_device ON access_tokens (user_id, device_id);
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


class UserExistsError(Exception):
    pass


def create_user(conn: sqlite3.Connection, user_id: str, password_hash: str) -> None:
    try:
        conn.execute(
            "INSERT INTO users (user_id, password_hash, created_at_ms) VALUES (?, ?, ?)",
            (user_id, password_hash, _now_ms()),
        )
    except sqlite3.IntegrityError:
        raise UserExistsError(user_id) from None


def set_password_hash(conn: sqlite3.Connection, user_id: str, password_hash: str) -> bool:
    cursor = conn.execute("UPDATE users SET password_hash = ? WHERE user_id = ?", (password_hash, user_id))
    return cursor.rowcount == 1


def get_password_hash(conn: sqlite3.Connection, user_id: str) -> str | None:
    row = conn.execute("SELECT password_hash FROM users WHERE user_id = ?", (user_id,)).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def user_exists(conn: sqlite3.Connection, user_id: str) -> bool:
    return conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is not None


def log_in_device(
    conn: sqlite3.Connection,
    user_id: str,
    device_id: str,
    display_name: str | None,
    token_hash: bytes,
) -> bool:
    """Create or reuse the device and give it this access token alone.

    Per the spec, logging in to an existing device replaces its old access
    tokens. Returns False (and changes nothing) if the user does not exist.
    """

    def run(txn: sqlite3.Connection) -> bool:
        if not user_exists(txn, user_id):
            return False
        now = _now_ms()
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

    return transaction(conn, run)


def get_access_token_owner(conn: sqlite3.Connection, token_hash: bytes) -> tuple[str, str] | None:
    row = conn.execute(
        "SELECT user_id, device_id FROM access_tokens WHERE token_hash = ?", (token_hash,)
    ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


def log_out_device(conn: sqlite3.Connection, user_id: str, device_id: str) -> None:
    """Delete the device and every access token it holds."""

    def run(txn: sqlite3.Connection) -> None:
        txn.execute("DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?", (user_id, device_id))
        txn.execute("DELETE FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id))

    transaction(conn, run)


def log_out_all(conn: sqlite3.Connection, user_id: str) -> None:
    def run(txn: sqlite3.Connection) -> None:
        txn.execute("DELETE FROM access_tokens WHERE user_id = ?", (user_id,))
        txn.execute("DELETE FROM devices WHERE user_id = ?", (user_id,))

    transaction(conn, run)


def list_devices(conn: sqlite3.Connection, user_id: str) -> list[tuple[str, str | None]]:
    rows = conn.execute(
        "SELECT device_id, display_name FROM devices WHERE user_id = ? ORDER BY created_at_ms", (user_id,)
    ).fetchall()
    return [(str(r[0]), None if r[1] is None else str(r[1])) for r in rows]
