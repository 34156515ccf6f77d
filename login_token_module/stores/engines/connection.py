"""What SQLite and PostgreSQL have in common, as the code that uses them sees it.

Database functions (the host's tables, the SQL stores) take a :class:`Conn`
and run in a database thread. They write SQL once, with ``?`` placeholders;
the PostgreSQL connection turns those into its own. Every statement commits on
its own unless it runs inside ``conn.transaction(func)``. Where the dialects
differ (a column type, ``GREATEST`` against ``max``), the caller asks
``conn.engine``.

A database that cannot be reached (PostgreSQL down, a network cut) raises
:class:`login_token_module.errors.StorageUnavailableError`, which the HTTP layer
answers with a Matrix 503: the request changed nothing, and the next one may
succeed once the database is back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar

from twisted.internet.defer import Deferred

T = TypeVar("T")
P = ParamSpec("P")

Engine = Literal["sqlite", "postgres"]


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Conn(Protocol):
    """One database connection, used by one thread at a time."""

    @property
    def engine(self) -> Engine: ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement (``?`` placeholders) and return its cursor."""

    def transaction(self, func: Callable[[Conn], T]) -> T:
        """Run ``func(self)`` as one transaction: all of it is committed, or none."""

    def close(self) -> None: ...


class Database(Protocol):
    """A database the reactor hands work to; the work runs in its threads."""

    @property
    def engine(self) -> Engine: ...

    @property
    def shared_across_processes(self) -> bool:
        """Whether another process opening the same config sees the same data."""

    def run(
        self,
        func: Callable[Concatenate[Conn, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Deferred[T]:
        """``func(conn, *args, **kwargs)`` in a database thread; its result as a Deferred."""

    def close(self) -> None:
        """Finish queued work, stop the threads and close the connections."""
