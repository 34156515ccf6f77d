"""The SQLite store: tokens survive restarts and crashes, and several
processes on one machine can share the file.

Spending a token is a single ``DELETE ... RETURNING`` statement, so SQLite's
write lock makes it atomic across threads and processes: two logins racing on
one token cannot both see the row. An index on the expiry time keeps sweeps
from scanning live tokens, and sweeps delete in batches so they never hold the
write lock for long.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from login_token_module.sqlite import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS login_tokens (
    token_hash BLOB PRIMARY KEY,
    user_id TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS login_tokens_expiry ON login_tokens (expires_at_ms);
"""

SWEEP_BATCH = 5_000


def _add(conn: sqlite3.Connection, token_hash: bytes, user_id: str, expires_at_ms: int) -> None:
    conn.execute(
        "INSERT INTO login_tokens (token_hash, user_id, expires_at_ms) VALUES (?, ?, ?)",
        (token_hash, user_id, expires_at_ms),
    )


def _consume(conn: sqlite3.Connection, token_hash: bytes, now_ms: int) -> str | None:
    row = conn.execute(
        "DELETE FROM login_tokens WHERE token_hash = ? RETURNING user_id, expires_at_ms",
        (token_hash,),
    ).fetchone()
    if row is None or row[1] <= now_ms:
        return None
    return str(row[0])


def _delete_expired_batch(conn: sqlite3.Connection, now_ms: int) -> int:
    cursor = conn.execute(
        "DELETE FROM login_tokens WHERE token_hash IN ("
        " SELECT token_hash FROM login_tokens WHERE expires_at_ms <= ? LIMIT ?)",
        (now_ms, SWEEP_BATCH),
    )
    return cursor.rowcount


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM login_tokens").fetchone()[0])


class SqliteTokenStore:
    def __init__(self, reactor: Any, path: str) -> None:
        self._db = SqliteDatabase(reactor, path, schema=SCHEMA, name="login-token-store")

    async def add_token(self, token_hash: bytes, user_id: str, expires_at_ms: int) -> None:
        await self._db.run(_add, token_hash, user_id, expires_at_ms)

    async def consume_token(self, token_hash: bytes, now_ms: int) -> str | None:
        return await self._db.run(_consume, token_hash, now_ms)

    async def delete_expired(self, now_ms: int) -> int:
        removed = 0
        while True:
            batch = await self._db.run(_delete_expired_batch, now_ms)
            removed += batch
            if batch < SWEEP_BATCH:
                return removed

    async def count_tokens(self) -> int:
        return await self._db.run(_count)

    async def close(self) -> None:
        self._db.close()
