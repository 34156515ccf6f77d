"""The sweep forgets expired tokens, UIA sessions and drained rate limits, and nothing else.

The tests call ``module.sweep()`` themselves (the background loop is set far
apart so it never runs meanwhile), after waiting at least as long as things
take to expire, so what a sweep removes does not depend on when a tick lands.
One test checks that the background loop does run the sweep, by waiting for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from login_token_module.module import LoginTokenModule
from tests.helpers import GET_TOKEN, REACTOR, InProcessServer, password_auth, running, sleep

HOUR_MS = 3_600_000


BACKENDS = ["memory", "sqlite", "sqlite-shared", "postgres"]


def store_config(store_type: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if store_type.startswith("sqlite"):
        return {"type": "sqlite", "path": "t.db", "shared_state": store_type == "sqlite-shared"}
    if store_type == "postgres":
        return {"type": "postgres", "dsn": request.getfixturevalue("pg_database").dsn}
    return {"type": "memory"}


async def sizes(module: LoginTokenModule) -> tuple[int, int, int]:
    return await module._uia.count(), await module._ratelimiter.count(), await module._failed_auth.count()


async def leave_one_of_everything(server: InProcessServer, tokens: int) -> str:
    """Issue ``tokens`` tokens, abandon a UIA session and fail a password once; returns the last token."""
    client = server.client
    access = await client.access_token("alice")
    # The wrong password first: once the get_token allowance is used up, a request
    # is refused (429) before its password is looked at.
    wrong = await client.post(GET_TOKEN, password_auth(None, "wrong"), access)
    assert wrong.code == 401, wrong  # and the session this one opened
    token = ""
    for _ in range(tokens):
        # The password in the same request: no session has to outlive a short lifetime.
        issued = await client.post(GET_TOKEN, password_auth(None), access)
        assert issued.code == 200, issued
        token = issued.json["login_token"]
    await client.post(GET_TOKEN, {}, access)  # an abandoned UIA session
    assert await server.module.store.count_tokens() == tokens
    assert await sizes(server.module) == (2, 1, 1)
    return token


@pytest.mark.parametrize("store_type", BACKENDS)
@pytest_twisted.ensureDeferred
async def test_a_sweep_removes_what_has_expired(
    tmp_path: Path, store_type: str, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    config = {
        "store": store_config(store_type, request),
        "token_lifetime_ms": 100,
        "ui_auth_session_lifetime_ms": 1000,
        "ratelimit": {"per_second": 20, "burst_count": 5},  # 3 actions drain in 0.15 s
        "failed_auth_ratelimit": {"per_second": 20, "burst_count": 3},
        "sweep_interval_ms": HOUR_MS,
    }
    async with running(tmp_path, config) as server:
        token = await leave_one_of_everything(server, tokens=3)
        await sleep(1.1)  # at least this long: everything above has expired or drained
        caplog.set_level(logging.DEBUG, logger="login_token_module.module")
        await server.module.sweep()
        assert [r.getMessage() for r in caplog.records if r.name == "login_token_module.module"] == [
            "Swept 3 expired login tokens"
        ]
        assert await server.module.store.count_tokens() == 0
        assert await sizes(server.module) == (0, 0, 0)
        assert (await server.client.token_login(token)).code == 403


@pytest.mark.parametrize("store_type", BACKENDS)
@pytest_twisted.ensureDeferred
async def test_a_sweep_keeps_what_is_still_live(
    tmp_path: Path, store_type: str, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    """Default lifetimes (minutes): a sweep right away must leave everything in force."""
    config = {"store": store_config(store_type, request), "sweep_interval_ms": HOUR_MS}
    async with running(tmp_path, config) as server:
        token = await leave_one_of_everything(server, tokens=1)
        caplog.set_level(logging.DEBUG, logger="login_token_module.module")
        await server.module.sweep()
        assert not [r for r in caplog.records if r.msg.startswith("Swept")]
        assert await server.module.store.count_tokens() == 1
        assert await sizes(server.module) == (2, 1, 1)
        # Still in force: the limit refuses a second token, and the first one logs in.
        access = await server.client.access_token("alice")
        assert (await server.client.get_login_token(access)).code == 429
        login = await server.client.token_login(token)
        assert login.code == 200, login


@pytest_twisted.ensureDeferred
async def test_the_background_loop_runs_the_sweep(tmp_path: Path) -> None:
    config = {"token_lifetime_ms": 50, "sweep_interval_ms": 50}
    async with running(tmp_path, config) as server:
        access = await server.client.access_token("alice")
        assert (await server.client.get_login_token(access)).code == 200
        # Not a race against a tick: wait (up to a generous limit) until a tick has swept.
        deadline = REACTOR.seconds() + 30
        while await server.module.store.count_tokens() and REACTOR.seconds() < deadline:
            await sleep(0.05)
        assert await server.module.store.count_tokens() == 0


@pytest.mark.parametrize("store_type", BACKENDS)
@pytest_twisted.ensureDeferred
async def test_a_sweep_forgets_token_history_once_its_retention_has_passed(
    tmp_path: Path, store_type: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """history_retention_ms after a token was issued its history goes, and not a millisecond before.

    The module's clock is driven (a minute is the shortest retention), so no tick decides it.
    """
    config = {
        "store": store_config(store_type, request),
        "history_retention_ms": 60_000,
        "sweep_interval_ms": HOUR_MS,
    }
    async with running(tmp_path, config) as server:
        access = await server.client.access_token("alice")
        issued = await server.client.get_login_token(access)
        assert issued.code == 200, issued
        module = server.module
        (entry,) = await module.store.lineage("@alice:test.local")
        kept_until = entry.issued_at_ms + 60_000 - 1  # the half millisecond keeps float rounding out
        monkeypatch.setattr(module, "_now", lambda: (kept_until + 0.5) / 1000)
        await module.sweep()
        assert [e.token_hash for e in await module.store.lineage("@alice:test.local")] == [entry.token_hash]
        monkeypatch.setattr(module, "_now", lambda: (kept_until + 1.5) / 1000)
        await module.sweep()
        assert await module.store.lineage("@alice:test.local") == []
