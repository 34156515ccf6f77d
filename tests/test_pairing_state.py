"""The PairingStore contract, run against every backend: memory, SQLite (a real
file) and PostgreSQL (a real server, a fresh database).

Time is passed in (``now_ms``), so expiry is exact. The shared backends are
also checked for what makes them shared: a pairing started through one backend
is approved and delivered through another opened on the same database (as
worker processes would), and racing polls from many threads deliver it once.
"""

from __future__ import annotations

import hashlib
import os

import pytest_twisted
from twisted.internet import defer

from login_token_module.stores import Pairing, PairingStore, StateBackend
from login_token_module.stores.engines.connection import Conn
from login_token_module.stores.memory import MemoryBackend
from login_token_module.stores.sql import SqlBackend
from tests.conftest import BackendFactory
from tests.helpers import REACTOR

T0 = 1_700_000_000_000
LIFETIME = 600_000


def new_pairing(
    code: str = "BCDFGHJK", address: str | None = "10.0.0.1", created: int = T0, lifetime: int = LIFETIME
) -> Pairing:
    return Pairing(
        pairing_hash=hashlib.sha256(os.urandom(32)).digest(),
        user_code=code,
        seal_key=os.urandom(32),
        display_name="Living-room TV",
        client_address=address,
        created_at_ms=created,
        expires_at_ms=created + lifetime,
    )


async def approve(
    backend: StateBackend, code: str, now: int = T0 + 1, token_hash: bytes = b"t" * 32
) -> Pairing | None:
    return await approve_in(backend.pairings, code, now, token_hash)


async def approve_in(
    pairings: PairingStore, code: str, now: int = T0 + 1, token_hash: bytes = b"t" * 32
) -> Pairing | None:
    return await pairings.approve(
        code,
        now,
        user_id="@alice:test",
        device_id="PHONE",
        approver_address="10.0.0.2",
        sealed_token=b"sealed",
        token_hash=token_hash,
        token_expires_at_ms=now + 120_000,
    )


@pytest_twisted.ensureDeferred
async def test_a_started_pairing_is_found_by_its_code_until_it_expires(backend: StateBackend) -> None:
    pairing = new_pairing()
    assert await backend.pairings.start(pairing, T0, 10) == "started"
    found = await backend.pairings.find("BCDFGHJK", T0 + LIFETIME - 1)
    assert found == pairing
    assert await backend.pairings.find("BCDFGHJK", T0 + LIFETIME) is None
    assert await backend.pairings.find("BCDFGHJL", T0) is None
    # Polling a pending pairing changes nothing.
    polled = await backend.pairings.poll(pairing.pairing_hash, T0 + 5)
    assert polled is not None and polled.status == "pending"
    assert await backend.pairings.find("BCDFGHJK", T0 + 5) == pairing


@pytest_twisted.ensureDeferred
async def test_a_live_code_is_not_given_twice_but_an_expired_one_is(backend: StateBackend) -> None:
    assert await backend.pairings.start(new_pairing(), T0, 10) == "started"
    assert await backend.pairings.start(new_pairing(address="10.0.0.9"), T0 + 1, 10) == "code_taken"
    later = new_pairing(created=T0 + LIFETIME)
    assert await backend.pairings.start(later, T0 + LIFETIME, 10) == "started"
    assert await backend.pairings.find("BCDFGHJK", T0 + LIFETIME) == later
    # The expired pairing gave its code up, and went: only the new one is held.
    assert await backend.pairings.count() == 1


@pytest_twisted.ensureDeferred
async def test_pending_pairings_per_address_are_capped(backend: StateBackend) -> None:
    codes = ["BBBBBBBB", "CCCCCCCC", "DDDDDDDD"]
    for code in codes:
        assert await backend.pairings.start(new_pairing(code), T0, 3) == "started"
    assert await backend.pairings.start(new_pairing("FFFFFFFF"), T0, 3) == "address_full"
    # Another address is not held back; nor is this one once a pending pairing is decided.
    assert await backend.pairings.start(new_pairing("GGGGGGGG", address="10.0.0.7"), T0, 3) == "started"
    assert await approve(backend, "BBBBBBBB") is not None
    assert await backend.pairings.start(new_pairing("FFFFFFFF"), T0 + 2, 3) == "started"
    # Or once they expire.
    assert await backend.pairings.start(new_pairing("HHHHHHHH", created=T0 + LIFETIME), T0 + LIFETIME, 3) == (
        "started"
    )


@pytest_twisted.ensureDeferred
async def test_delivering_one_pairing_leaves_the_others_of_its_address_counted(backend: StateBackend) -> None:
    """A delivered pairing frees its place under the cap, and only its own."""
    first, second, third = new_pairing("BBBBBBBB"), new_pairing("CCCCCCCC"), new_pairing("DDDDDDDD")
    for pairing in (first, second, third):
        assert await backend.pairings.start(pairing, T0, 3) == "started"
    assert await approve(backend, "BBBBBBBB") is not None
    assert await backend.pairings.poll(first.pairing_hash, T0 + 2) is not None  # delivered: gone
    assert await backend.pairings.start(new_pairing("FFFFFFFF"), T0 + 3, 3) == "started"
    # Three pending again (second, third and the new one): the address is full.
    assert await backend.pairings.start(new_pairing("GGGGGGGG"), T0 + 4, 3) == "address_full"


@pytest_twisted.ensureDeferred
async def test_an_approved_pairing_is_delivered_once(backend: StateBackend) -> None:
    pairing = new_pairing()
    await backend.pairings.start(pairing, T0, 10)
    approved = await approve(backend, "BCDFGHJK", T0 + 10)
    assert approved is not None
    assert (approved.status, approved.user_id, approved.device_id) == ("approved", "@alice:test", "PHONE")
    assert approved.approver_address == "10.0.0.2"
    # No longer pending: neither found by its code, nor approved or denied again.
    assert await backend.pairings.find("BCDFGHJK", T0 + 11) is None
    assert await approve(backend, "BCDFGHJK", T0 + 11) is None
    assert (
        await backend.pairings.deny(
            "BCDFGHJK", T0 + 11, user_id="@bob:test", device_id=None, approver_address=None
        )
        is None
    )
    delivered = await backend.pairings.poll(pairing.pairing_hash, T0 + 12)
    assert delivered is not None
    assert delivered.status == "approved"
    assert delivered.sealed_token == b"sealed"
    assert delivered.token_expires_at_ms == T0 + 10 + 120_000
    assert (delivered.display_name, delivered.client_address) == ("Living-room TV", "10.0.0.1")
    assert await backend.pairings.poll(pairing.pairing_hash, T0 + 13) is None
    assert await backend.pairings.count() == 0


@pytest_twisted.ensureDeferred
async def test_an_approved_pairing_expires_with_its_token(backend: StateBackend) -> None:
    pairing = new_pairing()
    await backend.pairings.start(pairing, T0, 10)
    approved = await approve(backend, "BCDFGHJK", T0 + 10)
    assert approved is not None and approved.expires_at_ms == T0 + 10 + 120_000
    assert await backend.pairings.poll(pairing.pairing_hash, T0 + 10 + 120_000) is None


@pytest_twisted.ensureDeferred
async def test_a_denied_pairing_says_so_once_with_who_denied_it(backend: StateBackend) -> None:
    """What the audit trail says of a denial: the denier, their device and address, as given."""
    pairing = new_pairing()
    await backend.pairings.start(pairing, T0, 10)
    denied = await backend.pairings.deny(
        "BCDFGHJK", T0 + 1, user_id="@alice:test", device_id="PHONE", approver_address="10.0.0.2"
    )
    assert denied is not None and denied.status == "denied" and denied.sealed_token is None
    assert (denied.user_id, denied.device_id, denied.approver_address) == ("@alice:test", "PHONE", "10.0.0.2")
    assert await approve(backend, "BCDFGHJK", T0 + 2) is None
    polled = await backend.pairings.poll(pairing.pairing_hash, T0 + 3)
    assert polled is not None
    assert (polled.status, polled.user_id, polled.device_id, polled.approver_address) == (
        "denied",
        "@alice:test",
        "PHONE",
        "10.0.0.2",
    )
    assert await backend.pairings.poll(pairing.pairing_hash, T0 + 4) is None


@pytest_twisted.ensureDeferred
async def test_unknown_and_expired_pairings_give_nothing(backend: StateBackend) -> None:
    pairing = new_pairing()
    await backend.pairings.start(pairing, T0, 10)
    assert await backend.pairings.poll(hashlib.sha256(b"guess").digest(), T0) is None
    assert await approve(backend, "BCDFGHJK", T0 + LIFETIME) is None
    assert await backend.pairings.poll(pairing.pairing_hash, T0 + LIFETIME) is None


@pytest_twisted.ensureDeferred
async def test_approval_marks_the_tokens_history_paired(backend: StateBackend) -> None:
    paired, plain = b"p" * 32, b"q" * 32
    for token_hash in (paired, plain):
        await backend.tokens.add_token(
            token_hash, "@alice:test", T0 + 120_000, device_id="PHONE", issued_at_ms=T0
        )
    await backend.pairings.start(new_pairing(), T0, 10)
    assert await approve(backend, "BCDFGHJK", T0 + 1, token_hash=paired) is not None
    lineage = {entry.token_hash: entry.paired for entry in await backend.tokens.lineage("@alice:test")}
    assert lineage == {paired: True, plain: False}


@pytest_twisted.ensureDeferred
async def test_the_sweep_forgets_expired_pairings_only(backend: StateBackend) -> None:
    await backend.pairings.start(new_pairing("BBBBBBBB"), T0, 10)
    await backend.pairings.start(new_pairing("CCCCCCCC", created=T0 + 1000), T0 + 1000, 10)
    assert await backend.pairings.sweep(T0 + LIFETIME - 1) == 0
    assert await backend.pairings.sweep(T0 + LIFETIME) == 1
    assert await backend.pairings.count() == 1
    assert await backend.pairings.find("CCCCCCCC", T0 + LIFETIME) is not None


@pytest_twisted.ensureDeferred
async def test_the_memory_store_keeps_nothing_of_a_pairing_once_it_is_gone() -> None:
    """Delivered, swept or pushed out by a new pairing with its code, a pairing leaves
    no trace in the memory store's indexes (by code, by address): else they grow with
    every pairing ever started, though each lookup still finds nothing."""
    store = MemoryBackend(REACTOR).pairings
    delivered = new_pairing("BBBBBBBB", address="10.0.0.1")
    swept = new_pairing("CCCCCCCC", address="10.0.0.2")
    for pairing in (delivered, swept, new_pairing("DDDDDDDD", address="10.0.0.3")):
        assert await store.start(pairing, T0, 10) == "started"
    assert await approve_in(store, "BBBBBBBB", T0 + 1) is not None
    assert await store.poll(delivered.pairing_hash, T0 + 2) is not None
    successor = new_pairing("DDDDDDDD", address="10.0.0.4", created=T0 + LIFETIME)
    assert await store.start(successor, T0 + LIFETIME, 10) == "started"
    assert await store.sweep(T0 + LIFETIME) == 1
    denied = await store.deny(
        "DDDDDDDD", T0 + LIFETIME, user_id="@alice:test", device_id=None, approver_address=None
    )
    assert denied is not None
    assert await store.poll(successor.pairing_hash, T0 + LIFETIME + 1) is not None
    assert await store.count() == 0
    assert (store._pairings, store._by_code, store._by_address) == ({}, {}, {})


@pytest_twisted.ensureDeferred
async def test_racing_polls_deliver_an_approval_once(backend: StateBackend) -> None:
    pairing = new_pairing()
    await backend.pairings.start(pairing, T0, 10)
    assert await approve(backend, "BCDFGHJK", T0 + 1) is not None
    results = await defer.gatherResults(
        [defer.ensureDeferred(backend.pairings.poll(pairing.pairing_hash, T0 + 2)) for _ in range(32)]
    )
    assert sum(result is not None for result in results) == 1


def _slow_pairing_inserts(conn: Conn) -> None:
    conn.execute(
        "CREATE FUNCTION slow_insert() RETURNS trigger AS $$"
        " BEGIN PERFORM pg_sleep(0.05); RETURN NEW; END $$ LANGUAGE plpgsql"
    )
    conn.execute(
        "CREATE TRIGGER slow_insert BEFORE INSERT ON login_token_pairings"
        " FOR EACH ROW EXECUTE FUNCTION slow_insert()"
    )


@pytest_twisted.ensureDeferred
async def test_racing_starts_from_one_address_never_pass_its_cap(backend: StateBackend) -> None:
    """One place left under the address's cap and many starts from it at once (on
    PostgreSQL, over several connections): exactly one takes it. On PostgreSQL the server
    is made slow to insert a pairing (a trigger of the test's own), so that racing starts
    overlap between counting the address's pairings and adding theirs."""
    if isinstance(backend, SqlBackend) and backend.db.engine == "postgres":
        await backend.db.run(_slow_pairing_inserts)
    for n in range(9):
        assert await backend.pairings.start(new_pairing(f"WAIT{n:04d}"), T0, 10) == "started"
    results = await defer.gatherResults(
        [defer.ensureDeferred(backend.pairings.start(new_pairing(f"RACE{n:04d}"), T0, 10)) for n in range(24)]
    )
    assert sorted(results) == ["address_full"] * 23 + ["started"]
    assert await backend.pairings.count() == 10


@pytest_twisted.ensureDeferred
async def test_racing_approvals_and_denials_decide_once(backend: StateBackend) -> None:
    await backend.pairings.start(new_pairing(), T0, 10)

    async def deny() -> Pairing | None:
        return await backend.pairings.deny(
            "BCDFGHJK", T0 + 1, user_id="@alice:test", device_id="OTHER", approver_address=None
        )

    results = await defer.gatherResults(
        [defer.ensureDeferred(approve(backend, "BCDFGHJK") if i % 2 else deny()) for i in range(16)]
    )
    assert sum(result is not None for result in results) == 1


@pytest_twisted.ensureDeferred
async def test_started_in_one_process_approved_in_another_delivered_in_a_third(
    open_shared_backend: BackendFactory,
) -> None:
    backends = [open_shared_backend() for _ in range(3)]
    try:
        first, second, third = backends
        pairing = new_pairing()
        assert await first.pairings.start(pairing, T0, 10) == "started"
        assert await second.pairings.find("BCDFGHJK", T0) == pairing
        assert await approve(second, "BCDFGHJK") is not None
        results = await defer.gatherResults(
            [
                defer.ensureDeferred((first if i % 2 else third).pairings.poll(pairing.pairing_hash, T0 + 2))
                for i in range(32)
            ]
        )
        assert sum(result is not None for result in results) == 1
    finally:
        for opened in backends:
            await opened.close()
