"""SQLite off the reactor thread.

Each :class:`SqliteDatabase` owns one worker thread and one connection used
only by it. The reactor only ever hands work to the thread and gets a Deferred
back, so a slow disk or a lock held by another process never stalls other
requests. One thread per database is all SQLite can use for writes anyway, and
it lets the worker hand results back in batches (see BatchingWorker).
Connections use WAL, so readers in other processes sharing the file are not
blocked by a writer, and a busy timeout, so two processes writing at once wait
for each other instead of failing.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from twisted.internet.defer import Deferred

from login_token_module.threads import BatchingWorker

T = TypeVar("T")
P = ParamSpec("P")


class SqliteDatabase:
    def __init__(
        self,
        reactor: Any,
        path: str,
        *,
        schema: str = "",
        name: str = "sqlite",
    ) -> None:
        self.path = path
        self._reactor = reactor
        self._schema = schema
        self._worker = BatchingWorker(reactor, name)
        self._conn: sqlite3.Connection | None = None

    def connect(self) -> sqlite3.Connection:
        """A new connection with our settings and the schema in place.

        Also used directly (without the worker thread) by command-line tools that run
        outside the reactor.
        """
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA busy_timeout = 30000")
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL is still safe against a process crash (SIGKILL);
        # only an OS crash or power loss can lose the newest commits.
        conn.execute("PRAGMA synchronous = NORMAL")
        # Read pages through a memory map rather than a read() call each: with a
        # million tokens the index no longer fits SQLite's own small page cache.
        conn.execute("PRAGMA mmap_size = 268435456")
        if self._schema:
            conn.executescript(self._schema)
        return conn

    def _connection(self) -> sqlite3.Connection:
        # Only ever called on the worker thread.
        if self._conn is None:
            self._conn = self.connect()
        return self._conn

    def run(
        self,
        func: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Deferred[T]:
        """Run ``func(conn, *args)`` on the worker thread; the result comes back as a Deferred."""
        return self._worker.run(lambda: func(self._connection(), *args, **kwargs))

    def close(self) -> None:
        """Finish queued work, stop the thread and close the connection."""
        self._worker.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def unusable_database_reason(path: str, schema: str) -> str | None:
    """Why ``path`` cannot hold our database, or None if it can (it is then created).

    Called once at start-up, before anything is served, so that a bad path is a
    clear start-up error instead of a 500 on every request.
    """
    if path == ":memory:":
        return None
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    try:
        SqliteDatabase(None, path, schema=schema).connect().close()
    except sqlite3.Error as error:
        return f"cannot use {path} as an SQLite database: {error}"
    return None


def transaction(conn: sqlite3.Connection, func: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``func`` inside ``BEGIN IMMEDIATE`` so its reads and writes are one unit."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = func(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result
