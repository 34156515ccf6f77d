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
from collections.abc import Callable
from typing import Any

from login_token_module.audit import fingerprint_prefix
from login_token_module.stores import (
    LineageEntry,
    Pairing,
    SpendOutcome,
    StartOutcome,
    TokenInfo,
    TokenSpend,
)
from login_token_module.stores.engines.connection import Conn, Database
from login_token_module.stores.engines.schema import Migration, Schema
from login_token_module.stores.memory import MemoryRateLimitStore, MemoryUiaSessionStore
from login_token_module.uia import MAX_SESSIONS_PER_USER, UiaSession

SWEEP_BATCH = 5_000

HISTORY_TABLE_SQLITE = (
    "CREATE TABLE login_token_history ("
    " token_hash BLOB PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT,"
    " issued_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL,"
    " outcome TEXT, finished_at_ms INTEGER, new_device_id TEXT) WITHOUT ROWID"
)
HISTORY_TABLE_POSTGRES = (
    "CREATE TABLE login_token_history ("
    " token_hash BYTEA PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT,"
    " issued_at_ms BIGINT NOT NULL, expires_at_ms BIGINT NOT NULL,"
    " outcome TEXT, finished_at_ms BIGINT, new_device_id TEXT)"
)

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
        # 3: the device that minted each token (revocation at its logout), and each
        # token's history: minted by which device, spent into which new device, when.
        Migration(
            sqlite=(
                "ALTER TABLE login_tokens ADD COLUMN device_id TEXT",
                "ALTER TABLE login_tokens ADD COLUMN issued_at_ms INTEGER",
                "CREATE INDEX login_tokens_device ON login_tokens (user_id, device_id)",
                HISTORY_TABLE_SQLITE,
                "CREATE INDEX login_token_history_user ON login_token_history (user_id, issued_at_ms)",
                "CREATE INDEX login_token_history_issued ON login_token_history (issued_at_ms)",
            ),
            postgres=(
                "ALTER TABLE login_tokens ADD COLUMN device_id TEXT, ADD COLUMN issued_at_ms BIGINT",
                "CREATE INDEX login_tokens_device ON login_tokens (user_id, device_id)",
                HISTORY_TABLE_POSTGRES,
                "CREATE INDEX login_token_history_user ON login_token_history (user_id, issued_at_ms)",
                "CREATE INDEX login_token_history_issued ON login_token_history (issued_at_ms)",
            ),
        ),
        # 4: pairings (sign in a device by code), and which tokens a pairing's approval minted.
        Migration(
            sqlite=(
                "CREATE TABLE login_token_pairings ("
                " pairing_hash BLOB PRIMARY KEY, user_code TEXT NOT NULL UNIQUE, seal_key BLOB NOT NULL,"
                " display_name TEXT, client_address TEXT NOT NULL, created_at_ms INTEGER NOT NULL,"
                " expires_at_ms INTEGER NOT NULL, status TEXT NOT NULL, user_id TEXT, device_id TEXT,"
                " approver_address TEXT, sealed_token BLOB, token_expires_at_ms INTEGER) WITHOUT ROWID",
                "CREATE INDEX login_token_pairings_address ON login_token_pairings (client_address, status)",
                "CREATE INDEX login_token_pairings_expiry ON login_token_pairings (expires_at_ms)",
                "ALTER TABLE login_token_history ADD COLUMN paired INTEGER NOT NULL DEFAULT 0",
            ),
            postgres=(
                "CREATE TABLE login_token_pairings ("
                " pairing_hash BYTEA PRIMARY KEY, user_code TEXT NOT NULL UNIQUE, seal_key BYTEA NOT NULL,"
                " display_name TEXT, client_address TEXT NOT NULL, created_at_ms BIGINT NOT NULL,"
                " expires_at_ms BIGINT NOT NULL, status TEXT NOT NULL, user_id TEXT, device_id TEXT,"
                " approver_address TEXT, sealed_token BYTEA, token_expires_at_ms BIGINT)",
                "CREATE INDEX login_token_pairings_address ON login_token_pairings (client_address, status)",
                "CREATE INDEX login_token_pairings_expiry ON login_token_pairings (expires_at_ms)",
                "ALTER TABLE login_token_history ADD COLUMN paired BOOLEAN NOT NULL DEFAULT FALSE",
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
    "sqlite": "DELETE FROM {table} WHERE limiter = ? AND key IN ("
    " SELECT key FROM {table} WHERE limiter = ? AND drained_at <= ? LIMIT ?)",
    "postgres": "DELETE FROM {table} WHERE limiter = ? AND key IN ("
    " SELECT key FROM {table} WHERE limiter = ? AND drained_at <= ? LIMIT ?"
    " FOR UPDATE SKIP LOCKED)",
}
_ACQUIRE = {
    "sqlite": "INSERT INTO {table} (limiter, key, drained_at) VALUES (?, ?, ?)"
    " ON CONFLICT (limiter, key) DO UPDATE"
    " SET drained_at = max({table}.drained_at, ?) + ?"
    " WHERE max({table}.drained_at, ?) + ? <= ?"
    " RETURNING drained_at",
    "postgres": "INSERT INTO {table} (limiter, key, drained_at) VALUES (?, ?, ?)"
    " ON CONFLICT (limiter, key) DO UPDATE"
    " SET drained_at = GREATEST({table}.drained_at, ?) + ?"
    " WHERE GREATEST({table}.drained_at, ?) + ? <= ?"
    " RETURNING drained_at",
}
_RECORD = {
    "sqlite": "INSERT INTO {table} (limiter, key, drained_at) VALUES (?, ?, ?)"
    " ON CONFLICT (limiter, key) DO UPDATE"
    " SET drained_at = max({table}.drained_at, ?) + ?",
    "postgres": "INSERT INTO {table} (limiter, key, drained_at) VALUES (?, ?, ?)"
    " ON CONFLICT (limiter, key) DO UPDATE"
    " SET drained_at = GREATEST({table}.drained_at, ?) + ?",
}
_REFUND = {
    "sqlite": "UPDATE {table} SET drained_at = max(drained_at - ?, ?) WHERE limiter = ? AND key = ?",
    "postgres": "UPDATE {table} SET drained_at = GREATEST(drained_at - ?, ?) WHERE limiter = ? AND key = ?",
}


# -- tokens ------------------------------------------------------------------------


def _add(
    conn: Conn,
    token_hash: bytes,
    user_id: str,
    expires_at_ms: int,
    device_id: str | None = None,
    issued_at_ms: int | None = None,
) -> None:
    token = (token_hash, user_id, expires_at_ms, device_id, issued_at_ms)
    if issued_at_ms is None:
        conn.execute(
            "INSERT INTO login_tokens (token_hash, user_id, expires_at_ms, device_id, issued_at_ms)"
            " VALUES (?, ?, ?, ?, ?)",
            token,
        )
        return
    history = (token_hash, user_id, device_id, issued_at_ms, expires_at_ms)
    if conn.engine == "postgres":
        # The token and its history in one statement (one round trip, one transaction).
        conn.execute(
            "WITH token AS (INSERT INTO login_tokens"
            " (token_hash, user_id, expires_at_ms, device_id, issued_at_ms) VALUES (?, ?, ?, ?, ?))"
            " INSERT INTO login_token_history (token_hash, user_id, device_id, issued_at_ms, expires_at_ms)"
            " VALUES (?, ?, ?, ?, ?)",
            (*token, *history),
        )
        return

    def run(txn: Conn) -> None:
        txn.execute(
            "INSERT INTO login_tokens (token_hash, user_id, expires_at_ms, device_id, issued_at_ms)"
            " VALUES (?, ?, ?, ?, ?)",
            token,
        )
        txn.execute(
            "INSERT INTO login_token_history (token_hash, user_id, device_id, issued_at_ms, expires_at_ms)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (token_hash) DO NOTHING",
            history,
        )

    conn.transaction(run)


_SPEND = {
    # Delete the token and mark its history spent in one statement; a token that
    # is gone or expired leaves the history as it was.
    "postgres": "WITH spent AS (DELETE FROM login_tokens WHERE token_hash = ?"
    " RETURNING token_hash, user_id, expires_at_ms, device_id, issued_at_ms),"
    " marked AS (UPDATE login_token_history SET outcome = 'spent', finished_at_ms = ?"
    "  WHERE token_hash IN (SELECT token_hash FROM spent WHERE expires_at_ms > ?))"
    " SELECT user_id, expires_at_ms, device_id, issued_at_ms FROM spent",
}


def _spend(conn: Conn, token_hash: bytes, now_ms: int) -> TokenSpend:
    if conn.engine == "postgres":
        row = conn.execute(_SPEND["postgres"], (token_hash, now_ms, now_ms)).fetchone()
    else:

        def run(txn: Conn) -> Any:
            found = txn.execute(
                "DELETE FROM login_tokens WHERE token_hash = ?"
                " RETURNING user_id, expires_at_ms, device_id, issued_at_ms",
                (token_hash,),
            ).fetchone()
            if found is not None and found[1] > now_ms:
                txn.execute(
                    "UPDATE login_token_history SET outcome = 'spent', finished_at_ms = ?"
                    " WHERE token_hash = ?",
                    (now_ms, token_hash),
                )
            return found

        row = conn.transaction(run)
    if row is not None:
        user_id, device_id = str(row[0]), _text(row[2])
        if row[1] <= now_ms:
            return TokenSpend("expired", user_id, device_id)
        return TokenSpend("spent", user_id, device_id, int(row[1]), None if row[3] is None else int(row[3]))
    # Not live: the history says why, if it still has the token.
    past = conn.execute(
        "SELECT user_id, device_id, outcome FROM login_token_history WHERE token_hash = ?", (token_hash,)
    ).fetchone()
    if past is None:
        return TokenSpend("unknown")
    outcome: SpendOutcome = (
        "reused" if past[2] == "spent" else "revoked" if past[2] == "revoked" else "expired"
    )
    return TokenSpend(outcome, str(past[0]), _text(past[1]))


def _unspend(conn: Conn, token_hash: bytes, spend: TokenSpend) -> bool:
    if spend.outcome != "spent" or spend.user_id is None or spend.expires_at_ms is None:
        return False
    token = (token_hash, spend.user_id, spend.expires_at_ms, spend.minted_by_device, spend.issued_at_ms)

    def run(txn: Conn) -> bool:
        added = txn.execute(
            "INSERT INTO login_tokens (token_hash, user_id, expires_at_ms, device_id, issued_at_ms)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (token_hash) DO NOTHING",
            token,
        ).rowcount
        if added != 1:
            return False
        txn.execute(
            "UPDATE login_token_history SET outcome = NULL, finished_at_ms = NULL, new_device_id = NULL"
            " WHERE token_hash = ? AND outcome = 'spent'",
            (token_hash,),
        )
        return True

    return conn.transaction(run)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _record_new_device(conn: Conn, token_hash: bytes, device_id: str) -> None:
    conn.execute(
        "UPDATE login_token_history SET new_device_id = ? WHERE token_hash = ?", (device_id, token_hash)
    )


_TOKEN_COLUMNS = "token_hash, user_id, device_id, issued_at_ms, expires_at_ms"


def _info(row: Any) -> TokenInfo:
    return TokenInfo(
        bytes(row[0]), str(row[1]), _text(row[2]), None if row[3] is None else int(row[3]), int(row[4])
    )


def _revoke(conn: Conn, where: str, params: tuple[Any, ...], now_ms: int) -> list[TokenInfo]:
    """Delete the live tokens ``where`` names and mark their history revoked, in one transaction."""

    def run(txn: Conn) -> list[TokenInfo]:
        rows = txn.execute(
            f"DELETE FROM login_tokens WHERE {where} AND expires_at_ms > ?"  # noqa: S608 (fixed conditions)
            f" RETURNING {_TOKEN_COLUMNS}",
            (*params, now_ms),
        ).fetchall()
        for row in rows:
            txn.execute(
                "UPDATE login_token_history SET outcome = 'revoked', finished_at_ms = ? WHERE token_hash = ?",
                (now_ms, row[0]),
            )
        return [_info(row) for row in rows]

    return conn.transaction(run)


def revoke_tokens(conn: Conn, user_id: str, now_ms: int, device_id: str | None = None) -> list[TokenInfo]:
    if device_id is None:
        return _revoke(conn, "user_id = ?", (user_id,), now_ms)
    return _revoke(conn, "user_id = ? AND device_id = ?", (user_id, device_id), now_ms)


def revoke_fingerprint(conn: Conn, fingerprint: str, now_ms: int) -> list[TokenInfo]:
    prefix = fingerprint_prefix(fingerprint)
    return _revoke(conn, "substr(token_hash, 1, ?) = ?", (len(prefix), prefix), now_ms)


def list_tokens(conn: Conn, now_ms: int, user_id: str | None = None) -> list[TokenInfo]:
    where: str = "expires_at_ms > ?"
    params: tuple[Any, ...] = (now_ms,)
    if user_id is not None:
        where, params = "user_id = ? AND expires_at_ms > ?", (user_id, now_ms)
    rows = conn.execute(
        f"SELECT {_TOKEN_COLUMNS} FROM login_tokens WHERE {where}"  # noqa: S608 (fixed conditions)
        " ORDER BY expires_at_ms, token_hash",
        params,
    ).fetchall()
    return [_info(row) for row in rows]


def lineage(conn: Conn, user_id: str) -> list[LineageEntry]:
    rows = conn.execute(
        "SELECT token_hash, user_id, device_id, issued_at_ms, expires_at_ms, outcome, finished_at_ms,"
        " new_device_id, paired FROM login_token_history WHERE user_id = ?"
        " ORDER BY issued_at_ms, token_hash",
        (user_id,),
    ).fetchall()
    return [
        LineageEntry(
            bytes(r[0]),
            str(r[1]),
            _text(r[2]),
            int(r[3]),
            int(r[4]),
            _text(r[5]),
            None if r[6] is None else int(r[6]),
            _text(r[7]),
            bool(r[8]),
        )
        for r in rows
    ]


def _count_outstanding(conn: Conn, now_ms: int) -> int:
    return int(
        conn.execute("SELECT COUNT(*) FROM login_tokens WHERE expires_at_ms > ?", (now_ms,)).fetchone()[0]
    )


_SWEEP_HISTORY = {
    "sqlite": "DELETE FROM login_token_history WHERE token_hash IN ("
    " SELECT token_hash FROM login_token_history WHERE issued_at_ms <= ? LIMIT ?)",
    "postgres": "DELETE FROM login_token_history WHERE token_hash IN ("
    " SELECT token_hash FROM login_token_history WHERE issued_at_ms <= ? LIMIT ? FOR UPDATE SKIP LOCKED)",
}


def _delete_history_batch(conn: Conn, before_ms: int) -> int:
    return int(conn.execute(_SWEEP_HISTORY[conn.engine], (before_ms, SWEEP_BATCH)).rowcount)


def _delete_expired_batch(conn: Conn, now_ms: int) -> int:
    cursor = conn.execute(_SWEEP_TOKENS[conn.engine], (now_ms, SWEEP_BATCH))
    return int(cursor.rowcount)


def _count(conn: Conn) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM login_tokens").fetchone()[0])


async def _in_batches(db: Database, batch: Callable[..., int], *args: Any) -> int:
    """Run a sweep's ``batch`` (deleting at most SWEEP_BATCH rows) until one comes up short.

    One batch per thread job, so other queries get their turn between batches.
    """
    removed = 0
    while True:
        count = await db.run(batch, *args)
        removed += count
        if count < SWEEP_BATCH:
            return removed


class SqlTokenStore:
    def __init__(self, db: Database, *, owns_db: bool = False) -> None:
        self._db = db
        self._owns_db = owns_db

    async def add_token(
        self,
        token_hash: bytes,
        user_id: str,
        expires_at_ms: int,
        *,
        device_id: str | None = None,
        issued_at_ms: int | None = None,
    ) -> None:
        await self._db.run(_add, token_hash, user_id, expires_at_ms, device_id, issued_at_ms)

    async def spend_token(self, token_hash: bytes, now_ms: int) -> TokenSpend:
        return await self._db.run(_spend, token_hash, now_ms)

    async def record_new_device(self, token_hash: bytes, device_id: str) -> None:
        await self._db.run(_record_new_device, token_hash, device_id)

    async def unspend_token(self, token_hash: bytes, spend: TokenSpend) -> bool:
        return await self._db.run(_unspend, token_hash, spend)

    async def revoke_tokens(
        self, user_id: str, now_ms: int, *, device_id: str | None = None
    ) -> list[TokenInfo]:
        return await self._db.run(revoke_tokens, user_id, now_ms, device_id)

    async def revoke_fingerprint(self, fingerprint: str, now_ms: int) -> list[TokenInfo]:
        fingerprint_prefix(fingerprint)  # a bad one is the caller's ValueError, before any thread
        return await self._db.run(revoke_fingerprint, fingerprint, now_ms)

    async def list_tokens(self, now_ms: int, user_id: str | None = None) -> list[TokenInfo]:
        return await self._db.run(list_tokens, now_ms, user_id)

    async def lineage(self, user_id: str) -> list[LineageEntry]:
        return await self._db.run(lineage, user_id)

    async def count_outstanding(self, now_ms: int) -> int:
        return await self._db.run(_count_outstanding, now_ms)

    async def delete_history(self, before_ms: int) -> int:
        return await _in_batches(self._db, _delete_history_batch, before_ms)

    async def delete_expired(self, now_ms: int) -> int:
        return await _in_batches(self._db, _delete_expired_batch, now_ms)

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
        return await _in_batches(self._db, _sweep_sessions_batch, now * 1000)

    async def count(self) -> int:
        return await self._db.run(_count_sessions)


# -- rate limits ---------------------------------------------------------------------

RATELIMIT_TABLE = "login_token_ratelimits"
_FORMATTED: dict[tuple[int, str, str], str] = {}


def _sql(statements: dict[str, str], engine: str, table: str) -> str:
    """A rate-limit statement for ``engine`` on ``table`` (the host keeps its own table)."""
    key = (id(statements), engine, table)
    found = _FORMATTED.get(key)
    if found is None:
        found = _FORMATTED[key] = statements[engine].format(table=table)
    return found


def _acquire(
    conn: Conn, table: str, limiter: str, key: str, now: float, interval: float, span: float
) -> float | None:
    """Count one action if it fits: None. Else the bucket's drained_at, for the retry hint."""
    row = conn.execute(
        _sql(_ACQUIRE, conn.engine, table),
        (limiter, key, now + interval, now, interval, now, interval, now + span),
    ).fetchone()
    if row is not None:
        return None
    # Gone already (swept, refunded to nothing): the next try will fit.
    found = _drained_at(conn, table, limiter, key)
    return now if found is None else found


def _drained_at(conn: Conn, table: str, limiter: str, key: str) -> float | None:
    row = conn.execute(
        f"SELECT drained_at FROM {table} WHERE limiter = ? AND key = ?",  # noqa: S608 (our own table name)
        (limiter, key),
    ).fetchone()
    return None if row is None else float(row[0])


def _record(conn: Conn, table: str, limiter: str, key: str, now: float, interval: float) -> None:
    conn.execute(_sql(_RECORD, conn.engine, table), (limiter, key, now + interval, now, interval))


def _refund(conn: Conn, table: str, limiter: str, key: str, now: float, interval: float) -> None:
    conn.execute(_sql(_REFUND, conn.engine, table), (interval, now, limiter, key))


def _sweep_buckets_batch(conn: Conn, table: str, limiter: str, now: float) -> int:
    cursor = conn.execute(_sql(_SWEEP_BUCKETS, conn.engine, table), (limiter, limiter, now, SWEEP_BATCH))
    return int(cursor.rowcount)


def _count_buckets(conn: Conn, table: str, limiter: str) -> int:
    query = f"SELECT COUNT(*) FROM {table} WHERE limiter = ?"  # noqa: S608 (our own table name)
    return int(conn.execute(query, (limiter,)).fetchone()[0])


class SqlRateLimitStore:
    """Leaky buckets in a table (``login_token_ratelimits``, or the host's own)."""

    def __init__(
        self, db: Database, name: str, per_second: float, burst_count: int, *, table: str = RATELIMIT_TABLE
    ) -> None:
        self._db = db
        self._table = table
        self.name = name
        self._interval = 1 / per_second
        self._span = burst_count / per_second

    def _retry_after_ms(self, drained_at: float, now: float) -> int | None:
        wait = max(drained_at, now) + self._interval - now - self._span
        if wait <= 0:
            return None
        return max(1, int(wait * 1000 + 0.999))

    async def acquire(self, key: str, now: float) -> int | None:
        drained_at = await self._db.run(
            _acquire, self._table, self.name, key, now, self._interval, self._span
        )
        if drained_at is None:
            return None
        # Refused: at least 1 ms, even if the bucket drained in the meantime.
        return self._retry_after_ms(drained_at, now) or 1

    async def record(self, key: str, now: float) -> None:
        await self._db.run(_record, self._table, self.name, key, now, self._interval)

    async def refund(self, key: str, now: float) -> None:
        await self._db.run(_refund, self._table, self.name, key, now, self._interval)

    async def sweep(self, now: float) -> int:
        return await _in_batches(self._db, _sweep_buckets_batch, self._table, self.name, now)

    async def count(self) -> int:
        return await self._db.run(_count_buckets, self._table, self.name)


# -- pairings -----------------------------------------------------------------------

_PAIRING_COLUMNS = (
    "pairing_hash, user_code, seal_key, display_name, client_address, created_at_ms, expires_at_ms,"
    " status, user_id, device_id, approver_address, sealed_token, token_expires_at_ms"
)
# PostgreSQL: starts from one address take turns (a transaction-scoped advisory
# lock on the address), so racing starts cannot all slip under the pending cap.
# The key's first number keeps the module's locks apart from anyone else's.
_PAIRING_LOCK = 0x4C54


def _pairing(row: Any) -> Pairing:
    return Pairing(
        pairing_hash=bytes(row[0]),
        user_code=str(row[1]),
        seal_key=bytes(row[2]),
        display_name=_text(row[3]),
        client_address=str(row[4]) or None,
        created_at_ms=int(row[5]),
        expires_at_ms=int(row[6]),
        status=row[7],
        user_id=_text(row[8]),
        device_id=_text(row[9]),
        approver_address=_text(row[10]),
        sealed_token=None if row[11] is None else bytes(row[11]),
        token_expires_at_ms=None if row[12] is None else int(row[12]),
    )


def _start_pairing(conn: Conn, pairing: Pairing, now_ms: int, max_pending: int) -> StartOutcome:
    address = pairing.client_address or ""

    def run(txn: Conn) -> StartOutcome:
        if txn.engine == "postgres":
            txn.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (_PAIRING_LOCK, address))
        # An expired pairing that still holds the code (not swept yet) gives it up.
        txn.execute(
            "DELETE FROM login_token_pairings WHERE user_code = ? AND expires_at_ms <= ?",
            (pairing.user_code, now_ms),
        )
        pending = txn.execute(
            "SELECT COUNT(*) FROM login_token_pairings"
            " WHERE client_address = ? AND status = 'pending' AND expires_at_ms > ?",
            (address, now_ms),
        ).fetchone()[0]
        if int(pending) >= max_pending:
            return "address_full"
        added = txn.execute(
            f"INSERT INTO login_token_pairings ({_PAIRING_COLUMNS})"  # noqa: S608 (fixed columns)
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', NULL, NULL, NULL, NULL, NULL) ON CONFLICT DO NOTHING",
            (
                pairing.pairing_hash,
                pairing.user_code,
                pairing.seal_key,
                pairing.display_name,
                address,
                pairing.created_at_ms,
                pairing.expires_at_ms,
            ),
        ).rowcount
        return "started" if added == 1 else "code_taken"

    return conn.transaction(run)


def _find_pairing(conn: Conn, user_code: str, now_ms: int) -> Pairing | None:
    row = conn.execute(
        f"SELECT {_PAIRING_COLUMNS} FROM login_token_pairings"  # noqa: S608 (fixed columns)
        " WHERE user_code = ? AND status = 'pending' AND expires_at_ms > ?",
        (user_code, now_ms),
    ).fetchone()
    return None if row is None else _pairing(row)


def _approve_pairing(
    conn: Conn,
    user_code: str,
    now_ms: int,
    user_id: str,
    device_id: str | None,
    approver_address: str | None,
    sealed_token: bytes,
    token_hash: bytes,
    token_expires_at_ms: int,
) -> Pairing | None:
    def run(txn: Conn) -> Pairing | None:
        # Only a pending pairing changes (the row lock decides racing approvals and
        # denials); it now expires with its token, if that is sooner.
        row = txn.execute(
            "UPDATE login_token_pairings SET status = 'approved', user_id = ?, device_id = ?,"  # noqa: S608
            " approver_address = ?, sealed_token = ?, token_expires_at_ms = ?,"
            " expires_at_ms = CASE WHEN expires_at_ms < ? THEN expires_at_ms ELSE ? END"
            " WHERE user_code = ? AND status = 'pending' AND expires_at_ms > ?"
            f" RETURNING {_PAIRING_COLUMNS}",
            (
                user_id,
                device_id,
                approver_address,
                sealed_token,
                token_expires_at_ms,
                token_expires_at_ms,
                token_expires_at_ms,
                user_code,
                now_ms,
            ),
        ).fetchone()
        if row is None:
            return None
        txn.execute(
            "UPDATE login_token_history SET paired = ? WHERE token_hash = ?",
            (True, token_hash),
        )
        return _pairing(row)

    return conn.transaction(run)


def _deny_pairing(
    conn: Conn, user_code: str, now_ms: int, user_id: str, device_id: str | None, approver_address: str | None
) -> Pairing | None:
    row = conn.execute(
        "UPDATE login_token_pairings SET status = 'denied', user_id = ?, device_id = ?,"  # noqa: S608
        " approver_address = ?"
        " WHERE user_code = ? AND status = 'pending' AND expires_at_ms > ?"
        f" RETURNING {_PAIRING_COLUMNS}",
        (user_id, device_id, approver_address, user_code, now_ms),
    ).fetchone()
    return None if row is None else _pairing(row)


def _poll_pairing(conn: Conn, pairing_hash: bytes, now_ms: int) -> Pairing | None:
    # An approved or denied pairing is delivered by deleting it: of racing polls, one
    # gets the row. A pending one is only read; if it was decided between the two
    # statements, the delete is tried once more (and either delivers it here, or
    # finds that a racing poll did).
    for _ in range(2):
        row = conn.execute(
            "DELETE FROM login_token_pairings WHERE pairing_hash = ? AND status <> 'pending'"  # noqa: S608
            f" AND expires_at_ms > ? RETURNING {_PAIRING_COLUMNS}",
            (pairing_hash, now_ms),
        ).fetchone()
        if row is not None:
            return _pairing(row)
        row = conn.execute(
            f"SELECT {_PAIRING_COLUMNS} FROM login_token_pairings"  # noqa: S608 (fixed columns)
            " WHERE pairing_hash = ? AND expires_at_ms > ?",
            (pairing_hash, now_ms),
        ).fetchone()
        if row is None or row[7] == "pending":
            return None if row is None else _pairing(row)
    return None


_SWEEP_PAIRINGS = {
    "sqlite": "DELETE FROM login_token_pairings WHERE pairing_hash IN ("
    " SELECT pairing_hash FROM login_token_pairings WHERE expires_at_ms <= ? LIMIT ?)",
    "postgres": "DELETE FROM login_token_pairings WHERE pairing_hash IN ("
    " SELECT pairing_hash FROM login_token_pairings WHERE expires_at_ms <= ? LIMIT ? FOR UPDATE SKIP LOCKED)",
}


def _sweep_pairings_batch(conn: Conn, now_ms: int) -> int:
    return int(conn.execute(_SWEEP_PAIRINGS[conn.engine], (now_ms, SWEEP_BATCH)).rowcount)


def _count_pairings(conn: Conn) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM login_token_pairings").fetchone()[0])


class SqlPairingStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def start(self, pairing: Pairing, now_ms: int, max_pending_per_address: int) -> StartOutcome:
        return await self._db.run(_start_pairing, pairing, now_ms, max_pending_per_address)

    async def find(self, user_code: str, now_ms: int) -> Pairing | None:
        return await self._db.run(_find_pairing, user_code, now_ms)

    async def approve(
        self,
        user_code: str,
        now_ms: int,
        *,
        user_id: str,
        device_id: str | None,
        approver_address: str | None,
        sealed_token: bytes,
        token_hash: bytes,
        token_expires_at_ms: int,
    ) -> Pairing | None:
        return await self._db.run(
            _approve_pairing,
            user_code,
            now_ms,
            user_id,
            device_id,
            approver_address,
            sealed_token,
            token_hash,
            token_expires_at_ms,
        )

    async def deny(
        self,
        user_code: str,
        now_ms: int,
        *,
        user_id: str,
        device_id: str | None,
        approver_address: str | None,
    ) -> Pairing | None:
        return await self._db.run(_deny_pairing, user_code, now_ms, user_id, device_id, approver_address)

    async def poll(self, pairing_hash: bytes, now_ms: int) -> Pairing | None:
        return await self._db.run(_poll_pairing, pairing_hash, now_ms)

    async def sweep(self, now_ms: int) -> int:
        return await _in_batches(self._db, _sweep_pairings_batch, now_ms)

    async def count(self) -> int:
        return await self._db.run(_count_pairings)


class SqlBackend:
    """Tokens in a SQL database; UIA sessions and rate limits there too when ``shared``,
    else in this process's memory (faster, for a single process)."""

    def __init__(self, reactor: Any, db: Database, *, shared: bool) -> None:
        self._reactor = reactor
        self.db = db
        self.shared = shared
        self.tokens = SqlTokenStore(db)
        self.pairings = SqlPairingStore(db)

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
