"""Sweeping expired tokens (and their history, UIA sessions, rate limits and pairings)
at the unit, for every store: all of them, and only them.

Expiry times are given explicitly, so nothing depends on the clock. The stores
sweep in slices (memory) or batches (SQLite); these tests hold more expired
tokens than several slices or batches, so a sweep that stops early shows.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from login_token_module import tokens
from login_token_module.config import StoreConfig
from login_token_module.stores import Pairing, PairingStore, StateBackend, TokenStore, make_state
from login_token_module.stores.memory import SWEEP_SLICE, MemoryBackend, MemoryTokenStore
from login_token_module.stores.sqlite_store import SWEEP_BATCH, SqliteTokenStore
from tests.helpers import REACTOR
from tests.pgcluster import Database

NOW = 1_700_000_000_000
# More than two SQLite batches (and many memory slices).
MANY = 2 * max(SWEEP_BATCH, SWEEP_SLICE) + 7


def _hash(i: int) -> bytes:
    return tokens.hash_token(f"token {i}")


@pytest_twisted.async_yield_fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TokenStore]:
    if request.param == "postgres":
        database: Database = request.getfixturevalue("pg_database")
        backend = make_state(StoreConfig(type="postgres", dsn=database.dsn), REACTOR, str(tmp_path))
        yield backend.tokens
        await backend.close()
        return
    made: TokenStore = (
        MemoryTokenStore(REACTOR)
        if request.param == "memory"
        else SqliteTokenStore(REACTOR, str(tmp_path / "tokens.db"))
    )
    yield made
    await made.close()


async def add_many(store: TokenStore, first: int, count: int, expires_at_ms: int) -> list[bytes]:
    hashes = [_hash(i) for i in range(first, first + count)]
    # Queued all at once: the SQLite worker runs them in batches, so this stays quick.
    await defer.gatherResults(
        [defer.ensureDeferred(store.add_token(h, "@old:test", expires_at_ms)) for h in hashes]
    )
    return hashes


@pytest_twisted.ensureDeferred
async def test_a_sweep_removes_every_expired_token_however_many(store: TokenStore) -> None:
    await add_many(store, 0, MANY, NOW - 1)
    live = await add_many(store, MANY, 3, NOW + 60_000)
    assert await store.count_tokens() == MANY + 3

    assert await store.delete_expired(NOW) == MANY
    assert await store.count_tokens() == 3
    for token_hash in live:
        assert (await store.spend_token(token_hash, NOW)).user_id_if_spent() == "@old:test"


@pytest_twisted.ensureDeferred
async def test_a_sweep_of_one_batch_and_a_bit(store: TokenStore) -> None:
    """One full SQLite batch is not the end: the tokens after it go too."""
    await add_many(store, 0, SWEEP_BATCH + 1, NOW - 1)
    assert await store.delete_expired(NOW) == SWEEP_BATCH + 1
    assert await store.count_tokens() == 0
    assert await store.delete_expired(NOW) == 0


@pytest_twisted.ensureDeferred
async def test_a_token_expiring_exactly_now_is_swept(store: TokenStore) -> None:
    expiring = await add_many(store, 0, 2, NOW)
    later = await add_many(store, 2, 1, NOW + 1)
    assert await store.delete_expired(NOW) == 2
    assert await store.count_tokens() == 1
    assert [(await store.spend_token(h, NOW)).user_id_if_spent() for h in expiring] == [None, None]
    assert (await store.spend_token(later[0], NOW)).user_id_if_spent() == "@old:test"


@pytest_twisted.ensureDeferred
async def test_an_empty_store_sweeps_to_nothing(store: TokenStore) -> None:
    assert await store.delete_expired(NOW) == 0
    live = await add_many(store, 0, 2, NOW + 1)
    assert await store.delete_expired(NOW) == 0
    assert await store.count_tokens() == 2
    assert (await store.spend_token(live[1], NOW)).user_id_if_spent() == "@old:test"


@pytest_twisted.ensureDeferred
async def test_spent_tokens_do_not_stop_the_memory_sweep() -> None:
    """The memory store's issue-order queue still holds spent tokens; the sweep steps over them."""
    store = MemoryTokenStore(REACTOR)
    hashes = await add_many(store, 0, SWEEP_SLICE + 5, NOW - 1)
    for token_hash in hashes[: SWEEP_SLICE + 2]:
        assert (await store.spend_token(token_hash, NOW - 2)).user_id_if_spent() == "@old:test"
    live = await add_many(store, SWEEP_SLICE + 5, 1, NOW + 1)
    assert await store.delete_expired(NOW) == 3
    assert await store.count_tokens() == 1
    assert (await store.spend_token(live[0], NOW)).user_id_if_spent() == "@old:test"
    await store.close()


async def add_issued(
    store: TokenStore, first: int, count: int, issued_at_ms: int, user_id: str
) -> set[bytes]:
    """``count`` tokens issued at ``issued_at_ms`` (so with history), live for a minute after."""
    hashes = [_hash(i) for i in range(first, first + count)]
    await defer.gatherResults(
        [
            defer.ensureDeferred(
                store.add_token(h, user_id, issued_at_ms + 60_000, device_id="OLD", issued_at_ms=issued_at_ms)
            )
            for h in hashes
        ]
    )
    return set(hashes)


async def history_of(store: TokenStore, user_id: str) -> set[bytes]:
    return {entry.token_hash for entry in await store.lineage(user_id)}


@pytest_twisted.ensureDeferred
async def test_a_history_sweep_forgets_every_old_record_past_one_batch(store: TokenStore) -> None:
    """More old records than one SQL batch (and than several memory slices): all of them go."""
    await add_issued(store, 0, SWEEP_BATCH + 1, NOW - 10, "@old:test")
    young = await add_issued(store, SWEEP_BATCH + 1, 2, NOW + 1, "@young:test")
    assert len(await history_of(store, "@old:test")) == SWEEP_BATCH + 1

    assert await store.delete_history(NOW) == SWEEP_BATCH + 1
    assert await history_of(store, "@old:test") == set()
    assert await history_of(store, "@young:test") == young
    assert await store.delete_history(NOW) == 0
    # Only the history goes: the tokens themselves are the token sweep's business.
    assert await store.count_tokens() == SWEEP_BATCH + 3


@pytest_twisted.ensureDeferred
async def test_a_history_sweep_takes_records_issued_at_the_cut_keeps_later_ones(
    store: TokenStore,
) -> None:
    at_cut = await add_issued(store, 0, 2, NOW, "@alice:test")
    later = await add_issued(store, 2, 1, NOW + 1, "@alice:test")
    assert await history_of(store, "@alice:test") == at_cut | later

    assert await store.delete_history(NOW - 1) == 0
    assert await history_of(store, "@alice:test") == at_cut | later
    assert await store.delete_history(NOW) == 2
    assert await history_of(store, "@alice:test") == later
    (entry,) = await store.lineage("@alice:test")
    assert (entry.user_id, entry.minted_by_device, entry.issued_at_ms) == ("@alice:test", "OLD", NOW + 1)


@pytest_twisted.ensureDeferred
async def test_a_history_sweep_of_an_empty_store_is_nothing(store: TokenStore) -> None:
    assert await store.delete_history(NOW) == 0
    await store.add_token(_hash(0), "@alice:test", NOW + 60_000)  # no issue time: no history
    assert await store.delete_history(NOW + 1) == 0
    assert await store.lineage("@alice:test") == []
    assert (await store.spend_token(_hash(0), NOW)).user_id_if_spent() == "@alice:test"


SECONDS = NOW / 1000


@pytest_twisted.ensureDeferred
async def test_a_sweep_removes_every_expired_uia_session_past_one_batch(backend: StateBackend) -> None:
    sessions = backend.uia_sessions(60.0)
    # One session per user, so the per-user cap pushes none out.
    await defer.gatherResults(
        [
            defer.ensureDeferred(sessions.create(f"@user{i}:test", "/get_token", SECONDS))
            for i in range(SWEEP_BATCH + 1)
        ]
    )
    late = await sessions.create("@late:test", "/get_token", SECONDS + 60)
    assert await sessions.sweep(SECONDS + 60) == SWEEP_BATCH + 1
    assert await sessions.count() == 1
    assert await sessions.get(late.session_id, SECONDS + 60) is not None


@pytest_twisted.ensureDeferred
async def test_a_sweep_removes_every_drained_rate_limit_past_one_batch(backend: StateBackend) -> None:
    limiter = backend.rate_limiter("sweep-test", per_second=1.0, burst_count=1)
    await defer.gatherResults(
        [defer.ensureDeferred(limiter.record(f"user{i}", SECONDS)) for i in range(SWEEP_BATCH + 1)]
    )
    await limiter.record("late", SECONDS + 5)
    assert await limiter.sweep(SECONDS + 5) == SWEEP_BATCH + 1
    assert await limiter.count() == 1
    assert await limiter.acquire("late", SECONDS + 5) == 1000


def _pairing(i: int, created_at_ms: int) -> Pairing:
    """Pairing number ``i``: its own code and client address, live for a minute from ``created_at_ms``."""
    return Pairing(
        pairing_hash=hashlib.sha256(b"pairing %d" % i).digest(),
        user_code=f"C{i:07d}",
        seal_key=b"k" * 32,
        display_name=None,
        client_address=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
        created_at_ms=created_at_ms,
        expires_at_ms=created_at_ms + 60_000,
    )


async def start_pairings(pairings: PairingStore, first: int, count: int, created_at_ms: int) -> list[Pairing]:
    made = [_pairing(i, created_at_ms) for i in range(first, first + count)]
    outcomes = await defer.gatherResults(
        [defer.ensureDeferred(pairings.start(pairing, created_at_ms, 1)) for pairing in made]
    )
    assert set(outcomes) == {"started"}
    return made


@pytest_twisted.ensureDeferred
async def test_a_sweep_removes_every_expired_pairing_past_one_slice(backend: StateBackend) -> None:
    await start_pairings(backend.pairings, 0, SWEEP_SLICE + 3, NOW - 60_000)
    live = await start_pairings(backend.pairings, SWEEP_SLICE + 3, 2, NOW)
    assert await backend.pairings.sweep(NOW) == SWEEP_SLICE + 3
    assert await backend.pairings.count() == 2
    for pairing in live:
        assert await backend.pairings.find(pairing.user_code, NOW) == pairing
    assert await backend.pairings.sweep(NOW) == 0


@pytest_twisted.ensureDeferred
async def test_a_code_given_again_mid_sweep_stays_with_its_new_pairing(backend: StateBackend) -> None:
    """A sweep takes turns with other requests; one of them may start a pairing with the
    code of an expired one the sweep has yet to reach. The sweep neither fails on it nor
    takes the new pairing's code away."""
    old = await start_pairings(backend.pairings, 0, SWEEP_SLICE + 1, NOW - 60_000)
    successor = replace(_pairing(SWEEP_SLICE + 1, NOW), user_code=old[-1].user_code)
    sweep = defer.ensureDeferred(backend.pairings.sweep(NOW))
    # The memory store's sweep is at its first turn now, the last expired pairing not yet dropped.
    assert await backend.pairings.start(successor, NOW, 1) == "started"
    await sweep
    assert await backend.pairings.find(successor.user_code, NOW) == successor
    assert await backend.pairings.count() == 1


@pytest_twisted.ensureDeferred
async def test_memory_pairing_sweep_hands_the_reactor_back_between_slices() -> None:
    """Between slices the sweep waits one reactor turn, no more: another request's call
    made before the sweep runs in between, and the sweep ends within a few turns."""
    pairings = MemoryBackend(REACTOR).pairings
    await start_pairings(pairings, 0, 3 * SWEEP_SLICE, NOW - 60_000)
    turns = 0

    def turn() -> None:
        """Runs once each reactor turn while the sweep goes on (up to 100 turns), counting them."""
        nonlocal turns
        turns += 1
        if turns < 100 and not sweep.called:
            REACTOR.callLater(0, turn)

    REACTOR.callLater(0, turn)
    sweep = defer.ensureDeferred(pairings.sweep(NOW))
    assert not sweep.called, "a sweep of three slices finished without yielding"
    turns_taken: list[int] = []

    def ended(removed: int) -> int:
        turns_taken.append(turns)
        return removed

    sweep.addCallback(ended)
    assert await sweep == 3 * SWEEP_SLICE
    # One turn per slice (the reactor may run the counter just before or after the sweep).
    assert 2 <= turns_taken[0] <= 4, turns_taken
    assert await pairings.count() == 0


@pytest_twisted.ensureDeferred
async def test_memory_pairing_sweep_of_less_than_a_slice_ends_at_once() -> None:
    """A slice is SWEEP_SLICE pairings: a sweep of fewer never gives the reactor up."""
    pairings = MemoryBackend(REACTOR).pairings
    await start_pairings(pairings, 0, SWEEP_SLICE - 1, NOW - 60_000)
    live = await start_pairings(pairings, SWEEP_SLICE - 1, 1, NOW)
    sweep = defer.ensureDeferred(pairings.sweep(NOW))
    assert sweep.called, "a sweep of less than one slice gave the reactor up"
    assert await sweep == SWEEP_SLICE - 1
    assert await pairings.find(live[0].user_code, NOW) == live[0]
