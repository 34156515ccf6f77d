"""The module's tables in Synapse's own database, through ``run_db_interaction``.

Inside Synapse the module keeps its UIA sessions, rate-limit buckets and the
hashes of the tokens it asked Synapse to mint (with the minting device, for
revocation at logout) in tables of its own in Synapse's database, SQLite or
PostgreSQL, so that every Synapse process (the main one and each worker) sees
the same state. The statements are the SQL backend's (``stores/sql.py``), run
through :class:`SynapseDatabase`, which implements the project's ``Database``
Protocol over Synapse's database pool:

- each ``run`` is one ``run_db_interaction``, at READ COMMITTED on PostgreSQL:
  the backend's races are single statements (``DELETE ... RETURNING``,
  ``INSERT ... ON CONFLICT DO UPDATE ... WHERE``) which READ COMMITTED settles
  by waiting on the row lock, where Synapse's default (REPEATABLE READ) would
  fail the loser with a serialization error and retry it a bounded number of
  times;
- :class:`SynapseConn` wraps Synapse's transaction: Synapse turns the ``?``
  placeholders into its driver's own on both engines, and every table, index
  and the schema-version table get the ``login_token_module_`` prefix
  (:func:`synapse_statement`), since Synapse has a ``login_tokens`` table of its
  own. Several statements inside ``conn.transaction`` are already one
  transaction: the interaction is;
- the tables are created and migrated by ``schema.prepare`` with the backend's
  ``STATE_SCHEMA``, versioned in ``login_token_module_schema_versions``, in the
  first interaction each process runs (and once at start-up): processes
  starting together take turns on PostgreSQL's advisory lock.

When Synapse's PostgreSQL cannot be reached (stopped, restarting, the network
cut), Synapse's pool surfaces the driver's ``OperationalError`` or
``InterfaceError`` (after its own retries), or Twisted's ``ConnectionLost``
when the rollback after a failure finds the connection gone.
:meth:`SynapseInternals.unavailable` turns those into the project's
:class:`StorageUnavailableError`, which get_token answers as 503 with
``Retry-After`` rather than 500, both for the module's own tables (``run``) and
for what a request asks of Synapse's (the adapter's resource). Synapse's pool
reconnects by itself once the server is back.

Synapse's log contexts: an interaction started from a request runs in the
request's context; one started outside any (the module's looping sweep runs in
the sentinel context) gets a context of its own, as Synapse wants every
database transaction to have.
"""

from __future__ import annotations

import inspect
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from login_token_module.errors import StorageUnavailableError
from login_token_module.stores.engines.connection import Conn, Cursor, Engine
from login_token_module.stores.engines.postgres import describe
from login_token_module.stores.engines.schema import prepare
from login_token_module.stores.sql import STATE_SCHEMA

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

PREFIX = "login_token_module_"

# Every name the SQL backend gives a table or an index: login_tokens*, login_token_*,
# and the schema-version table.
_NAMES = re.compile(r"\b(?:schema_versions|login_tokens\w*|login_token_\w+)\b")
_renamed: dict[str, str] = {}

# At most one warning this often while Synapse's database is unreachable.
WARN_EVERY_SECONDS = 10.0


def synapse_name(name: str) -> str:
    """The name a table or index of the SQL backend has in Synapse's database."""
    if name == "schema_versions":
        return PREFIX + "schema_versions"
    if name.startswith("login_tokens"):
        return PREFIX + "tokens" + name[len("login_tokens") :]
    if name.startswith("login_token_"):
        return PREFIX + name[len("login_token_") :]
    raise ValueError(f"{name!r} is not one of the module's tables")


def synapse_statement(sql: str) -> str:
    """``sql`` with the module's table and index names prefixed (the statements are fixed, so cached)."""
    found = _renamed.get(sql)
    if found is None:
        found = _renamed[sql] = _NAMES.sub(lambda match: synapse_name(match.group(0)), sql)
    return found


class SynapseConn:
    """The project's ``Conn`` over one Synapse ``LoggingTransaction``."""

    def __init__(self, txn: Any, engine: Engine) -> None:
        self._txn = txn
        self._engine: Engine = engine

    @property
    def engine(self) -> Engine:
        return self._engine

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        # Synapse's transaction converts '?' to the driver's placeholders itself. On
        # PostgreSQL Synapse refuses ``bytes`` parameters (they are too easily text sent
        # by mistake); the module's token hashes are binary on purpose: sent as memoryview.
        if self._engine == "postgres":
            params = [memoryview(value) if isinstance(value, bytes) else value for value in params]
        self._txn.execute(synapse_statement(sql), tuple(params))
        cursor: Cursor = self._txn
        return cursor

    def execute_synapse(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """A statement on Synapse's own tables, as written (no prefix)."""
        self._txn.execute(sql, tuple(params))
        cursor: Cursor = self._txn
        return cursor

    def transaction(self, func: Callable[[Conn], T]) -> T:
        # The whole interaction is one transaction already.
        return func(self)

    def close(self) -> None:
        raise NotImplementedError("Synapse owns its connections")


class SynapseInternals:
    """What the storage needs of Synapse beyond its public ModuleApi, looked up once.

    Raises ``AttributeError`` or ``ImportError`` when a Synapse release moved
    any of it; the adapter turns that into its one start-up ConfigError.
    """

    def __init__(self, api: Any) -> None:
        from synapse.logging.context import LoggingContext, PreserveLoggingContext, current_context
        from synapse.storage.engines import PostgresEngine, Sqlite3Engine
        from synapse.storage.engines._base import IsolationLevel

        pool = api._store.db_pool
        if "isolation_level" not in inspect.signature(pool.runInteraction).parameters:
            raise AttributeError("DatabasePool.runInteraction has no isolation_level")
        engine_object = pool.engine
        if isinstance(engine_object, PostgresEngine):
            self.engine: Engine = "postgres"
        elif isinstance(engine_object, Sqlite3Engine):
            self.engine = "sqlite"
        else:
            raise AttributeError(f"an unknown database engine {type(engine_object).__name__}")
        # What Synapse's pool raises when PostgreSQL cannot be reached. Only on PostgreSQL:
        # SQLite's OperationalError also says "no such table", which is no outage.
        self.unreachable: tuple[type[BaseException], ...] = ()
        if self.engine == "postgres":
            from twisted.enterprise.adbapi import ConnectionLost

            driver = engine_object.module
            self.unreachable = (driver.OperationalError, driver.InterfaceError, ConnectionLost)
        self._warning_lock = threading.Lock()
        self._last_warning = -WARN_EVERY_SECONDS
        self._refused_since_warning = 0
        self.read_committed = IsolationLevel.READ_COMMITTED
        self.logging_context = LoggingContext
        self.preserve_logging_context = PreserveLoggingContext
        self.current_context = current_context
        self.server_name = str(api.server_name)

    def unavailable(self, error: BaseException) -> StorageUnavailableError | None:
        """``error`` as the project's StorageUnavailableError if it says Synapse's database
        cannot be reached (logged, at most once every WARN_EVERY_SECONDS), else None."""
        if not isinstance(error, self.unreachable):
            return None
        reason = describe(error)
        with self._warning_lock:
            self._refused_since_warning += 1
            now = time.monotonic()
            if now - self._last_warning < WARN_EVERY_SECONDS:
                return StorageUnavailableError(reason)
            refused, self._refused_since_warning = self._refused_since_warning, 0
            self._last_warning = now
        logger.warning(
            "Synapse's database is unavailable, %d request(s) of login_token_module refused with 503: %s",
            refused,
            reason,
        )
        return StorageUnavailableError(reason)


class SynapseDatabase:
    """The project's ``Database`` Protocol over Synapse's database (see the module docstring)."""

    def __init__(self, api: Any, internals: SynapseInternals) -> None:
        self._api = api
        self._internals = internals
        self._prepared = False

    @property
    def engine(self) -> Engine:
        return self._internals.engine

    @property
    def shared_across_processes(self) -> bool:
        return True

    def run(
        self,
        func: Callable[Concatenate[Conn, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> defer.Deferred[T]:
        desc = "login_token_module_" + getattr(func, "__name__", "state").lstrip("_")
        if self._internals.current_context():
            return self._interaction(desc, func, args, kwargs)

        # Outside any log context (a background call): give the transaction one.
        async def in_own_context() -> T:
            with self._internals.logging_context(name=desc, server_name=self._internals.server_name):
                return await self._interaction(desc, func, args, kwargs)

        with self._internals.preserve_logging_context():
            return defer.ensureDeferred(in_own_context())

    def _interaction(
        self, desc: str, func: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> defer.Deferred[T]:
        result: defer.Deferred[T] = self._api.run_db_interaction(
            desc,
            self._in_txn,
            not self._prepared,
            func,
            args,
            kwargs,
            isolation_level=self._internals.read_committed,
        )
        if not self._prepared:
            result.addCallback(self._now_prepared)
        result.addErrback(self._unavailable)
        return result

    def _unavailable(self, failure: Failure) -> Failure:
        found = None if failure.value is None else self._internals.unavailable(failure.value)
        if found is not None:
            return Failure(found)
        return failure

    def _now_prepared(self, result: T) -> T:
        # Only once a transaction that prepared has committed.
        self._prepared = True
        return result

    def _in_txn(
        self,
        txn: Any,
        prepare_first: bool,
        func: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        conn = SynapseConn(txn, self._internals.engine)
        if prepare_first:
            # Until one has committed, each interaction of this process first brings the
            # tables up to date, in its own transaction (once they are, this finds nothing to do).
            found = prepare(conn, STATE_SCHEMA)
            if found != STATE_SCHEMA.version:
                logger.info(
                    "login_token_module tables in Synapse's database: schema version %d -> %d",
                    found,
                    STATE_SCHEMA.version,
                )
        return func(conn, *args, **kwargs)

    def prepare_now(self) -> defer.Deferred[None]:
        """Create or migrate the tables at start-up (the first ``run`` would anyway)."""
        return self.run(_tables_ready)

    def close(self) -> None:
        # Synapse owns the pool and closes it itself.
        return None


def _tables_ready(conn: Conn) -> None:
    """Nothing more: the interaction that runs it prepares the tables first."""
    return None
