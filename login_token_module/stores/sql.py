"""Tokens, UIA sessions and rate limits in SQL, for SQLite and PostgreSQL alike.

Every operation that must be atomic is one statement, so the database itself
decides races between threads, processes and machines:

- spending a token or a UIA session is ``DELETE ... RETURNING``: of two
  racers, one gets the row and the other finds nothing;
- a rate-limit action is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE``
  that counts the action only if it fits, on a row the database locks for the
  statement. Buckets are stored as the time they drain empty (``drained_at``,
  seconds): the count at ``now`` is ``(drained_at - now) * per_second``, so an
  action fits when ``max(drained_at, now) + 1/per_second <= now +
  burst_count/per_second``. One column, and the sweep is an index range.

Sweeps delete expired rows in batches; on PostgreSQL each batch takes only rows
no other worker is deleting (``FOR UPDATE SKIP LOCKED``), so several workers
sweeping at once neither wait for nor fight each other.
"""

from __future__ import annotations

import secrets
from typing import Any

from login_token_module.db import Conn, Database
from login_token_module.schema import Migration, Schema
from login_token_module.stores.memory import MemoryRateLimitStore, MemoryUiaSessionStore
from login_token_module.uia import MAX_SESSIONS_PER_USER, UiaSession

SWEEP_BATCH = 5_000

STATE_SCHEMA = Schema(
    "login_token_module",
    (
        # 1: tokens (what the first SQLite store created, hence IF NOT EXISTS).
        Migration(
            sqlite=(
                "CREATE TABLE IF NOT EXISTS login_tokens ("
                " token_hash BLOB PRIMARY KEY, user_id TEXT NOT NULL, expires_at_ms INTEGER NOT NULL"
                ") WITHOUT ROWID",
                "CREATE INDEX IF NOT EXISTS login_tokens_expiry ON login_tokens (expires_at_ms)",
            ),
            postgres=(
                "CREATE TABLE login_tokens ("
                " token_hash BYTEA PRIMARY KEY, user_id TEXT NOT NULL, expires_at_ms BIGINT NOT NULL)",
                "CREATE INDEX login_tokens_expiry ON login_tokens (expires_at_ms)",
            ),
        ),
        # 2: UIA sessions and rate-limit buckets, shared by worker processes.
        Migration(
            sqlite=(
                "CREATE TABLE login_token_uia_sessions ("
                " seq INTEGER PRIMARY KEY, session_id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,"
                " endpoint TEXT NOT NULL, expires_at_ms INTEGER NOT NULL)",
                "CREATE INDEX login_token_uia_sessions_user ON login_token_uia_sessions (user_id, seq)",
                "CREATE INDEX login_token_uia_sessions_expiry ON login_token_uia_sessions (expires_at_ms)",
                "CREATE TABLE login_token_ratelimits ("
                " limiter TEXT NOT NULL, key TEXT NOT NULL, drained_at REAL NOT NULL,"
                " PRIMARY KEY (limiter, key)) WITHOUT ROWID",
                "CREATE INDEX login_token_ratelimits_drained ON login_token_ratelimits (limiter, drained_at)",
            ),
            postgres=(
                "CREATE TABLE login_token_uia_sessions ("
                " seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, session_id TEXT NOT NULL UNIQUE,"
                " user_id TEXT NOT NULL, endpoint TEXT NOT NULL, expires_at_ms BIGINT NOT NULL)",
                "CREATE INDEX login_token_uia_sessions_user ON login_token_uia_sessions (user_id, seq)",
                "CREATE INDEX login_token_uia_sessions_expiry ON login_token_uia_sessions (expires_at_ms)",
                "CREATE TABLE login_token_ratelimits ("
                " limiter TEXT NOT NULL, key TEXT NOT NULL, drained_at DOUBLE PRECISION NOT NULL,"
                " PRIMARY KEY (limiter, key))",
                "CREATE INDEX login_token_ratelimits_drained ON login_token_ratelimits (limiter, drained_at)",
            ),
        ),
    ),
)


# Statements that differ between the engines, written out for each. On
# PostgreSQL, batch deletes skip rows another worker's sweep holds
# (FOR UPDATE SKIP LOCKED); SQLite's max() of two values is GREATEST there.
_SWEEP_TOKENS = {
    "sqlite": "DELETE FROM login_tokens WHERE token_hash IN ("
    " SELECT token_hash FROM login_tokens WHERE expires_at_ms <= ? LIMIT ?)",
    "postgres": "DELETE FROM login_tokens WHERE token_hash IN ("
    " SELECT token_hash FROM login_tokens WHERE expires_at_ms <= ? LIMIT ? FOR UPDATE SKIP LOCKED)",
}
_SWEEP_SESSIONS = {
    "sqlite": "DELETE FROM login_token_uia_sessions WHERE seq IN ("
    " SELECT seq FROM login_token_uia_sessions WHERE expires_at_ms <= ? LIMIT ?)",
    "postgres": "DELETE FROM login_token_uia_sessions WHERE seq IN ("
    " SELECT seq FROM login_token_uia_sessions WHERE expires_at_ms <= ? LIMIT ? FOR UPDATE SKIP LOCKED)",
}
_SWEEP_BUCKETS = {
    "sqlite": "DELETE FROM login_token_ratelimits WHERE limiter = ? AND key IN ("
    " SELECT key FROM login_token_ratelimits WHERE limiter = ? AND drained_at <= ? LIMIT ?)",
    "postgres": "DELETE FROM login_token_ratelimits WHERE limiter = ? AND key IN ("
    " SELECT key FROM login_token_ratelimits WHERE limiter = ? AND drained_at <= ? LIMIT ?"
    " FOR UPDATE SKIP LOCKED)",
}
_ACQUIRE = {
    "sqlite": "INSERT INTO login_token_ratelimits (limiter, key, drained_at) VALUES (?, ?, ?)"
    " ON CONFLICT (limiter, key) DO UPDATE"
    " SET drained_at = max(login_token_ratelimits.drained_at, ?) + ?"
    " WHERE max(login_token_ratelimits.drained_at, ?) + ? <= ?"
    " RETURNING drained_at",
    "postgres": "INSERT INTO login_token_ratelimits (limiter, key, drained_at) VALUES (?, ?, ?)"
    " ON CONFLICT (limiter, key) DO UPDATE"
    " SET drained_at = GREATEST(login_token_ratelimits.drained_at, ?) + ?"
    " WHERE GREATEST(login_token_ratelimits.drained_at, ?) + ? <= ?"
    " RETURNING drained_at",
}
_RECORD = {
    "sqlite": "INSERT INTO login_token_ratelimits (limiter, key, drained_at) VALUES (?, ?, ?)"
    " ON CONFLICT (limiter, key) DO UPDATE"
    " SET drained_at = max(login_token_ratelimits.drained_at, ?) + ?",
    "postgres": "INSERT INTO login_token_ratelimits (limiter, key, drained_at) VALUES (?, ?, ?)"
    " ON CONFLICT (limiter, key) DO UPDATE"
    " SET drained_at = GREATEST(login_token_ratelimits.drained_at, ?) + ?",
}
_REFUND = {
    "sqlite": "UPDATE login_token_ratelimits SET drained_at = max(drained_at - ?, ?)"
    " WHERE limiter = ? AND key = ?",
    "postgres": "UPDATE login_token_ratelimits SET drained_at = GREATEST(drained_at - ?, ?)"
    " WHERE limiter = ? AND key = ?",
}


# -- tokens ------------------------------------------------------------------------


def _add(conn: Conn, token_hash: bytes, user_id: str, expires_at_ms: int) -> None:
    conn.execute(
        "INSERT INTO login_tokens (token_hash, user_id, expires_at_ms) VALUES (?, ?, ?)",
        (token_hash, user_id, expires_at_ms),
    )


def _consume(conn: Conn, token_hash: bytes, now_ms: int) -> str | None:
    row = conn.execute(
        "DELETE FROM login_tokens WHERE token_hash = ? RETURNING user_id, expires_at_ms",
        (token_hash,),
    ).fetchone()
    if row is None or row[1] <= now_ms:
        return None
    return str(row[0])


def _delete_expired_batch(conn: Conn, now_ms: int) -> int:
    cursor = conn.execute(_SWEEP_TOKENS[conn.engine], (now_ms, SWEEP_BATCH))
    return int(cursor.rowcount)


def _count(conn: Conn) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM login_tokens").fetchone()[0])


class SqlTokenStore:
    def __init__(self, db: Database, *, owns_db: bool = False) -> None:
        self._db = db
        self._owns_db = owns_db

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
        if self._owns_db:
            self._db.close()


# -- UIA sessions --------------------------------------------------------------------


def _session(session_id: str, row: Any) -> UiaSession:
    return UiaSession(session_id, str(row[0]), str(row[1]), int(row[2]) / 1000)


def _hold_session(conn: Conn, session: UiaSession) -> None:
    """Insert ``session`` as the user's newest, dropping the user's oldest beyond the cap."""
    values = (session.session_id, session.user_id, session.endpoint, round(session.expires_at * 1000))
    if conn.engine == "postgres":
        # One statement: the DELETE does not see the new row (one snapshot),
        # so it keeps the cap minus one of the older sessions.
        conn.execute(
            "WITH added AS ("
            " INSERT INTO login_token_uia_sessions (session_id, user_id, endpoint, expires_at_ms)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (session_id) DO NOTHING RETURNING seq)"
            " DELETE FROM login_token_uia_sessions WHERE user_id = ? AND seq < ("
            "  SELECT min(seq) FROM (SELECT seq FROM login_token_uia_sessions WHERE user_id = ?"
            "  ORDER BY seq DESC LIMIT ?) AS kept)",
            (*values, session.user_id, session.user_id, MAX_SESSIONS_PER_USER - 1),
        )
        return

    def run(txn: Conn) -> None:
        txn.execute(
            "INSERT INTO login_token_uia_sessions (session_id, user_id, endpoint, expires_at_ms)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (session_id) DO NOTHING",
            values,
        )
        txn.execute(
            "DELETE FROM login_token_uia_sessions WHERE user_id = ? AND seq < ("
            " SELECT min(seq) FROM (SELECT seq FROM login_token_uia_sessions WHERE user_id = ?"
            " ORDER BY seq DESC LIMIT ?))",
            (session.user_id, session.user_id, MAX_SESSIONS_PER_USER),
        )

    conn.transaction(run)


def _get_session(conn: Conn, session_id: str, now_ms: float) -> UiaSession | None:
    row = conn.execute(
        "SELECT user_id, endpoint, expires_at_ms FROM login_token_uia_sessions"
        " WHERE session_id = ? AND expires_at_ms > ?",
        (session_id, now_ms),
    ).fetchone()
    return None if row is None else _session(session_id, row)


def _spend_session(conn: Conn, session_id: str) -> UiaSession | None:
    row = conn.execute(
        "DELETE FROM login_token_uia_sessions WHERE session_id = ?"
        " RETURNING user_id, endpoint, expires_at_ms",
        (session_id,),
    ).fetchone()
    return None if row is None else _session(session_id, row)


def _sweep_sessions_batch(conn: Conn, now_ms: float) -> int:
    cursor = conn.execute(_SWEEP_SESSIONS[conn.engine], (now_ms, SWEEP_BATCH))
    return int(cursor.rowcount)


def _count_sessions(conn: Conn) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM login_token_uia_sessions").fetchone()[0])


class SqlUiaSessionStore:
    def __init__(self, db: Database, lifetime_seconds: float) -> None:
        self._db = db
        self._lifetime = lifetime_seconds

    async def create(self, user_id: str, endpoint: str, now: float) -> UiaSession:
        session = UiaSession(secrets.token_urlsafe(24), user_id, endpoint, now + self._lifetime)
        await self._db.run(_hold_session, session)
        return session

    async def get(self, session_id: str, now: float) -> UiaSession | None:
        return await self._db.run(_get_session, session_id, now * 1000)

    async def spend(self, session_id: str) -> UiaSession | None:
        return await self._db.run(_spend_session, session_id)

    async def restore(self, session: UiaSession) -> None:
        await self._db.run(_hold_session, session)

    async def sweep(self, now: float) -> int:
        removed = 0
        while True:
            batch = await self._db.run(_sweep_sessions_batch, now * 1000)
            removed += batch
            if batch < SWEEP_BATCH:
                return removed

    async def count(self) -> int:
        return await self._db.run(_count_sessions)


# -- rate limits ---------------------------------------------------------------------


def _acquire(conn: Conn, limiter: str, key: str, now: float, interval: float, span: float) -> float | None:
    """Count one action if it fits: None. Else the bucket's drained_at, for the retry hint."""
    row = conn.execute(
        _ACQUIRE[conn.engine], (limiter, key, now + interval, now, interval, now, interval, now + span)
    ).fetchone()
    if row is not None:
        return None
    # Gone already (swept, refunded to nothing): the next try will fit.
    found = _drained_at(conn, limiter, key)
    return now if found is None else found


def _drained_at(conn: Conn, limiter: str, key: str) -> float | None:
    row = conn.execute(
        "SELECT drained_at FROM login_token_ratelimits WHERE limiter = ? AND key = ?", (limiter, key)
    ).fetchone()
    return None if row is None else float(row[0])


def _record(conn: Conn, limiter: str, key: str, now: float, interval: float) -> None:
    conn.execute(_RECORD[conn.engine], (limiter, key, now + interval, now, interval))


def _refund(conn: Conn, limiter: str, key: str, now: float, interval: float) -> None:
    conn.execute(_REFUND[conn.engine], (interval, now, limiter, key))


def _sweep_buckets_batch(conn: Conn, limiter: str, now: float) -> int:
    cursor = conn.execute(_SWEEP_BUCKETS[conn.engine], (limiter, limiter, now, SWEEP_BATCH))
    return int(cursor.rowcount)


def _count_buckets(conn: Conn, limiter: str) -> int:
    return int(
        conn.execute("SELECT COUNT(*) FROM login_token_ratelimits WHERE limiter = ?", (limiter,)).fetchone()[
            0
        ]
    )


class SqlRateLimitStore:
    def __init__(self, db: Database, name: str, per_second: float, burst_count: int) -> None:
        self._db = db
        self.name = name
        self.per_second = per_second
        self.burst_count = burst_count
        self._interval = 1 / per_second
        self._span = burst_count / per_second

    def _retry_after_ms(self, drained_at: float, now: float) -> int | None:
        wait = max(drained_at, now) + self._interval - now - self._span
        if wait <= 0:
            return None
        return max(1, int(wait * 1000 + 0.999))

    async def acquire(self, key: str, now: float) -> int | None:
        drained_at = await self._db.run(_acquire, self.name, key, now, self._interval, self._span)
        if drained_at is None:
            return None
        # Refused: at least 1 ms, even if the bucket drained in the meantime.
        return self._retry_after_ms(drained_at, now) or 1

    async def check(self, key: str, now: float) -> int | None:
        drained_at = await self._db.run(_drained_at, self.name, key)
        return None if drained_at is None else self._retry_after_ms(drained_at, now)

    async def record(self, key: str, now: float) -> None:
        await self._db.run(_record, self.name, key, now, self._interval)

    async def refund(self, key: str, now: float) -> None:
        await self._db.run(_refund, self.name, key, now, self._interval)

    async def sweep(self, now: float) -> int:
        removed = 0
        while True:
            batch = await self._db.run(_sweep_buckets_batch, self.name, now)
            removed += batch
            if batch < SWEEP_BATCH:
                return removed

    async def count(self) -> int:
        return await self._db.run(_count_buckets, self.name)


class SqlBackend:
    """Tokens in a SQL database; UIA sessions and rate limits there too when ``shared``,
    else in this process's memory (faster, for a single process)."""

    def __init__(self, reactor: Any, db: Database, *, shared: bool) -> None:
        self._reactor = reactor
        self.db = db
        self.shared = shared
        self.tokens = SqlTokenStore(db)

    def uia_sessions(self, lifetime_seconds: float) -> SqlUiaSessionStore | MemoryUiaSessionStore:
        if self.shared:
            return SqlUiaSessionStore(self.db, lifetime_seconds)
        return MemoryUiaSessionStore(self._reactor, lifetime_seconds)

    def rate_limiter(
        self, name: str, per_second: float, burst_count: int
    ) -> SqlRateLimitStore | MemoryRateLimitStore:
        if self.shared:
            return SqlRateLimitStore(self.db, name, per_second, burst_count)
        return MemoryRateLimitStore(self._reactor, per_second, burst_count)

    async def close(self) -> None:
        self.db.close()
