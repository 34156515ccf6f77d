"""PostgreSQL through psycopg2, off the reactor thread, surviving outages.

A :class:`PostgresDatabase` owns ``cp_max`` worker threads (Synapse's name),
each with its own connection in autocommit mode (a statement commits on its
own; ``conn.transaction`` groups several). The reactor hands each job to the
least busy thread and gets a Deferred back; a thread runs whatever has queued
up for it and hands the results back in one batch (``BatchingWorker``), so a
busy server wakes the reactor once per batch, not once per statement.
``cp_min`` connections are opened at start-up, the others when load first
needs them.

A pooled connection can die while it waits (PostgreSQL restarted, the backend
ended). Before a job uses one, the thread looks at its socket: an idle
connection has nothing to read, so a readable socket means the server has
said goodbye (its termination message, or the end of the stream), and a new
connection is opened instead, at no round trip. A death that shows only when
a statement is sent (no goodbye reached us) is retried once on a new
connection, when that is safe: nothing the job sent could have committed yet
(inside ``conn.transaction`` before COMMIT was sent, or a lone SELECT). After
COMMIT was sent, or a statement that commits by itself (autocommit) was, the
write may have happened, so the job is not run again.

When PostgreSQL is really away (stopped, the network cut), the statement that
notices fails with :class:`StorageUnavailableError` (a Matrix 503 for the
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
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from twisted.internet.defer import Deferred

from login_token_module.errors import StorageUnavailableError
from login_token_module.stores.engines.connection import Conn
from login_token_module.stores.engines.schema import Schema, SchemaError, prepare
from login_token_module.stores.engines.threads import BatchingWorker

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


def _read_only(sql: str) -> bool:
    """Whether a statement run on its own (autocommit) changes nothing when it runs.

    A SELECT cannot hold INSERT, UPDATE or DELETE (only WITH can) and ours call no
    function that writes, so running one twice is harmless; anything else is
    taken to write.
    """
    return sql.lstrip()[:6].upper() == "SELECT"


class PostgresConn:
    """A :class:`login_token_module.stores.engines.connection.Conn` over one psycopg2 connection (autocommit).

    It notes whether what was sent since :meth:`begin_job` may have committed a
    write: a statement outside a transaction that is not a SELECT (autocommit
    commits it as it runs), or a COMMIT. Until then a job that fails because the
    connection died can be run again on another connection without doing anything
    twice: the server rolls back what a dead connection left uncommitted.
    """

    engine: Literal["postgres"] = "postgres"

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.may_have_committed = False
        self._in_transaction = False

    def begin_job(self) -> None:
        self.may_have_committed = False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if not self._in_transaction and not _read_only(sql):
            self.may_have_committed = True  # before it is sent: it may run even if we hear nothing
        cursor = self.raw.cursor()
        # Always pass a tuple, so psycopg2 always reads %% as a literal %.
        cursor.execute(_pg_sql(sql), tuple(params))
        return cursor

    def transaction(self, func: Callable[[Conn], T]) -> T:
        cursor = self.raw.cursor()
        cursor.execute("BEGIN")
        self._in_transaction = True
        try:
            result = func(self)
        except BaseException:
            self._in_transaction = False
            if not self.raw.closed:
                try:
                    cursor.execute("ROLLBACK")
                except Exception:  # the connection broke: the server rolls back for us
                    logger.debug("ROLLBACK failed on a broken connection")
            raise
        self._in_transaction = False
        self.may_have_committed = True
        cursor.execute("COMMIT")
        return result

    def said_goodbye(self) -> bool:
        """Whether the server ended this idle connection: closed here, or anything to read
        (an idle connection in autocommit is sent nothing until it sends a statement; an
        ended one has the server's termination message or the end of the stream waiting)."""
        if self.raw.closed:
            return True
        poller = select.poll()  # not select.select: descriptors can be above 1024
        poller.register(self.raw.fileno(), select.POLLIN)
        return bool(poller.poll(0))

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
            conn, pooled = self._connection()
            try:
                conn.begin_job()
                return func(conn, *args, **kwargs)
            except self._psycopg2.Error as error:
                if not (pooled and self._died_unused(conn, error)):
                    raise
                # It had died while it waited in the pool, and nothing of the job can have
                # taken effect: once more, on a new connection. If that fails too, the
                # server is really unreachable.
                logger.info(
                    "A pooled PostgreSQL connection (%s) had died; trying again: %s",
                    self._name,
                    describe(error),
                )
                self._discard_generation(conn)
                conn, _ = self._connection()
                conn.begin_job()
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

    def _died_unused(self, conn: PostgresConn, error: BaseException) -> bool:
        """Whether ``error`` says the connection is dead (not that a statement failed on a
        live one) and nothing sent on it could have committed."""
        return (
            isinstance(error, self._psycopg2.OperationalError | self._psycopg2.InterfaceError)
            and bool(conn.raw.closed)
            and not conn.may_have_committed
        )

    def _connection(self) -> tuple[PostgresConn, bool]:
        """This thread's connection, and whether it was opened before (pooled) rather than now."""
        local = self._local
        conn: PostgresConn | None = getattr(local, "conn", None)
        if conn is not None and (local.generation != self._generation or conn.said_goodbye()):
            self._drop(conn)
            conn = None
        if conn is not None:
            return conn, True
        generation = self._generation
        conn = connect(self._dsn, self._args)
        with self._lock:
            self._open.add(conn)
        local.conn, local.generation = conn, generation
        return conn, False

    def _drop(self, conn: PostgresConn) -> None:
        with self._lock:
            self._open.discard(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        try:
            conn.close()
        except Exception:
            logger.debug("Closing a broken PostgreSQL connection failed")

    def _discard_generation(self, conn: PostgresConn) -> None:
        """``conn`` died: drop it, and have the other threads open new connections too
        (theirs, opened as long ago, most likely died with it)."""
        self._drop(conn)
        with self._lock:
            self._generation += 1

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
