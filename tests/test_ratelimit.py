"""The per-user rate limit on issuing login tokens, over real HTTP."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import pytest_twisted

from login_token_module.stores.sqlite_store import SCHEMA as STORE_SCHEMA
from tests.helpers import (
    GET_TOKEN,
    InProcessServer,
    Response,
    challenge,
    password_auth,
    recreate_token_table,
    running,
    sleep,
)
from tests.test_host_minting import store_timings


def assert_limited(response: Response) -> int:
    """A 429 M_LIMIT_EXCEEDED with no token; returns retry_after_ms."""
    assert response.code == 429, response
    assert response.json["errcode"] == "M_LIMIT_EXCEEDED"
    assert "login_token" not in response.json
    retry_after_ms = response.json["retry_after_ms"]
    assert isinstance(retry_after_ms, int) and not isinstance(retry_after_ms, bool)
    return retry_after_ms


@pytest_twisted.ensureDeferred
async def test_second_token_within_a_minute_is_refused(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    first = await server.client.get_login_token(access)
    assert first.code == 200, first
    assert await server.module.store.count_tokens() == 1

    second = await server.client.get_login_token(access)
    retry_after_ms = assert_limited(second)
    # One a minute, and the first was moments ago: most of a minute to wait. (The
    # lower bound leaves half a minute for a slow machine between the two requests.)
    assert 30_000 < retry_after_ms <= 60_000
    retry_after = second.headers.get("retry-after")
    assert retry_after is not None, second.headers
    assert retry_after.isdigit(), retry_after
    assert int(retry_after) >= 1
    # The header rounds up: waiting that many seconds is always enough, and no more.
    assert int(retry_after) * 1000 >= retry_after_ms
    assert int(retry_after) * 1000 < retry_after_ms + 1000
    assert await server.module.store.count_tokens() == 1


@pytest_twisted.ensureDeferred
async def test_refused_request_does_not_spend_the_session(tmp_path: Path) -> None:
    async with running(tmp_path, {"ratelimit": {"per_second": 2, "burst_count": 1}}) as srv:
        access = await srv.client.access_token("alice")
        assert (await srv.client.get_login_token(access)).code == 200

        session = await challenge(srv, access)
        limited = await srv.client.post(GET_TOKEN, password_auth(session), access)
        retry_after_ms = assert_limited(limited)
        assert 0 < retry_after_ms <= 500
        assert await srv.module.store.count_tokens() == 1

        await sleep(0.6)
        retry = await srv.client.post(GET_TOKEN, password_auth(session), access)
        assert retry.code == 200, retry
        assert isinstance(retry.json["login_token"], str)
        assert await srv.module.store.count_tokens() == 2


@pytest_twisted.ensureDeferred
async def test_challenges_are_not_rate_limited(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    assert (await server.client.get_login_token(access)).code == 200
    assert_limited(await server.client.get_login_token(access))
    sessions = {await challenge(server, access) for _ in range(5)}
    assert len(sessions) == 5


@pytest_twisted.ensureDeferred
async def test_limit_is_per_user(server: InProcessServer) -> None:
    await server.register("bob")
    alice = await server.client.access_token("alice")
    bob = await server.client.access_token("bob")
    assert (await server.client.get_login_token(alice)).code == 200
    assert_limited(await server.client.get_login_token(alice))

    for_bob = await server.client.get_login_token(bob)
    assert for_bob.code == 200, for_bob
    login = await server.client.token_login(for_bob.json["login_token"])
    assert (login.code, login.json["user_id"]) == (200, "@bob:test.local")
    assert_limited(await server.client.get_login_token(bob))


@pytest_twisted.ensureDeferred
async def test_limit_is_per_user_not_per_device(server: InProcessServer) -> None:
    phone = await server.client.access_token("alice")
    laptop = await server.client.access_token("alice")
    assert (await server.client.get_login_token(phone)).code == 200
    assert_limited(await server.client.get_login_token(laptop))


@pytest_twisted.ensureDeferred
async def test_burst_count_allows_that_many_tokens(tmp_path: Path) -> None:
    async with running(tmp_path, {"ratelimit": {"per_second": 0.01, "burst_count": 2}}) as srv:
        access = await srv.client.access_token("alice")
        for _ in range(2):
            response = await srv.client.get_login_token(access)
            assert response.code == 200, response
        assert_limited(await srv.client.get_login_token(access))
        assert await srv.module.store.count_tokens() == 2


@pytest_twisted.ensureDeferred
async def test_a_token_that_could_not_be_stored_spends_neither_session_nor_allowance(tmp_path: Path) -> None:
    """The store fails mid-request (its table is gone): 500, and the same session then works."""
    async with running(tmp_path, {}) as srv:
        access = await srv.client.access_token("alice")
        session = await challenge(srv, access)
        assert await srv.module.store.count_tokens() == 0  # the store's connection is open
        with sqlite3.connect(tmp_path / "tokens.db") as conn:
            conn.execute("DROP TABLE login_tokens")
        failed = await srv.client.post(GET_TOKEN, password_auth(session), access)
        assert failed.code == 500, failed

        with sqlite3.connect(tmp_path / "tokens.db") as conn:
            # The table as it now stands: version 1's, plus the columns version 3 added.
            for statement in STORE_SCHEMA.migrations[0].sqlite:
                conn.execute(statement)
            for statement in STORE_SCHEMA.migrations[2].sqlite:
                if statement.startswith("ALTER TABLE login_tokens"):
                    conn.execute(statement)
        retried = await srv.client.post(GET_TOKEN, password_auth(session), access)
        assert retried.code == 200, retried
        assert await srv.module.store.count_tokens() == 1
        login = await srv.client.token_login(retried.json["login_token"])
        assert login.code == 200, login


@pytest_twisted.ensureDeferred
async def test_a_failed_store_gives_back_one_action_not_more(tmp_path: Path) -> None:
    """With burst_count 3, one token, one failed attempt, then exactly two more tokens."""
    async with running(tmp_path, {"ratelimit": {"per_second": 0.001, "burst_count": 3}}) as srv:
        access = await srv.client.access_token("alice")
        assert (await srv.client.get_login_token(access)).code == 200
        with sqlite3.connect(tmp_path / "tokens.db") as conn:
            conn.execute("DROP TABLE login_tokens")
        restored = store_timings("uia_restore")
        failed = await srv.client.get_login_token(access)
        assert failed.code == 500, failed
        assert store_timings("uia_restore") == restored + 1  # the spent session given back, timed
        recreate_token_table(tmp_path / "tokens.db")

        for _ in range(2):
            issued = await srv.client.get_login_token(access)
            assert issued.code == 200, issued
        assert_limited(await srv.client.get_login_token(access))
        assert await srv.module.store.count_tokens() == 2


@pytest_twisted.ensureDeferred
async def test_a_failed_session_spend_gives_back_the_allowance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The UIA session store failing after the allowance was counted: the 500 costs nothing."""
    async with running(tmp_path, {"ratelimit": {"per_second": 0.001, "burst_count": 1}}) as srv:
        access = await srv.client.access_token("alice")
        sessions = srv.module._uia

        async def broken(session_id: str) -> None:
            raise RuntimeError("the session store is down")

        with monkeypatch.context() as patch:
            patch.setattr(sessions, "spend", broken)
            failed = await srv.client.get_login_token(access)
        assert failed.code == 500, failed
        assert (await srv.client.get_login_token(access)).code == 200
        assert_limited(await srv.client.get_login_token(access))
        assert await srv.module.store.count_tokens() == 1


@pytest_twisted.ensureDeferred
async def test_a_sweep_does_not_forget_a_limit_still_in_force(server: InProcessServer) -> None:
    """The sweep drops only drained counts: right after one, the user is still limited."""
    access = await server.client.access_token("alice")
    assert (await server.client.get_login_token(access)).code == 200
    await server.module.sweep()  # called directly: no waiting for the background tick
    assert_limited(await server.client.get_login_token(access))
    assert await server.module.store.count_tokens() == 1
