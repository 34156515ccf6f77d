"""The TokenStore contract, run against every store: memory, SQLite on a real
file, and PostgreSQL on a real server (a throwaway cluster, a fresh database)."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from login_token_module import tokens
from login_token_module.audit import fingerprint_of_hash
from login_token_module.config import StoreConfig
from login_token_module.stores import LineageEntry, TokenInfo, TokenSpend, TokenStore, make_state
from login_token_module.stores.memory import SWEEP_SLICE, MemoryTokenStore
from login_token_module.stores.sql import SWEEP_BATCH, _spend
from login_token_module.stores.sqlite_store import SqliteTokenStore
from tests.helpers import REACTOR, start_in_process
from tests.pgcluster import Database

NOW = 1_700_000_000_000


def _hash() -> bytes:
    return tokens.hash_token(tokens.generate_token())


@pytest_twisted.async_yield_fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TokenStore]:
    if request.param == "memory":
        memory = MemoryTokenStore(REACTOR)
        yield memory
        await memory.close()
    elif request.param == "sqlite":
        sqlite = SqliteTokenStore(REACTOR, str(tmp_path / "tokens.db"))
        yield sqlite
        await sqlite.close()
    else:
        database: Database = request.getfixturevalue("pg_database")
        backend = make_state(StoreConfig(type="postgres", dsn=database.dsn), REACTOR, str(tmp_path))
        yield backend.tokens
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_token_is_spent_once(store: TokenStore) -> None:
    token_hash = _hash()
    await store.add_token(token_hash, "@alice:test", NOW + 1000)
    assert await store.count_tokens() == 1
    assert (await store.spend_token(token_hash, NOW)).user_id_if_spent() == "@alice:test"
    assert (await store.spend_token(token_hash, NOW)).user_id_if_spent() is None
    assert await store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_unknown_and_expired_tokens_give_nothing(store: TokenStore) -> None:
    assert (await store.spend_token(_hash(), NOW)).user_id_if_spent() is None
    token_hash = _hash()
    await store.add_token(token_hash, "@alice:test", NOW)
    # Expiry is exclusive: at expires_at_ms the token is already dead.
    assert (await store.spend_token(token_hash, NOW)).user_id_if_spent() is None


@pytest_twisted.ensureDeferred
async def test_tokens_are_kept_apart(store: TokenStore) -> None:
    first, second = _hash(), _hash()
    await store.add_token(first, "@alice:test", NOW + 1000)
    await store.add_token(second, "@bob:test", NOW + 1000)
    assert (await store.spend_token(second, NOW)).user_id_if_spent() == "@bob:test"
    assert (await store.spend_token(first, NOW)).user_id_if_spent() == "@alice:test"


@pytest_twisted.ensureDeferred
async def test_sweep_removes_only_expired_tokens(store: TokenStore) -> None:
    live = [_hash() for _ in range(5)]
    # More than one sweep slice / batch, so the slicing is exercised.
    dead = [_hash() for _ in range(SWEEP_SLICE + 7)]
    for token_hash in dead:
        await store.add_token(token_hash, "@old:test", NOW - 1)
    for token_hash in live:
        await store.add_token(token_hash, "@new:test", NOW + 60_000)
    spent = dead[0]
    assert (await store.spend_token(spent, NOW - 10)).user_id_if_spent() == "@old:test"

    assert await store.delete_expired(NOW) == len(dead) - 1
    assert await store.count_tokens() == len(live)
    for token_hash in live:
        assert (await store.spend_token(token_hash, NOW)).user_id_if_spent() == "@new:test"
    assert await store.delete_expired(NOW) == 0


@pytest_twisted.ensureDeferred
async def test_outstanding_tokens_leave_out_spent_and_expired_ones(store: TokenStore) -> None:
    # Issued in expiry order, as the module issues them (one lifetime for all).
    early, spent, late = _hash(), _hash(), _hash()
    for token_hash, expires in ((early, NOW + 100), (spent, NOW + 200), (late, NOW + 300)):
        await store.add_token(token_hash, "@alice:test", expires, device_id="OLD", issued_at_ms=NOW)
    assert await store.count_outstanding(NOW) == 3
    assert (await store.spend_token(spent, NOW)).user_id_if_spent() == "@alice:test"
    assert await store.count_outstanding(NOW) == 2
    assert await store.count_outstanding(NOW + 100) == 1  # early has expired (exclusive)
    assert await store.count_outstanding(NOW + 300) == 0
    assert await store.count_tokens() == 2  # expired but not swept yet


@pytest_twisted.ensureDeferred
async def test_revoking_one_device_leaves_the_users_other_tokens(store: TokenStore) -> None:
    """A user with one token, and one with tokens from two devices (and a second from one)."""
    bob = _hash()
    await store.add_token(bob, "@bob:test", NOW + 1000, device_id="PHONE", issued_at_ms=NOW)
    phone, laptop, phone_again = _hash(), _hash(), _hash()
    for token_hash, device in ((phone, "PHONE"), (laptop, "LAPTOP"), (phone_again, "PHONE")):
        await store.add_token(token_hash, "@alice:test", NOW + 1000, device_id=device, issued_at_ms=NOW)

    revoked = await store.revoke_tokens("@alice:test", NOW, device_id="PHONE")
    assert sorted(info.token_hash for info in revoked) == sorted([phone, phone_again])
    assert [info.token_hash for info in await store.list_tokens(NOW, "@alice:test")] == [laptop]
    assert [info.token_hash for info in await store.list_tokens(NOW, "@bob:test")] == [bob]
    assert (await store.spend_token(phone, NOW)).user_id_if_spent() is None
    assert await store.revoke_tokens("@bob:test", NOW, device_id="LAPTOP") == []

    revoked = await store.revoke_tokens("@bob:test", NOW)
    assert [info.token_hash for info in revoked] == [bob]
    assert await store.list_tokens(NOW, "@bob:test") == []
    assert (await store.spend_token(laptop, NOW)).user_id_if_spent() == "@alice:test"
    assert await store.list_tokens(NOW, "@alice:test") == []
    assert await store.count_outstanding(NOW) == 0


@pytest_twisted.ensureDeferred
async def test_a_refused_spend_says_why_and_whose_the_token_was(store: TokenStore) -> None:
    """The outcomes metrics and the audit trail report, from the token's history."""
    alice = "@alice:test"
    spent, revoked, dead = _hash(), _hash(), _hash()
    for token_hash in (spent, revoked):
        await store.add_token(token_hash, alice, NOW + 100, device_id="PHONE", issued_at_ms=NOW - 1)
    await store.add_token(dead, alice, NOW, device_id="LAPTOP", issued_at_ms=NOW - 2)
    no_history = _hash()  # a token from before lineage: no issue time, so no history
    await store.add_token(no_history, alice, NOW + 100, device_id="TABLET")

    assert await store.spend_token(spent, NOW) == TokenSpend("spent", alice, "PHONE")
    assert await store.spend_token(spent, NOW) == TokenSpend("reused", alice, "PHONE")
    await store.revoke_tokens(alice, NOW, device_id="PHONE")
    assert await store.spend_token(revoked, NOW) == TokenSpend("revoked", alice, "PHONE")
    assert await store.spend_token(dead, NOW) == TokenSpend("expired", alice, "LAPTOP")
    assert await store.spend_token(dead, NOW) == TokenSpend("expired", alice, "LAPTOP")
    assert await store.spend_token(no_history, NOW) == TokenSpend("spent", alice, "TABLET")
    assert await store.spend_token(no_history, NOW) == TokenSpend("unknown")
    assert await store.spend_token(_hash(), NOW) == TokenSpend("unknown")


@pytest_twisted.ensureDeferred
async def test_the_lineage_records_the_device_a_token_signed_in(store: TokenStore) -> None:
    alice = "@alice:test"
    used, unused = _hash(), _hash()
    await store.add_token(used, alice, NOW + 100, device_id="PHONE", issued_at_ms=NOW - 3)
    await store.add_token(unused, alice, NOW + 200, device_id="PHONE", issued_at_ms=NOW - 2)
    assert (await store.spend_token(used, NOW + 5)).outcome == "spent"
    await store.record_new_device(used, "NEWPHONE")
    await store.record_new_device(_hash(), "NOBODY")  # unknown: nothing to record, no error
    assert await store.lineage(alice) == [
        LineageEntry(used, alice, "PHONE", NOW - 3, NOW + 100, "spent", NOW + 5, "NEWPHONE"),
        LineageEntry(unused, alice, "PHONE", NOW - 2, NOW + 200, None, None, None),
    ]
    assert await store.lineage("@bob:test") == []


@pytest_twisted.ensureDeferred
async def test_operators_list_every_live_token_in_expiry_order_with_what_is_known(store: TokenStore) -> None:
    """What `tokens list` shows: live tokens only, soonest to expire first, ties by hash."""
    tied = sorted([_hash(), _hash()])
    await store.add_token(tied[1], "@alice:test", NOW + 300, device_id="PHONE", issued_at_ms=NOW - 5)
    await store.add_token(_hash(), "@alice:test", NOW, device_id="PHONE", issued_at_ms=NOW - 9)  # dead at NOW
    await store.add_token(tied[0], "@bob:test", NOW + 300, device_id="TABLET", issued_at_ms=NOW - 7)
    legacy = _hash()  # from before lineage: no device, no issue time
    await store.add_token(legacy, "@alice:test", NOW + 100)

    listed = await store.list_tokens(NOW)
    assert listed == [
        TokenInfo(legacy, "@alice:test", None, None, NOW + 100),
        TokenInfo(tied[0], "@bob:test", "TABLET", NOW - 7, NOW + 300),
        TokenInfo(tied[1], "@alice:test", "PHONE", NOW - 5, NOW + 300),
    ]
    assert await store.list_tokens(NOW, "@alice:test") == [listed[0], listed[2]]
    assert await store.list_tokens(NOW, "@carol:test") == []
    assert await store.list_tokens(NOW + 100) == listed[1:]


@pytest_twisted.ensureDeferred
async def test_revoking_by_fingerprint_takes_only_live_matches_and_records_it(store: TokenStore) -> None:
    """`tokens revoke FINGERPRINT`: the named live token goes, its history says revoked, at that time."""
    target, other, dead = _hash(), _hash(), _hash()
    await store.add_token(dead, "@alice:test", NOW, device_id="PHONE", issued_at_ms=NOW - 10)
    await store.add_token(target, "@alice:test", NOW + 500, device_id="PHONE", issued_at_ms=NOW - 1)
    await store.add_token(other, "@alice:test", NOW + 500, device_id="PHONE", issued_at_ms=NOW - 1)

    assert await store.revoke_fingerprint(fingerprint_of_hash(dead), NOW) == []
    revoked = await store.revoke_fingerprint(fingerprint_of_hash(target).upper(), NOW)
    assert revoked == [TokenInfo(target, "@alice:test", "PHONE", NOW - 1, NOW + 500)]
    assert await store.revoke_fingerprint(fingerprint_of_hash(target), NOW) == []
    assert await store.revoke_fingerprint(target.hex(), NOW) == []  # all 64 digits name it too
    assert [info.token_hash for info in await store.list_tokens(NOW)] == [other]
    assert (await store.spend_token(target, NOW)).user_id_if_spent() is None
    assert (await store.spend_token(target, NOW)).outcome == "revoked"

    history = {entry.token_hash: entry for entry in await store.lineage("@alice:test")}
    assert (history[target].outcome, history[target].finished_at_ms) == ("revoked", NOW)
    assert (history[other].outcome, history[other].finished_at_ms) == (None, None)
    assert (history[dead].outcome, history[dead].finished_at_ms) == (None, None)
    # A longer fingerprint narrows the match; the token it names still goes.
    assert [i.token_hash for i in await store.revoke_fingerprint(other[:8].hex(), NOW)] == [other]


@pytest_twisted.ensureDeferred
async def test_revoking_a_device_skips_its_expired_tokens_and_goes_on(store: TokenStore) -> None:
    """An expired token (dead at exactly now) among a device's tokens is left for the sweep."""
    # Several of each, so that whatever order a store visits them in, some dead one
    # comes before some live one.
    dead, live = [_hash() for _ in range(6)], [_hash() for _ in range(6)]
    for token_hash in dead:
        await store.add_token(token_hash, "@alice:test", NOW, device_id="PHONE", issued_at_ms=NOW - 10)
    for token_hash in live:
        await store.add_token(token_hash, "@alice:test", NOW + 1, device_id="PHONE", issued_at_ms=NOW - 10)
    revoked = await store.revoke_tokens("@alice:test", NOW, device_id="PHONE")
    assert sorted(info.token_hash for info in revoked) == sorted(live)
    history = {entry.token_hash: entry.outcome for entry in await store.lineage("@alice:test")}
    assert history == {**dict.fromkeys(dead), **dict.fromkeys(live, "revoked")}
    assert await store.count_tokens() == len(dead)  # left for the sweep


@pytest_twisted.ensureDeferred
async def test_memory_sweep_hands_the_reactor_back_between_slices(tmp_path: Path) -> None:
    backend = make_state(StoreConfig(type="memory"), REACTOR, str(tmp_path))
    store = backend.tokens
    for _ in range(3 * SWEEP_SLICE):
        await store.add_token(_hash(), "@old:test", NOW - 1)
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1

    # A call scheduled before the sweep runs while the sweep is still going.
    REACTOR.callLater(0, tick)
    sweep = defer.ensureDeferred(store.delete_expired(NOW))
    assert not sweep.called, "a sweep of three slices finished without yielding"
    assert await sweep == 3 * SWEEP_SLICE
    assert ticks == 1


@pytest_twisted.ensureDeferred
async def test_memory_history_sweep_hands_the_reactor_back_between_slices(tmp_path: Path) -> None:
    store = make_state(StoreConfig(type="memory"), REACTOR, str(tmp_path)).tokens
    for _ in range(3 * SWEEP_SLICE):
        token_hash = _hash()
        await store.add_token(token_hash, "@old:test", NOW - 1, device_id="D", issued_at_ms=NOW - 10)
        await store.spend_token(token_hash, NOW - 5)
    await store.delete_expired(NOW)
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1

    REACTOR.callLater(0, tick)
    sweep = defer.ensureDeferred(store.delete_history(NOW - 10))
    assert not sweep.called, "a history sweep of three slices finished without yielding"
    assert await sweep == 3 * SWEEP_SLICE
    assert ticks == 1
    assert await store.lineage("@old:test") == []


@pytest_twisted.ensureDeferred
async def test_sqlite_tokens_survive_reopening_and_are_stored_as_hashes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    token = tokens.generate_token()
    first = SqliteTokenStore(REACTOR, str(path))
    await first.add_token(tokens.hash_token(token), "@alice:test", NOW + 1000)
    await first.close()

    raw = b"".join(part.read_bytes() for part in tmp_path.glob("tokens.db*"))
    assert token.encode() not in raw
    with sqlite3.connect(path) as conn:
        stored = conn.execute("SELECT token_hash FROM login_tokens").fetchall()
    assert stored == [(tokens.hash_token(token),)]

    second = SqliteTokenStore(REACTOR, str(path))
    assert (await second.spend_token(tokens.hash_token(token), NOW)).user_id_if_spent() == "@alice:test"
    await second.close()


def test_sqlite_consume_is_atomic_across_connections(tmp_path: Path) -> None:
    """Many connections (as many processes would) race to spend each token: one wins."""
    path = str(tmp_path / "tokens.db")
    store = SqliteTokenStore(REACTOR, path)  # creates the schema on first use
    setup = store.sqlite.connect()
    hashes = [_hash() for _ in range(20)]
    for token_hash in hashes:
        setup.execute(
            "INSERT INTO login_tokens (token_hash, user_id, expires_at_ms) VALUES (?, ?, ?)",
            (token_hash, "@alice:test", NOW + 60_000),
        )
    setup.close()

    winners: list[bytes] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def racer() -> None:
        conn = store.sqlite.connect()
        barrier.wait()
        for token_hash in hashes:
            if _spend(conn, token_hash, NOW).outcome == "spent":
                with lock:
                    winners.append(token_hash)
        conn.close()

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(winners) == sorted(hashes)


@pytest_twisted.ensureDeferred
async def test_closing_a_sqlite_store_closes_its_file(tmp_path: Path) -> None:
    store = SqliteTokenStore(REACTOR, str(tmp_path / "tokens.db"))
    await store.add_token(_hash(), "@alice:test", NOW + 1000)
    assert (tmp_path / "tokens.db-wal").exists()
    await store.close()
    # The last connection closed: SQLite folded the write-ahead log back in.
    assert not (tmp_path / "tokens.db-wal").exists()


@pytest_twisted.ensureDeferred
async def test_stopping_the_server_closes_the_token_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The module's shutdown callback closes the store: SQLite folds its WAL back in and removes it."""
    srv = await start_in_process(tmp_path)
    await srv.register("alice")
    access = await srv.client.access_token("alice")
    assert (await srv.client.get_login_token(access)).code == 200
    assert (tmp_path / "tokens.db-wal").exists()
    await srv.stop()
    assert not (tmp_path / "tokens.db-wal").exists()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
    with sqlite3.connect(tmp_path / "tokens.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM login_tokens").fetchone() == (1,)


def test_postgres_consume_is_atomic_across_connections(pg_database: Database, tmp_path: Path) -> None:
    """Many connections (as many workers on many machines would) race to spend each token: one wins."""
    from login_token_module.stores.engines import postgres
    from login_token_module.stores.engines.schema import prepare
    from login_token_module.stores.sql import STATE_SCHEMA

    setup = postgres.connect(pg_database.dsn, {})
    prepare(setup, STATE_SCHEMA)
    hashes = [_hash() for _ in range(20)]
    for token_hash in hashes:
        setup.execute(
            "INSERT INTO login_tokens (token_hash, user_id, expires_at_ms) VALUES (?, ?, ?)",
            (token_hash, "@alice:test", NOW + 60_000),
        )
    setup.close()

    winners: list[bytes] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def racer() -> None:
        conn = postgres.connect(pg_database.dsn, {})
        barrier.wait()
        for token_hash in hashes:
            if _spend(conn, token_hash, NOW).outcome == "spent":
                with lock:
                    winners.append(token_hash)
        conn.close()

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(winners) == sorted(hashes)


@pytest_twisted.ensureDeferred
async def test_postgres_sweeps_from_two_workers_share_the_work(pg_database: Database, tmp_path: Path) -> None:
    """Two workers sweep at once: every expired token goes exactly once, live ones stay."""
    config = StoreConfig(type="postgres", dsn=pg_database.dsn)
    first = make_state(config, REACTOR, str(tmp_path))
    second = make_state(config, REACTOR, str(tmp_path))
    try:
        dead = 3 * SWEEP_BATCH + 11
        conn = pg_database.cluster.connect(pg_database.name)
        with conn.cursor() as cursor:
            cursor.execute(
                "INSERT INTO login_tokens SELECT sha256(i::text::bytea), '@old:test', %s"
                " FROM generate_series(1, %s) AS i",
                (NOW - 1, dead),
            )
        conn.close()
        live = _hash()
        await first.tokens.add_token(live, "@new:test", NOW + 60_000)

        removed = await defer.gatherResults(
            [
                defer.ensureDeferred(first.tokens.delete_expired(NOW)),
                defer.ensureDeferred(second.tokens.delete_expired(NOW)),
            ]
        )
        assert sum(removed) == dead, removed
        assert await second.tokens.count_tokens() == 1
        assert (await second.tokens.spend_token(live, NOW)).user_id_if_spent() == "@new:test"
    finally:
        await first.close()
        await second.close()


@pytest_twisted.ensureDeferred
async def test_postgres_stores_hashes_only(pg_database: Database, tmp_path: Path) -> None:
    backend = make_state(StoreConfig(type="postgres", dsn=pg_database.dsn), REACTOR, str(tmp_path))
    token = tokens.generate_token()
    try:
        await backend.tokens.add_token(tokens.hash_token(token), "@alice:test", NOW + 1000)
    finally:
        await backend.close()
    rows = pg_database.cluster.query(pg_database.name, "SELECT token_hash, user_id FROM login_tokens")
    assert [(bytes(row[0]), row[1]) for row in rows] == [(tokens.hash_token(token), "@alice:test")]


@pytest_twisted.ensureDeferred
async def test_a_token_file_from_before_versioning_is_migrated_in_place(tmp_path: Path) -> None:
    """A login_tokens.db as the first SQLite store left it (no schema_versions) keeps its
    tokens, gains the later tables, and records the newest version."""
    path = tmp_path / "login_tokens.db"
    token_hash = _hash()
    with sqlite3.connect(path) as old:
        old.executescript(
            "CREATE TABLE login_tokens (token_hash BLOB PRIMARY KEY, user_id TEXT NOT NULL,"
            " expires_at_ms INTEGER NOT NULL) WITHOUT ROWID;"
            "CREATE INDEX login_tokens_expiry ON login_tokens (expires_at_ms);"
        )
        old.execute(
            "INSERT INTO login_tokens (token_hash, user_id, expires_at_ms) VALUES (?, ?, ?)",
            (token_hash, "@alice:test", NOW + 1000),
        )
    old.close()

    config = StoreConfig(type="sqlite", path=str(path), shared_state=True)
    backend = make_state(config, REACTOR, str(tmp_path))
    try:
        assert (await backend.tokens.spend_token(token_hash, NOW)).user_id_if_spent() == "@alice:test"
        session = await backend.uia_sessions(60).create("@alice:test", "/get_token", NOW / 1000)
        assert await backend.uia_sessions(60).get(session.session_id, NOW / 1000) is not None
    finally:
        await backend.close()
    with sqlite3.connect(path) as conn:
        versions = conn.execute("SELECT component, version FROM schema_versions").fetchall()
    conn.close()
    assert versions == [("login_token_module", 4)]
