"""The PostgreSQL pool (``login_token_module/stores/engines/postgres.py``) in the test process.

Against real servers: the session's cluster where the server stays up, and a
cluster of the test's own where it is stopped and started again. What is
checked is what the pool promises: a server that goes away is a
``StorageUnavailableError`` (a 503 for the client) and changes nothing, the
same pool serves again once the server is back with no restart, nothing is lost
or spent twice, a statement's own error stays the caller's, one warning per
outage says how many requests were refused, work goes to the least busy
connection, a failed transaction is rolled back, no server connection outlives
the pool or a lost generation, and a start-up refusal names its real reason.
After a restart the next request succeeds: a connection the server ended while it
waited is replaced before use, a job whose connection died before anything could
commit runs again once on a new one, and one that may have committed never does.
"""

from __future__ import annotations

import collections
import gc
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.logger import ILogObserver, globalLogPublisher

from login_token_module import tokens
from login_token_module.config import StoreConfig
from login_token_module.errors import StorageUnavailableError
from login_token_module.stores import make_state
from login_token_module.stores.engines import postgres
from login_token_module.stores.engines.connection import Conn
from login_token_module.stores.engines.postgres import PostgresConn, PostgresDatabase, describe
from login_token_module.stores.sql import STATE_SCHEMA, SqlBackend
from tests.conftest import postgres_unavailable
from tests.helpers import REACTOR
from tests.pgcluster import NOWHERE, Database, PostgresCluster, driver_missing_reason

T = TypeVar("T")
NOW = 1_700_000_000_000
STORE = "login-token-store"  # the pool's name, as make_state gives it
APPLICATION = "login_token_module"  # the pool's application_name, as make_state gives it


def _hash() -> bytes:
    return tokens.hash_token(tokens.generate_token())


def open_pg_backend(database: Database, tmp_path: Path, cp_min: int = 1, cp_max: int = 2) -> SqlBackend:
    """A PostgreSQL state backend as make_state opens it (not the conftest fixture of every kind)."""
    config = StoreConfig(type="postgres", dsn=database.dsn, cp_min=cp_min, cp_max=cp_max)
    backend = make_state(config, REACTOR, str(tmp_path))
    assert isinstance(backend, SqlBackend)
    return backend


def pool(backend: SqlBackend) -> PostgresDatabase:
    assert isinstance(backend.db, PostgresDatabase)
    return backend.db


def backend_pid(conn: Conn) -> int:
    return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])


def pool_connections(database: Database) -> list[int]:
    """The server processes of the pool's connections to ``database``, as the server lists them."""
    rows = database.cluster.query(
        "postgres",
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
        (database.name, APPLICATION),
    )
    return sorted(row[0] for row in rows)


def wait_for_connections(database: Database, count: int, timeout: float = 30) -> list[int]:
    """Waits until the server lists exactly ``count`` of the pool's connections."""
    deadline = time.monotonic() + timeout
    while True:
        pids = pool_connections(database)
        if len(pids) == count:
            return pids
        assert time.monotonic() < deadline, f"the server lists {len(pids)} pool connections, not {count}"
        time.sleep(0.05)


def cut_connections(database: Database) -> None:
    """The server ends every connection of the pool (as a restart or a network cut would)."""
    database.cluster.query(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
        (database.name, APPLICATION),
    )
    wait_for_connections(database, 0)


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The pool's warnings, as ``pool_warnings(warnings)``."""
    caplog.set_level(logging.WARNING, logger=postgres.__name__)
    return caplog


def pool_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == postgres.__name__ and r.levelno == logging.WARNING]


def assert_unavailable_warning(record: logging.LogRecord, refused: int) -> None:
    """One "unavailable" line: which database, how many requests refused since the last, why."""
    assert record.args is not None and len(record.args) == 3, record.args
    name, count, reason = record.args
    assert (name, count) == (STORE, refused)
    assert isinstance(reason, str) and reason and reason != "None"
    message = record.getMessage()
    assert "unavailable" in message and STORE in message and f" {refused} request(s)" in message


@pytest_twisted.ensureDeferred
async def test_a_stopped_server_is_unavailable_and_the_same_store_heals_losing_nothing(
    own_pg_cluster: PostgresCluster,
    tmp_path: Path,
    warnings: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = own_pg_cluster.create_database()
    backend = open_pg_backend(database, tmp_path, cp_min=1, cp_max=2)
    db = pool(backend)
    store = backend.tokens
    sessions = backend.uia_sessions(600)
    kept, spent_before = _hash(), _hash()
    try:
        await store.add_token(kept, "@alice:test", NOW + 60_000)
        await store.add_token(spent_before, "@alice:test", NOW + 60_000)
        assert (await store.spend_token(spent_before, NOW)).user_id_if_spent() == "@alice:test"
        # Both connections open before the outage (two jobs at once take both).
        assert len(set(await _both(db, backend_pid))) == 2

        # One warning per outage however many requests fail (an hour apart at most here).
        monkeypatch.setattr(postgres, "WARN_EVERY_SECONDS", 60.0)
        await threads.deferToThread(own_pg_cluster.stop, "fast")

        # The first request finds its connection dead, the rest cannot connect: all refused
        # with the module's error, none with a driver error or anything else.
        attempts: list[Callable[[], Awaitable[object]]] = [
            lambda: store.spend_token(kept, NOW),
            lambda: store.spend_token(kept, NOW),
            lambda: store.add_token(_hash(), "@alice:test", NOW + 60_000),
            lambda: sessions.create("@alice:test", "/login/get_token", NOW / 1000),
            lambda: store.count_tokens(),
        ]
        for attempt in attempts:
            with pytest.raises(StorageUnavailableError) as refused:
                await attempt()
            assert str(refused.value)  # what failed, for the log
            assert own_pg_cluster.password not in str(refused.value)
        [warning] = pool_warnings(warnings)
        assert_unavailable_warning(warning, 1)

        # The next warning counts every request refused since the last one.
        monkeypatch.setattr(postgres, "WARN_EVERY_SECONDS", 0.0)
        with pytest.raises(StorageUnavailableError):
            await store.spend_token(kept, NOW)
        [_, second] = pool_warnings(warnings)
        assert_unavailable_warning(second, len(attempts))
        assert own_pg_cluster.password not in warnings.text

        await threads.deferToThread(own_pg_cluster.start)
        # Back: the very next requests succeed on both connections, with no restart of ours.
        assert len(set(await _both(db, backend_pid))) == 2
        # Nothing issued or spent while it was down, nothing lost, nothing spent twice.
        assert await store.count_tokens() == 1
        assert (await store.spend_token(kept, NOW)).user_id_if_spent() == "@alice:test"
        assert (await store.spend_token(kept, NOW)).user_id_if_spent() is None
        assert (await store.spend_token(spent_before, NOW)).user_id_if_spent() is None
        assert await sessions.create("@alice:test", "/login/get_token", NOW / 1000)
        # The pool keeps only the connections in use: the dead ones are gone.
        open_now = list(db._open)
        assert len(open_now) == 2 and not any(conn.raw.closed for conn in open_now)
    finally:
        await backend.close()


async def _both(db: PostgresDatabase, job: Callable[[Conn], T]) -> list[T]:
    """``job`` twice at once (so on both connections); what each returned."""
    first, second = db.run(job), db.run(job)
    return [await first, await second]


def _too_slow(conn: Conn) -> None:
    """A statement the server cancels: its timeout is far shorter than its sleep."""
    conn.execute("SET statement_timeout = '10ms'")
    conn.execute("SELECT pg_sleep(5)")


@pytest_twisted.ensureDeferred
async def test_after_each_cut_every_connection_is_opened_afresh(
    pg_database: Database, tmp_path: Path, warnings: pytest.LogCaptureFixture
) -> None:
    """A connection the server ended while it waited in the pool is never used: every
    request once the server is back succeeds the first time, after any number of losses,
    and none was refused."""
    backend = open_pg_backend(pg_database, tmp_path, cp_min=1, cp_max=2)
    db = pool(backend)
    try:
        before = await _both(db, backend_pid)
        assert len(set(before)) == 2
        for _ in range(3):
            await threads.deferToThread(cut_connections, pg_database)
            # The very next job, and the next on each thread, run on new connections.
            first = await db.run(backend_pid)
            after = await _both(db, backend_pid)
            assert first in after and len(set(after)) == 2 and not set(after) & set(before)
            before = after
        assert pool_warnings(warnings) == []
    finally:
        await backend.close()


def restart(cluster: PostgresCluster) -> None:
    cluster.stop("fast")
    cluster.start()


@pytest_twisted.ensureDeferred
async def test_after_a_restart_the_next_request_succeeds_and_a_stopped_server_is_still_a_503(
    own_pg_cluster: PostgresCluster, tmp_path: Path, warnings: pytest.LogCaptureFixture
) -> None:
    database = own_pg_cluster.create_database()
    backend = open_pg_backend(database, tmp_path, cp_min=2, cp_max=2)
    db = pool(backend)
    store = backend.tokens
    kept = _hash()
    try:
        await store.add_token(kept, "@alice:test", NOW + 60_000)
        before = await _both(db, backend_pid)
        assert len(set(before)) == 2
        await threads.deferToThread(restart, own_pg_cluster)
        # The first statements after the restart, writes that commit as they run (which
        # are never run twice), succeed at once on each of the pool's threads.
        assert (await store.spend_token(kept, NOW)).user_id_if_spent() == "@alice:test"
        fresh = _hash()
        await store.add_token(fresh, "@alice:test", NOW + 60_000)
        assert await store.count_tokens() == 1
        after = await _both(db, backend_pid)
        assert len(set(after)) == 2 and not set(after) & set(before)
        assert pool_warnings(warnings) == []

        # Really away: still a 503 for every request, the one that finds its connection
        # ended too, and a warning; back again, served again.
        await threads.deferToThread(own_pg_cluster.stop, "fast")
        for _ in range(3):
            with pytest.raises(StorageUnavailableError):
                await store.spend_token(fresh, NOW)
        assert len(pool_warnings(warnings)) == 1
        await threads.deferToThread(own_pg_cluster.start)
        assert (await store.spend_token(fresh, NOW)).user_id_if_spent() == "@alice:test"
    finally:
        await backend.close()


class RestartsOnce(Generic[T]):
    """A job that restarts (or only stops) the server at a chosen point of its first run,
    as if the server went away while the job waited in the pool or ran; counts its runs."""

    def __init__(self, cluster: PostgresCluster, job: Callable[..., T]) -> None:
        self.cluster = cluster
        self.job = job
        self.runs = 0
        self.start_again = True

    def __call__(self, conn: Conn, *args: Any, **kwargs: Any) -> T:
        self.runs += 1
        return self.job(conn, self._restart if self.runs == 1 else lambda: None, *args, **kwargs)

    def _restart(self) -> None:
        self.cluster.stop("fast")
        if self.start_again:
            self.cluster.start()


def _rows(conn: Conn) -> int:
    return int(conn.execute("SELECT count(*) FROM probe").fetchone()[0])


def _insert_alone(conn: Conn, restart_now: Callable[[], None]) -> None:
    """A lone write (autocommit) sent after the server went away."""
    restart_now()
    conn.execute("INSERT INTO probe (x) VALUES (1)")


@pytest_twisted.ensureDeferred
async def test_a_job_whose_connection_died_before_anything_could_commit_runs_again_once(
    own_pg_cluster: PostgresCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = own_pg_cluster.create_database()
    backend = open_pg_backend(database, tmp_path, cp_min=1, cp_max=1)
    db = pool(backend)
    try:
        await db.run(lambda conn: conn.execute("CREATE TABLE probe (x INTEGER)"))

        # A transaction whose connection dies before COMMIT is sent: run again, once.
        def insert_in_transaction(conn: Conn, restart_now: Callable[[], None]) -> None:
            def run(txn: Conn) -> None:
                restart_now()
                txn.execute("INSERT INTO probe (x) VALUES (1)")

            conn.transaction(run)

        job = RestartsOnce(own_pg_cluster, insert_in_transaction)
        with caplog.at_level(logging.DEBUG, logger=postgres.__name__):
            await db.run(job)
        assert job.runs == 2
        assert await db.run(_rows) == 1
        # Said once, at INFO (nothing was lost): which store's connection, and the server's
        # reason; nothing else (the dead connection is closed quietly).
        (retried,) = [r for r in caplog.records if r.name == postgres.__name__]
        assert retried.levelno == logging.INFO
        assert isinstance(retried.args, tuple) and retried.args[0] == STORE, retried.args
        reason = retried.args[1]
        assert isinstance(reason, str) and "connection" in reason, reason
        said = f"A pooled PostgreSQL connection ({STORE}) had died; trying again: {reason}"
        assert retried.getMessage() == said

        # A lone SELECT changes nothing: run again too, with the same arguments.
        def count_between(conn: Conn, restart_now: Callable[[], None], low: int, *, high: int) -> int:
            restart_now()
            return int(
                conn.execute("SELECT count(*) FROM probe WHERE x BETWEEN ? AND ?", (low, high)).fetchone()[0]
            )

        counting = RestartsOnce(own_pg_cluster, count_between)
        assert await db.run(counting, 1, high=1) == 1
        assert counting.runs == 2

        def count(conn: Conn, restart_now: Callable[[], None]) -> int:
            restart_now()
            return _rows(conn)

        assert pool_warnings(caplog) == []

        # The server stays away: the second run cannot connect, and the job is a 503.
        stopped = RestartsOnce(own_pg_cluster, count)
        stopped.start_again = False
        with pytest.raises(StorageUnavailableError):
            await db.run(stopped)
        assert stopped.runs == 1
        await threads.deferToThread(own_pg_cluster.start)
        assert await db.run(_rows) == 1
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_job_on_a_connection_opened_for_it_is_not_run_again_when_it_dies(
    own_pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """Only a connection that waited in the pool may have died unseen; one opened for this
    very job that dies under it says the server is in trouble now: a 503, not a second try."""
    database = own_pg_cluster.create_database()
    backend = open_pg_backend(database, tmp_path, cp_min=0, cp_max=1)
    db = pool(backend)
    try:

        def select_one(conn: Conn, restart_now: Callable[[], None]) -> int:
            restart_now()
            return int(conn.execute("SELECT 1").fetchone()[0])

        fresh = RestartsOnce(own_pg_cluster, select_one)
        with pytest.raises(StorageUnavailableError):
            await db.run(fresh)
        assert fresh.runs == 1
        assert await db.run(lambda conn: conn.execute("SELECT 1").fetchone()[0]) == 1
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_job_that_may_have_committed_is_never_run_again(
    own_pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    database = own_pg_cluster.create_database()
    backend = open_pg_backend(database, tmp_path, cp_min=1, cp_max=1)
    db = pool(backend)
    try:
        await db.run(lambda conn: conn.execute("CREATE TABLE probe (x INTEGER)"))

        # A statement outside a transaction commits as it runs: once sent, it is not sent again.
        alone = RestartsOnce(own_pg_cluster, _insert_alone)
        with pytest.raises(StorageUnavailableError):
            await db.run(alone)
        assert alone.runs == 1

        # COMMIT sent on a connection that died: the write may have happened; not run again.
        def commit_lost(conn: Conn, restart_now: Callable[[], None]) -> None:
            def run(txn: Conn) -> None:
                txn.execute("INSERT INTO probe (x) VALUES (1)")
                restart_now()

            conn.transaction(run)

        committing = RestartsOnce(own_pg_cluster, commit_lost)
        with pytest.raises(StorageUnavailableError):
            await db.run(committing)
        assert committing.runs == 1
        # (Here neither write happened: the server was gone before it could take them.)
        assert await db.run(_rows) == 0
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_committed_transaction_makes_its_job_final_and_leaves_writes_guarded(
    own_pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    database = own_pg_cluster.create_database()
    backend = open_pg_backend(database, tmp_path, cp_min=1, cp_max=1)
    db = pool(backend)
    try:
        await db.run(lambda conn: conn.execute("CREATE TABLE probe (x INTEGER)"))

        # The transaction committed; the connection died before the job's next statement, a
        # mere SELECT. The job has written: it is not run again.
        def commit_then_count(conn: Conn, restart_now: Callable[[], None]) -> int:
            conn.transaction(lambda txn: txn.execute("INSERT INTO probe (x) VALUES (1)"))
            restart_now()
            return _rows(conn)

        committed = RestartsOnce(own_pg_cluster, commit_then_count)
        with pytest.raises(StorageUnavailableError):
            await db.run(committed)
        assert committed.runs == 1
        assert await db.run(_rows) == 1

        # A connection that ran a transaction, committed or failed by its own error, is back
        # in autocommit: a lone write it sends later still counts as committed once sent, and
        # is not sent again.
        await db.run(lambda conn: conn.transaction(lambda txn: txn.execute("SELECT 1")))
        import psycopg2

        with pytest.raises(psycopg2.errors.DivisionByZero):
            await db.run(lambda conn: conn.transaction(lambda txn: txn.execute("SELECT 1 / 0")))

        alone = RestartsOnce(own_pg_cluster, _insert_alone)
        with pytest.raises(StorageUnavailableError):
            await db.run(alone)
        assert alone.runs == 1
        assert await db.run(_rows) == 1
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_jobs_own_error_on_a_broken_connection_is_the_callers_and_the_next_job_reconnects(
    own_pg_cluster: PostgresCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The job raised its own error in a transaction whose connection had died unnoticed: the
    ROLLBACK fails (said at debug level only: the server rolls back by itself), the caller
    gets the job's error, and the broken connection is replaced before the next job."""
    database = own_pg_cluster.create_database()
    backend = open_pg_backend(database, tmp_path, cp_min=1, cp_max=1)
    db = pool(backend)
    try:
        await db.run(lambda conn: conn.execute("CREATE TABLE probe (x INTEGER)"))

        def fail_after_the_server_went(conn: Conn, restart_now: Callable[[], None]) -> None:
            def run(txn: Conn) -> None:
                txn.execute("INSERT INTO probe (x) VALUES (1)")
                restart_now()
                raise ValueError("the job's own error")

            conn.transaction(run)

        job = RestartsOnce(own_pg_cluster, fail_after_the_server_went)
        with (
            caplog.at_level(logging.DEBUG, logger=postgres.__name__),
            pytest.raises(ValueError, match="the job's own error"),
        ):
            await db.run(job)
        assert job.runs == 1
        said = [r.getMessage() for r in caplog.records if r.name == postgres.__name__]
        assert said == ["ROLLBACK failed on a broken connection"]
        assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == postgres.__name__)
        assert await db.run(_rows) == 0
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_statement_the_server_cancels_is_unavailable_and_its_connection_closed(
    pg_database: Database, tmp_path: Path
) -> None:
    backend = open_pg_backend(pg_database, tmp_path, cp_min=1, cp_max=1)
    db = pool(backend)
    used: list[PostgresConn] = []

    def too_slow(conn: Conn) -> None:
        assert isinstance(conn, PostgresConn)
        used.append(conn)
        _too_slow(conn)

    try:
        with pytest.raises(StorageUnavailableError) as refused:
            await db.run(too_slow)
        assert "statement timeout" in str(refused.value)
        # The connection is closed at once, not left open on the server until its next use ...
        assert used[0].raw.closed
        # ... and the next job gets a fresh one (the session setting went with the old one).
        assert await db.run(lambda conn: conn.execute("SHOW statement_timeout").fetchone()[0]) == "0"
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_statements_own_error_is_the_callers_and_keeps_the_connection(
    pg_database: Database, tmp_path: Path, warnings: pytest.LogCaptureFixture
) -> None:
    import psycopg2  # only where PostgreSQL is (pg_database skips or fails without it)

    backend = open_pg_backend(pg_database, tmp_path, cp_min=1, cp_max=1)
    db = pool(backend)
    try:
        pid = await db.run(backend_pid)
        with pytest.raises(psycopg2.errors.DivisionByZero):
            await db.run(lambda conn: conn.execute("SELECT 1 / 0"))
        token_hash = _hash()
        await backend.tokens.add_token(token_hash, "@alice:test", NOW + 1000)
        with pytest.raises(psycopg2.IntegrityError):
            await backend.tokens.add_token(token_hash, "@alice:test", NOW + 1000)
        # Not a lost server: the same connection goes on, and nothing was logged as unavailable.
        assert await db.run(backend_pid) == pid
        assert pool_warnings(warnings) == []
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_work_goes_to_the_least_busy_connection(pg_database: Database, tmp_path: Path) -> None:
    backend = open_pg_backend(pg_database, tmp_path, cp_min=1, cp_max=3)
    db = pool(backend)
    try:
        # Light load (one job at a time): one connection does everything.
        one_at_a_time = {await db.run(backend_pid) for _ in range(4)}
        assert len(one_at_a_time) == 1
        # A burst: every connection takes an equal share.
        burst = [db.run(backend_pid) for _ in range(6)]
        shares = collections.Counter([await d for d in burst])
        assert sorted(shares.values()) == [2, 2, 2], shares
        # Light load again: back on the first connection.
        assert {await db.run(backend_pid) for _ in range(3)} == one_at_a_time
        # Arguments reach the job, by position and by name.
        assert await db.run(_pair, 1, b=2) == (1, 2)
    finally:
        await backend.close()


def _pair(conn: Conn, a: int, *, b: int) -> tuple[int, int]:
    return a, b


@pytest_twisted.ensureDeferred
async def test_cp_min_connections_are_opened_before_any_request(
    pg_database: Database, tmp_path: Path
) -> None:
    backend = open_pg_backend(pg_database, tmp_path, cp_min=2, cp_max=3)
    try:
        # The server lists two of the pool's connections with no request made (and not three).
        await threads.deferToThread(wait_for_connections, pg_database, 2)
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_server_down_when_the_pool_starts_only_fails_the_first_requests() -> None:
    """The connections opened at start fail quietly (the first request tries again): no
    unhandled error, no traceback in the log."""
    reason = driver_missing_reason()
    if reason is not None:
        postgres_unavailable(reason)
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        # Twisted's "Unhandled error in Deferred" lines and their tracebacks.
        if event.get("log_namespace") == "twisted.internet.defer":
            failures.append(event)

    gc.collect()  # whatever earlier tests left behind is logged before we listen
    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        db = PostgresDatabase(REACTOR, dsn=NOWHERE, cp_min=1, cp_max=1)
        # Queued behind the start's own job on the one connection, so answered after it.
        with pytest.raises(StorageUnavailableError):
            await db.run(backend_pid)
        db.close()
        del db
        gc.collect()  # an unhandled failure is logged when its Deferred is collected
    finally:
        globalLogPublisher.removeObserver(observer)
    assert failures == []


@pytest_twisted.ensureDeferred
async def test_a_connection_outside_the_pool_reaches_the_same_database(pg_database: Database) -> None:
    db = PostgresDatabase(REACTOR, dsn=pg_database.dsn, args={"application_name": "a tool"}, cp_min=0)
    try:
        conn = db.connect()
        try:
            row = conn.execute("SELECT current_database(), current_setting('application_name')").fetchone()
            assert tuple(row) == (pg_database.name, "a tool")
        finally:
            conn.close()
    finally:
        db.close()


def test_describe_gives_the_first_line_of_a_driver_error_or_its_kind() -> None:
    assert describe(ValueError("connection refused\n\tIs the server running?\n")) == "connection refused"
    assert describe(ValueError("  one line  ")) == "one line"
    assert describe(ConnectionError()) == "ConnectionError"
    assert describe(ConnectionError("  \n ")) == "ConnectionError"


@pytest_twisted.ensureDeferred
async def test_a_failed_transaction_is_rolled_back_and_its_connection_serves_the_next_statement(
    pg_database: Database, tmp_path: Path
) -> None:
    import psycopg2

    backend = open_pg_backend(pg_database, tmp_path, cp_min=1, cp_max=1)
    db = pool(backend)

    def half_then_fail(conn: Conn) -> None:
        conn.execute("INSERT INTO rollback_probe (x) VALUES (1)")
        conn.execute("SELECT 1 / 0")

    try:
        await db.run(lambda conn: conn.execute("CREATE TABLE rollback_probe (x INTEGER)"))
        pid = await db.run(backend_pid)
        with pytest.raises(psycopg2.errors.DivisionByZero):
            await db.run(lambda conn: conn.transaction(half_then_fail))
        # The insert before the error is undone, and the same connection (not one left
        # inside an aborted transaction) answers the next statement.
        count = await db.run(lambda conn: conn.execute("SELECT count(*) FROM rollback_probe").fetchone()[0])
        assert count == 0
        assert await db.run(backend_pid) == pid
    finally:
        await backend.close()


def _same_conn(conn: Conn) -> Conn:
    time.sleep(0.2)  # keeps this connection busy, so a burst spreads over all of them
    return conn


@pytest_twisted.ensureDeferred
async def test_closing_the_pool_closes_its_server_connections(pg_database: Database, tmp_path: Path) -> None:
    backend = open_pg_backend(pg_database, tmp_path, cp_min=2, cp_max=2)
    db = pool(backend)
    conns = set(await _both(db, _same_conn))
    assert len(conns) == 2
    await threads.deferToThread(wait_for_connections, pg_database, 2)
    await backend.close()
    assert all(cast(PostgresConn, conn).raw.closed for conn in conns)
    await threads.deferToThread(wait_for_connections, pg_database, 0)


@pytest_twisted.ensureDeferred
async def test_after_one_connection_is_lost_the_others_are_closed_before_reconnecting(
    pg_database: Database, tmp_path: Path
) -> None:
    backend = open_pg_backend(pg_database, tmp_path, cp_min=2, cp_max=2)
    db = pool(backend)
    try:
        before = set(await _both(db, _same_conn))
        assert len(before) == 2
        with pytest.raises(StorageUnavailableError):
            await db.run(_too_slow)
        after = set(await _both(db, _same_conn))
        # Both threads reconnected, and the connections from before are closed, here and on
        # the server (none left open until the pool closes).
        assert len(after) == 2 and not after & before
        assert all(cast(PostgresConn, conn).raw.closed for conn in before)
        await threads.deferToThread(wait_for_connections, pg_database, 2)
    finally:
        await backend.close()


def test_start_up_names_the_real_reason_when_the_server_is_unreachable() -> None:
    reason = driver_missing_reason()
    if reason is not None:
        postgres_unavailable(reason)
    problem = postgres.start_up_problem(NOWHERE, {}, STATE_SCHEMA)
    assert problem is not None
    assert problem.startswith("cannot connect to PostgreSQL: ") and "Connection refused" in problem


def test_start_up_names_the_real_reason_when_the_tables_cannot_be_made(pg_database: Database) -> None:
    read_only = {"options": "-c default_transaction_read_only=on"}
    problem = postgres.start_up_problem(pg_database.dsn, read_only, STATE_SCHEMA)
    assert problem is not None
    assert problem.startswith("cannot create the tables in PostgreSQL: ") and "read-only" in problem


def test_start_up_refuses_a_database_written_by_a_newer_program(pg_database: Database) -> None:
    assert postgres.start_up_problem(pg_database.dsn, {}, STATE_SCHEMA) is None
    pg_database.cluster.query(
        pg_database.name,
        "UPDATE schema_versions SET version = version + 1 WHERE component = %s",
        (STATE_SCHEMA.component,),
    )
    problem = postgres.start_up_problem(pg_database.dsn, {}, STATE_SCHEMA)
    assert problem is not None
    assert "newer than this program knows" in problem


def test_start_up_without_psycopg2_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # ``import psycopg2`` now raises ImportError
    problem = postgres.start_up_problem(NOWHERE, {}, STATE_SCHEMA)
    assert problem is not None
    assert "pip install 'login_token_module[postgres]'" in problem
