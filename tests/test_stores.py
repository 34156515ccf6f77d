"""The TokenStore contract, run against every store (SQLite on a real file)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from login_token_module import tokens
from login_token_module.stores import TokenStore
from login_token_module.stores.memory import SWEEP_SLICE, MemoryTokenStore
from login_token_module.stores.sqlite import SqliteTokenStore, _consume
from tests.helpers import REACTOR

NOW = 1_700_000_000_000


def _hash() -> bytes:
    return tokens.hash_token(tokens.generate_token())


@pytest_twisted.async_yield_fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TokenStore]:
    made: TokenStore = (
        MemoryTokenStore(REACTOR)
        if request.param == "memory"
        else SqliteTokenStore(REACTOR, str(tmp_path / "tokens.db"))
    )
    yield made
    await made.close()


@pytest_twisted.ensureDeferred
async def test_a_token_is_spent_once(store: TokenStore) -> None:
    token_hash = _hash()
    await store.add_token(token_hash, "@alice:test", NOW + 1000)
    assert await store.count_tokens() == 1
    assert await store.consume_token(token_hash, NOW) == "@alice:test"
    assert await store.consume_token(token_hash, NOW) is None
    assert await store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_unknown_and_expired_tokens_give_nothing(store: TokenStore) -> None:
    assert await store.consume_token(_hash(), NOW) is None
    token_hash = _hash()
    await store.add_token(token_hash, "@alice:test", NOW)
    # Expiry is exclusive: at expires_at_ms the token is already dead.
    assert await store.consume_token(token_hash, NOW) is None


@pytest_twisted.ensureDeferred
async def test_tokens_are_kept_apart(store: TokenStore) -> None:
    first, second = _hash(), _hash()
    await store.add_token(first, "@alice:test", NOW + 1000)
    await store.add_token(second, "@bob:test", NOW + 1000)
    assert await store.consume_token(second, NOW) == "@bob:test"
    assert await store.consume_token(first, NOW) == "@alice:test"


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
    assert await store.consume_token(spent, NOW - 10) == "@old:test"

    assert await store.delete_expired(NOW) == len(dead) - 1
    assert await store.count_tokens() == len(live)
    for token_hash in live:
        assert await store.consume_token(token_hash, NOW) == "@new:test"
    assert await store.delete_expired(NOW) == 0


@pytest_twisted.ensureDeferred
async def test_memory_sweep_hands_the_reactor_back_between_slices() -> None:
    store = MemoryTokenStore(REACTOR)
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
    assert await second.consume_token(tokens.hash_token(token), NOW) == "@alice:test"
    await second.close()


def test_sqlite_consume_is_atomic_across_connections(tmp_path: Path) -> None:
    """Many connections (as many processes would) race to spend each token: one wins."""
    path = str(tmp_path / "tokens.db")
    store = SqliteTokenStore(REACTOR, path)  # creates the schema on first use
    setup = store.sqlite.connect()
    hashes = [_hash() for _ in range(20)]
    for token_hash in hashes:
        setup.execute("INSERT INTO login_tokens VALUES (?, ?, ?)", (token_hash, "@alice:test", NOW + 60_000))
    setup.close()

    winners: list[bytes] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def racer() -> None:
        conn = store.sqlite.connect()
        barrier.wait()
        for token_hash in hashes:
            if _consume(conn, token_hash, NOW) is not None:
                with lock:
                    winners.append(token_hash)
        conn.close()

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(winners) == sorted(hashes)
