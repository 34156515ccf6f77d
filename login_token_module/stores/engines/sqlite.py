"""SQLite off the reactor thread.

Each :class:`SqliteDatabase` owns one worker thread and one connection used
only by it. The reactor only ever hands work to the thread and gets a Deferred
back, so a slow disk or a lock held by another process never stalls other
requests. One thread per database is all SQLite can use for writes anyway, and
it lets the worker hand results back in batches (see BatchingWorker).
Connections use WAL, so readers in other processes sharing the file are not
blocked by a writer, and a busy timeout, so two processes writing at once wait
for each other instead of failing.

The database file is created 0600 before SQLite opens it, and SQLite gives its
``-wal``, ``-shm`` and ``-journal`` files the database file's mode: they hold
password hashes and token hashes, and are never readable by other users.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from twisted.internet.defer import Deferred

from login_token_module.stores.engines.connection import Conn
from login_token_module.stores.engines.schema import Schema, SchemaError, prepare
from login_token_module.stores.engines.threads import BatchingWorker

T = TypeVar("T")
P = ParamSpec("P")


class SqliteConn:
    """A :class:`~login_token_module.stores.engines.connection.Conn` over one sqlite3 connection
    (autocommit)."""

    engine: Literal["sqlite"] = "sqlite"

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.raw.execute(sql, params)

    def transaction(self, func: Callable[[Conn], T]) -> T:
        # IMMEDIATE takes the write lock up front, so a read-then-write
        # transaction cannot fail halfway on a lock another process took.
        self.raw.execute("BEGIN IMMEDIATE")
        try:
            result = func(self)
        except BaseException:
            self.raw.execute("ROLLBACK")
            raise
        self.raw.execute("COMMIT")
        return result

    def close(self) -> None:
        self.raw.close()


def create_private(path: str) -> None:
    """Create ``path`` empty with mode 0600 if nothing is there yet (SQLite would make it 0644).

    An existing file is left as it is. If the file cannot be made, SQLite says why when
    it tries to open it.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    os.close(fd)


class SqliteDatabase:
    engine: Literal["sqlite"] = "sqlite"

    def __init__(
        self,
        reactor: Any,
        path: str,
        *,
        schema: Schema | None = None,
        name: str = "sqlite",
    ) -> None:
        self.path = path
        self._reactor = reactor
        self._schema = schema
        self._worker = BatchingWorker(reactor, name)
        self._conn: SqliteConn | None = None

    @property
    def shared_across_processes(self) -> bool:
        return self.path != ":memory:"

    def connect(self) -> SqliteConn:
        """A new connection with our settings and the schema in place.

        Also used directly (without the worker thread) by command-line tools that run
        outside the reactor.
        """
        if self.path != ":memory:":
            create_private(self.path)
        raw = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        raw.execute("PRAGMA busy_timeout = 30000")
        if self.path != ":memory:":
            raw.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL is still safe against a process crash (SIGKILL);
        # only an OS crash or power loss can lose the newest commits.
        raw.execute("PRAGMA synchronous = NORMAL")
        # Read pages through a memory map rather than a read() call each: with a
        # million tokens the index no longer fits SQLite's own small page cache.
        raw.execute("PRAGMA mmap_size = 268435456")
        conn = SqliteConn(raw)
        if self._schema is not None:
            try:
                prepare(conn, self._schema)
            except BaseException:
                raw.close()
                raise
        return conn

    def _connection(self) -> SqliteConn:
        # Only ever called on the worker thread.
        if self._conn is None:
            self._conn = self.connect()
        return self._conn

    def run(
        self,
        func: Callable[Concatenate[Conn, P], T],
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


def unusable_database_reason(path: str, schema: Schema) -> str | None:
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
    except SchemaError as error:
        return str(error)
    return None
