"""PostgreSQL through psycopg2, off the reactor thread, surviving outages.

A :class:`PostgresDatabase` owns ``cp_max`` worker threads (Synapse's name),
each with its own connection in autocommit mode (a statement commits on its
own; ``conn.transaction`` groups several). The reactor hands each job to the
least busy thread and gets a Deferred back; a thread runs whatever has queued
up for it and hands the results back in one batch (``BatchingWorker``), so a
busy server wakes the reactor once per batch, not once per statement.
``cp_min`` connections are opened at start-up, the others when load first
needs them.

When PostgreSQL goes away (stopped, restarted, the network cut), the statement
that notices fails with :class:`StorageUnavailableError` (a Matrix 503 for the
client) and every connection opened before is dropped, so the other threads
reconnect instead of each failing once on a dead socket. While the server is
down every request tries to connect afresh (with a short timeout) and fails
the same way; once it is back, the next request connects and succeeds. No
restart is needed.

psycopg2 is imported only when a PostgreSQL database is configured, so the
module installs and runs without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from twisted.internet.defer import Deferred

from login_token_module.db import Conn
from login_token_module.errors import StorageUnavailableError
from login_token_module.schema import Schema, SchemaError, prepare
from login_token_module.threads import BatchingWorker

T = TypeVar("T")
P = ParamSpec("P")

logger = logging.getLogger(__name__)

# Connection settings used unless the config sets them: fail fast when the
# server is unreachable, and notice a dead peer without waiting for the OS.
CONNECT_DEFAULTS: Mapping[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
# At most one "unavailable" warning per database this often, however many requests fail.
WARN_EVERY_SECONDS = 5.0

_SQL_CACHE: dict[str, str] = {}


def driver() -> Any:
    """The psycopg2 module, or ImportError with what to install."""
    try:
        import psycopg2
    except ImportError:
        raise ImportError("PostgreSQL needs psycopg2: pip install 'login_token_module[postgres]'") from None
    return psycopg2


def _pg_sql(sql: str) -> str:
    """Our ``?`` placeholders as psycopg2's ``%s`` (and a literal ``%`` escaped)."""
    converted = _SQL_CACHE.get(sql)
    if converted is None:
        converted = sql.replace("%", "%%").replace("?", "%s")
        _SQL_CACHE[sql] = converted
    return converted


def describe(error: BaseException) -> str:
    """The first line of a driver error: says what failed, never a password."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class PostgresConn:
    """A :class:`login_token_module.db.Conn` over one psycopg2 connection (autocommit)."""

    engine: Literal["postgres"] = "postgres"

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cursor = self.raw.cursor()
        # Always pass a tuple, so psycopg2 always reads %% as a literal %.
        cursor.execute(_pg_sql(sql), tuple(params))
        return cursor

    def transaction(self, func: Callable[[Conn], T]) -> T:
        cursor = self.raw.cursor()
        cursor.execute("BEGIN")
        try:
            result = func(self)
        except BaseException:
            if not self.raw.closed:
                try:
                    cursor.execute("ROLLBACK")
                except Exception:  # the connection broke: the server rolls back for us
                    logger.debug("ROLLBACK failed on a broken connection")
            raise
        cursor.execute("COMMIT")
        return result

    def close(self) -> None:
        if not self.raw.closed:
            self.raw.close()


def _nothing(conn: Conn) -> None:
    """A job that only makes sure its thread's connection is open."""


def connect(dsn: str | None, args: Mapping[str, Any]) -> PostgresConn:
    """A new autocommit connection (blocking). Driver errors propagate."""
    psycopg2 = driver()
    kwargs = {**CONNECT_DEFAULTS, **args}
    raw = psycopg2.connect(dsn, **kwargs) if dsn else psycopg2.connect(**kwargs)
    raw.autocommit = True
    return PostgresConn(raw)


def start_up_problem(dsn: str | None, args: Mapping[str, Any], schema: Schema) -> str | None:
    """Connect once and bring ``schema`` up to date; why that failed, or None.

    Called at start-up, before anything is served, so an unreachable server or a
    database written by a newer program stops the process with one clear line.
    """
    try:
        psycopg2 = driver()
    except ImportError as error:
        return str(error)
    try:
        conn = connect(dsn, args)
    except psycopg2.Error as error:
        return f"cannot connect to PostgreSQL: {describe(error)}"
    try:
        prepare(conn, schema)
    except SchemaError as error:
        return str(error)
    except psycopg2.Error as error:
        return f"cannot create the tables in PostgreSQL: {describe(error)}"
    finally:
        conn.close()
    return None


class PostgresDatabase:
    engine: Literal["postgres"] = "postgres"
    shared_across_processes = True

    def __init__(
        self,
        reactor: Any,
        *,
        dsn: str | None = None,
        args: Mapping[str, Any] | None = None,
        cp_min: int = 1,
        cp_max: int = 5,
        name: str = "postgres",
    ) -> None:
        self._psycopg2 = driver()
        self._dsn = dsn
        self._args = dict(args or {})
        self._name = name
        self._workers = [BatchingWorker(reactor, f"{name}-{i}") for i in range(cp_max)]
        self._pending = [0] * cp_max
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[PostgresConn] = set()
        # Bumped whenever the server is found gone: connections from an older
        # generation are dropped before use rather than failing one by one.
        self._generation = 0
        self._last_warning = 0.0
        self._failures_since_warning = 0
        for worker in self._workers[:cp_min]:
            # Open the first connections now; a failure here only means the
            # first request will try again (start-up already checked the server).
            worker.run(self._call, _nothing).addErrback(lambda failure: None)

    def connect(self) -> PostgresConn:
        """A new connection outside the pool, for command-line tools (blocking)."""
        return connect(self._dsn, self._args)

    def run(
        self,
        func: Callable[Concatenate[Conn, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Deferred[T]:
        """Run ``func(conn, *args)`` in a pool thread; the result comes back as a Deferred."""
        # The least busy connection takes the job (ties: the first), so under
        # light load one connection does everything and under heavy load all do.
        pending = self._pending
        index = pending.index(min(pending))
        pending[index] += 1
        d = self._workers[index].run(self._call, func, *args, **kwargs)

        def done(result: Any) -> Any:
            pending[index] -= 1
            return result

        return d.addBoth(done)

    def _call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        conn: PostgresConn | None = None
        try:
            conn = self._connection()
            return func(conn, *args, **kwargs)
        except self._psycopg2.Error as error:
            if (
                conn is not None
                and not conn.raw.closed
                and not isinstance(error, self._psycopg2.OperationalError | self._psycopg2.InterfaceError)
            ):
                raise  # a problem with the statement, not the server: the caller's to handle
            self._lost(conn, error)
            raise StorageUnavailableError(describe(error)) from None

    def _connection(self) -> PostgresConn:
        local = self._local
        conn: PostgresConn | None = getattr(local, "conn", None)
        if conn is not None and (local.generation != self._generation or conn.raw.closed):
            self._drop(conn)
            conn = None
        if conn is None:
            generation = self._generation
            conn = connect(self._dsn, self._args)
            with self._lock:
                self._open.add(conn)
            local.conn, local.generation = conn, generation
        return conn

    def _drop(self, conn: PostgresConn) -> None:
        with self._lock:
            self._open.discard(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        try:
            conn.close()
        except Exception:
            logger.debug("Closing a broken PostgreSQL connection failed")

    def _lost(self, conn: PostgresConn | None, error: BaseException) -> None:
        """The server is unreachable or the connection broke: start afresh everywhere."""
        if conn is not None:
            self._drop(conn)
        with self._lock:
            self._generation += 1
            self._failures_since_warning += 1
            now = time.monotonic()
            if now - self._last_warning < WARN_EVERY_SECONDS:
                return
            failures, self._failures_since_warning = self._failures_since_warning, 0
            self._last_warning = now
        logger.warning(
            "PostgreSQL (%s) unavailable, %d request(s) refused with 503: %s",
            self._name,
            failures,
            describe(error),
        )

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        with self._lock:
            remaining, self._open = list(self._open), set()
        for conn in remaining:
            try:
                conn.close()
            except Exception:
                logger.debug("Closing a PostgreSQL connection failed")
