"""The UiaSessionStore and RateLimitStore contracts, run against every backend:
memory, SQLite (a real file) and PostgreSQL (a real server, a fresh database).

Time is passed in explicitly (``now``), so expiry and draining are exact here,
not a matter of sleeping. The shared backends are also checked for what makes
them shared: two backends opened on the same database (as two worker
processes would) see one set of sessions and one count per key, and racing
calls from many threads give the atomic answer.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from login_token_module.config import ConfigError, StoreConfig
from login_token_module.stores import StateBackend, make_state
from login_token_module.uia import MAX_SESSIONS_PER_USER
from tests.conftest import BackendFactory
from tests.helpers import REACTOR, challenge, start_in_process
from tests.pgcluster import NOWHERE, Database

T0 = 1_700_000_000.0
LIFETIME = 300.0

# -- UIA sessions ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_session_is_found_until_it_expires(backend: StateBackend) -> None:
    sessions = backend.uia_sessions(LIFETIME)
    created = await sessions.create("@alice:test", "/get_token", T0)
    assert len(created.session_id) >= 32
    found = await sessions.get(created.session_id, T0 + LIFETIME - 1)
    assert found is not None
    assert found.session_id == created.session_id
    assert (found.user_id, found.endpoint) == ("@alice:test", "/get_token")
    assert found.expires_at == pytest.approx(T0 + LIFETIME)
    assert await sessions.get(created.session_id, T0 + LIFETIME) is None
    assert await sessions.get("no-such-session", T0) is None


@pytest_twisted.ensureDeferred
async def test_a_session_is_spent_once_and_can_be_given_back(backend: StateBackend) -> None:
    sessions = backend.uia_sessions(LIFETIME)
    created = await sessions.create("@alice:test", "/get_token", T0)
    spent = await sessions.spend(created.session_id)
    assert spent is not None and spent.session_id == created.session_id
    assert await sessions.spend(created.session_id) is None
    assert await sessions.get(created.session_id, T0) is None

    await sessions.restore(spent)
    assert await sessions.get(created.session_id, T0) is not None
    assert await sessions.spend(created.session_id) is not None


@pytest_twisted.ensureDeferred
async def test_each_user_keeps_only_the_newest_sessions(backend: StateBackend) -> None:
    sessions = backend.uia_sessions(LIFETIME)
    other = await sessions.create("@bob:test", "/get_token", T0)
    made = [
        await sessions.create("@alice:test", "/get_token", T0 + i) for i in range(MAX_SESSIONS_PER_USER + 3)
    ]
    assert await sessions.count() == MAX_SESSIONS_PER_USER + 1
    for old in made[:3]:
        assert await sessions.get(old.session_id, T0) is None
    for kept in made[3:]:
        assert await sessions.get(kept.session_id, T0) is not None
    assert await sessions.get(other.session_id, T0) is not None


@pytest_twisted.ensureDeferred
async def test_a_restored_session_counts_as_the_newest(backend: StateBackend) -> None:
    sessions = backend.uia_sessions(LIFETIME)
    first = await sessions.create("@alice:test", "/get_token", T0)
    spent = await sessions.spend(first.session_id)
    assert spent is not None
    others = [
        await sessions.create("@alice:test", "/get_token", T0 + i) for i in range(1, MAX_SESSIONS_PER_USER)
    ]
    await sessions.restore(spent)
    newest = await sessions.create("@alice:test", "/get_token", T0 + 100)
    # The cap pushed out the oldest of the others, not the session given back.
    assert await sessions.get(spent.session_id, T0) is not None
    assert await sessions.get(others[0].session_id, T0) is None
    assert await sessions.get(newest.session_id, T0) is not None
    assert await sessions.count() == MAX_SESSIONS_PER_USER


@pytest_twisted.ensureDeferred
async def test_the_sweep_drops_expired_sessions_only(backend: StateBackend) -> None:
    sessions = backend.uia_sessions(LIFETIME)
    old = [await sessions.create(f"@old{i}:test", "/get_token", T0) for i in range(5)]
    new = [await sessions.create(f"@new{i}:test", "/get_token", T0 + 100) for i in range(3)]
    assert await sessions.sweep(T0 + LIFETIME) == len(old)
    assert await sessions.count() == len(new)
    for kept in new:
        assert await sessions.get(kept.session_id, T0 + LIFETIME) is not None
    assert await sessions.sweep(T0 + LIFETIME) == 0


@pytest_twisted.ensureDeferred
async def test_racing_spends_of_one_session_give_it_to_one(backend: StateBackend) -> None:
    sessions = backend.uia_sessions(LIFETIME)
    created = await sessions.create("@alice:test", "/get_token", T0)
    results = await defer.gatherResults(
        [defer.ensureDeferred(sessions.spend(created.session_id)) for _ in range(30)]
    )
    assert sum(result is not None for result in results) == 1


@pytest_twisted.ensureDeferred
async def test_a_session_begun_in_one_process_is_spent_in_another(
    open_shared_backend: BackendFactory,
) -> None:
    first, second = open_shared_backend(), open_shared_backend()
    try:
        assert first.shared and second.shared
        created = await first.uia_sessions(LIFETIME).create("@alice:test", "/get_token", T0)
        elsewhere = second.uia_sessions(LIFETIME)
        assert await elsewhere.get(created.session_id, T0) is not None
        assert await elsewhere.spend(created.session_id) is not None
        assert await first.uia_sessions(LIFETIME).spend(created.session_id) is None
    finally:
        await first.close()
        await second.close()


# -- rate limits -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_burst_then_refused_with_the_exact_wait(backend: StateBackend) -> None:
    limiter = backend.rate_limiter("test", per_second=0.5, burst_count=2)
    assert await limiter.acquire("@alice:test", T0) is None
    assert await limiter.acquire("@alice:test", T0) is None
    # Two actions in a bucket of two, draining one per 2 s: one more fits in 2 s.
    assert await limiter.acquire("@alice:test", T0) == 2000
    assert await limiter.acquire("@alice:test", T0 + 0.5) == 1500
    assert await limiter.acquire("@alice:test", T0 + 1.99) == 10
    assert await limiter.acquire("@alice:test", T0 + 1.9995) == 1  # half a millisecond, rounded up
    assert await limiter.acquire("@alice:test", T0 + 2) is None
    # A refused acquire counted nothing: after the wait exactly one more fits.
    assert await limiter.acquire("@alice:test", T0 + 2) == 2000


@pytest_twisted.ensureDeferred
async def test_one_a_minute_says_almost_a_minute(backend: StateBackend) -> None:
    limiter = backend.rate_limiter("test", per_second=1 / 60, burst_count=1)
    assert await limiter.acquire("@alice:test", T0) is None
    retry = await limiter.acquire("@alice:test", T0 + 1)
    assert retry is not None and 58_990 <= retry <= 59_010, retry
    assert await limiter.acquire("@alice:test", T0 + 60) is None


@pytest_twisted.ensureDeferred
async def test_keys_and_limiters_are_counted_apart(backend: StateBackend) -> None:
    tokens = backend.rate_limiter("tokens", per_second=0.01, burst_count=1)
    failures = backend.rate_limiter("failures", per_second=0.01, burst_count=1)
    assert await tokens.acquire("@alice:test", T0) is None
    assert await tokens.acquire("@bob:test", T0) is None
    assert await failures.acquire("@alice:test", T0) is None
    assert await tokens.acquire("@alice:test", T0) is not None
    assert await tokens.count() == 2
    assert await failures.count() == 1


@pytest_twisted.ensureDeferred
async def test_a_refund_gives_back_exactly_one_action(backend: StateBackend) -> None:
    limiter = backend.rate_limiter("test", per_second=0.001, burst_count=3)
    for _ in range(3):
        assert await limiter.acquire("@alice:test", T0) is None
    assert await limiter.acquire("@alice:test", T0) is not None
    await limiter.refund("@alice:test", T0)
    assert await limiter.acquire("@alice:test", T0) is None
    assert await limiter.acquire("@alice:test", T0) is not None
    # A refund of a key with nothing counted does not bank an extra action.
    await limiter.refund("@bob:test", T0)
    await limiter.refund("@bob:test", T0)
    for _ in range(3):
        assert await limiter.acquire("@bob:test", T0) is None
    assert await limiter.acquire("@bob:test", T0) is not None


@pytest_twisted.ensureDeferred
async def test_record_always_counts(backend: StateBackend) -> None:
    limiter = backend.rate_limiter("failures", per_second=0.1, burst_count=2)
    await limiter.record("@alice:test", T0)
    assert await limiter.acquire("@alice:test", T0) is None  # the second fits
    await limiter.record("@alice:test", T0)  # over the limit: counted all the same
    assert await limiter.acquire("@alice:test", T0) == 20_000  # two over: 20 s at 0.1/s
    assert await limiter.acquire("@alice:test", T0 + 19.9) == 100
    assert await limiter.acquire("@alice:test", T0 + 20) is None


@pytest_twisted.ensureDeferred
async def test_the_sweep_forgets_drained_keys_only(backend: StateBackend) -> None:
    limiter = backend.rate_limiter("test", per_second=1, burst_count=5)
    await limiter.record("@quick:test", T0)  # drained at T0 + 1
    for _ in range(4):
        await limiter.record("@busy:test", T0)  # drained at T0 + 4
    assert await limiter.sweep(T0 + 0.5) == 0
    assert await limiter.sweep(T0 + 1) == 1
    assert await limiter.count() == 1
    # The busy key still holds what has not drained.
    for _ in range(2):
        assert await limiter.acquire("@busy:test", T0 + 1) is None
    assert await limiter.acquire("@busy:test", T0 + 1) is not None
    assert await limiter.sweep(T0 + 10) == 1
    assert await limiter.count() == 0


@pytest_twisted.ensureDeferred
async def test_racing_acquires_let_exactly_the_burst_through(backend: StateBackend) -> None:
    limiter = backend.rate_limiter("test", per_second=0.001, burst_count=4)
    results = await defer.gatherResults(
        [defer.ensureDeferred(limiter.acquire("@alice:test", T0)) for _ in range(40)]
    )
    assert sum(result is None for result in results) == 4


@pytest_twisted.ensureDeferred
async def test_two_processes_count_one_bucket(open_shared_backend: BackendFactory) -> None:
    first, second = open_shared_backend(), open_shared_backend()
    try:
        assert first.shared and second.shared
        here = first.rate_limiter("get_token", per_second=0.001, burst_count=3)
        there = second.rate_limiter("get_token", per_second=0.001, burst_count=3)
        results = await defer.gatherResults(
            [defer.ensureDeferred((here if i % 2 else there).acquire("@alice:test", T0)) for i in range(30)]
        )
        assert sum(result is None for result in results) == 3
        assert await there.count() == 1
    finally:
        await first.close()
        await second.close()


# -- what several workers need -------------------------------------------------------


@pytest.mark.parametrize(
    ("store", "path", "words"),
    [
        (
            StoreConfig(type="memory"),
            ["store", "type"],
            "'memory' keeps tokens inside one process, but several worker processes serve this"
            " homeserver; use sqlite or postgres",
        ),
        (
            StoreConfig(type="sqlite", shared_state=False),
            ["store", "shared_state"],
            "must be true when several worker processes serve this homeserver"
            " (UIA sessions and rate limits would be split between them)",
        ),
        (
            StoreConfig(type="sqlite", path=":memory:"),
            ["store", "path"],
            "':memory:' cannot be shared between processes; use a file",
        ),
    ],
    ids=["memory", "sqlite_not_shared", "sqlite_in_memory"],
)
def test_state_one_process_keeps_is_refused_under_workers(
    tmp_path: Path, store: StoreConfig, path: list[str], words: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        make_state(store, REACTOR, str(tmp_path), multiple_workers=True)
    assert refused.value.path == path
    assert refused.value.reason == words


@pytest_twisted.ensureDeferred
async def test_a_sqlite_file_is_shared_state_under_workers(tmp_path: Path) -> None:
    store = StoreConfig(type="sqlite", path="state.db")
    backend = make_state(store, REACTOR, str(tmp_path), multiple_workers=True)
    try:
        assert backend.shared
        assert await backend.tokens.count_tokens() == 0
    finally:
        await backend.close()
    assert (tmp_path / "state.db").exists()


def test_an_unreachable_postgres_is_refused_at_start_up_naming_the_dsn(tmp_path: Path) -> None:
    store = StoreConfig(type="postgres", dsn=NOWHERE)
    with pytest.raises(ConfigError) as refused:
        make_state(store, REACTOR, str(tmp_path))
    assert refused.value.path == ["store", "dsn"]
    assert refused.value.reason


@pytest_twisted.ensureDeferred
async def test_postgres_connections_name_the_module_to_the_server(
    pg_database: Database, tmp_path: Path
) -> None:
    """What a DBA sees in pg_stat_activity: the pool's connections say whose they are."""
    backend = make_state(StoreConfig(type="postgres", dsn=pg_database.dsn), REACTOR, str(tmp_path))
    try:
        await backend.tokens.count_tokens()  # the pool has a connection open now
        import psycopg2  # only where PostgreSQL is (pg_database skips or fails without it)

        with psycopg2.connect(pg_database.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT application_name FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (pg_database.name,),
            )
            names = {row[0] for row in cur.fetchall()}
        assert names == {"login_token_module"}
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_the_module_tells_its_store_when_the_host_runs_workers(tmp_path: Path) -> None:
    """A host serving from several processes says so: the module then refuses state one
    process would keep, and keeps a SQLite file's UIA sessions in the file."""
    with pytest.raises(ConfigError) as refused:
        await start_in_process(tmp_path, {"store": {"type": "memory"}}, workers=2)
    assert refused.value.path == ["modules", 0, "config", "store", "type"]
    srv = await start_in_process(tmp_path, {"store": {"type": "sqlite", "path": "state.db"}}, workers=2)
    try:
        await srv.register("alice")
        access = await srv.client.access_token("alice")
        session = await challenge(srv, access)
        with sqlite3.connect(tmp_path / "state.db") as db:
            rows = db.execute("SELECT session_id FROM login_token_uia_sessions").fetchall()
        assert rows == [(session,)]
    finally:
        await srv.stop()


def test_a_sqlite_file_from_a_newer_program_is_refused_at_start_up(tmp_path: Path) -> None:
    """Checked before anything is served, so it is one start-up error, not a 500 per request."""
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("CREATE TABLE schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_versions VALUES ('login_token_module', 99)")
    with pytest.raises(ConfigError) as refused:
        make_state(StoreConfig(type="sqlite", path="state.db"), REACTOR, str(tmp_path))
    assert refused.value.path == ["store", "path"]
    assert refused.value.reason.startswith(
        "the database holds login_token_module tables at schema version 99, newer than this program knows"
    ), refused.value.reason


@pytest_twisted.ensureDeferred
async def test_the_sqlite_stores_thread_says_whose_it_is(tmp_path: Path) -> None:
    """What an operator sees in a thread dump (py-spy, faulthandler): the store's own name."""
    backend = make_state(StoreConfig(type="sqlite", path="state.db"), REACTOR, str(tmp_path))
    try:
        await backend.tokens.count_tokens()  # the store's thread is running now
        assert "login-token-store" in {thread.name for thread in threading.enumerate()}
    finally:
        await backend.close()
