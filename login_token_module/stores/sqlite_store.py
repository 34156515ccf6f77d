"""The SQLite store: tokens survive restarts and crashes, and several
processes on one machine can share the file.

Spending a token is a single ``DELETE ... RETURNING`` statement, so SQLite's
write lock makes it atomic across threads and processes: two logins racing on
one token cannot both see the row. An index on the expiry time keeps sweeps
from scanning live tokens, and sweeps delete in batches so they never hold the
write lock for long. The SQL itself is shared with PostgreSQL (stores/sql.py);
this is the store on a file of its own.
"""

from __future__ import annotations

from typing import Any

from login_token_module.stores.engines.sqlite import SqliteDatabase
from login_token_module.stores.sql import (
    STATE_SCHEMA,
    SWEEP_BATCH,
    SqlTokenStore,
    _delete_expired_batch,
)

SCHEMA = STATE_SCHEMA

__all__ = ["SCHEMA", "SWEEP_BATCH", "SqliteTokenStore", "_delete_expired_batch"]


class SqliteTokenStore(SqlTokenStore):
    def __init__(self, reactor: Any, path: str) -> None:
        self.sqlite = SqliteDatabase(reactor, path, schema=SCHEMA, name="login-token-store")
        super().__init__(self.sqlite, owns_db=True)
