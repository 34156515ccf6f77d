"""Races over HTTP: one token presented by many clients at once logs in exactly once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from login_token_module.api import Requester
from login_token_module.errors import MatrixError
from tests.helpers import GET_TOKEN, challenge, password_auth, running

STORES: dict[str, dict[str, Any]] = {
    "memory": {"type": "memory"},
    "sqlite": {"type": "sqlite", "path": "tokens.db"},
}
GENEROUS = {"per_second": 1000, "burst_count": 1000}


@pytest.mark.parametrize("store", sorted(STORES))
@pytest_twisted.ensureDeferred
async def test_concurrent_logins_with_one_token_give_exactly_one_success(tmp_path: Path, store: str) -> None:
    async with running(tmp_path, {"store": STORES[store], "ratelimit": GENEROUS}) as server:
        client = server.client
        access_token = await client.access_token("alice")
        for _ in range(3):
            issued = await client.get_login_token(access_token)
            token = issued.json["login_token"]
            results = await defer.gatherResults(
                [defer.ensureDeferred(client.token_login(token)) for _ in range(30)]
            )
            codes = sorted(r.code for r in results)
            assert codes == [200] + [403] * 29
            assert all(r.json["errcode"] == "M_FORBIDDEN" for r in results if r.code == 403)
        assert await server.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_concurrent_get_token_with_one_session_issues_one_token(tmp_path: Path) -> None:
    """A completed UIA session raced by many requests yields a single token."""
    async with running(tmp_path, {"ratelimit": GENEROUS, "store": {"type": "memory"}}) as server:
        access_token = await server.client.access_token("alice")
        body = password_auth(await challenge(server, access_token))
        results = await defer.gatherResults(
            [defer.ensureDeferred(server.client.post(GET_TOKEN, body, access_token)) for _ in range(20)]
        )
        # One wins. The others are told to start again (401), or were refused before their
        # password was checked (429: the failed-password allowance is reserved before bcrypt).
        codes = sorted(r.code for r in results)
        assert codes.count(200) == 1 and set(codes) <= {200, 401, 429}, codes
        assert await server.module.store.count_tokens() == 1


@pytest_twisted.ensureDeferred
async def test_the_request_that_loses_a_race_for_one_session_gets_a_fresh_one(tmp_path: Path) -> None:
    """Two requests with one completed session, both past the password check: the second is told
    to start again, with a new session on the same path that completes. Started together on the
    module, so both are certainly waiting on the password check when the first one finishes."""
    async with running(tmp_path, {"ratelimit": GENEROUS, "store": {"type": "memory"}}) as server:
        access_token = await server.client.access_token("alice")
        body = password_auth(await challenge(server, access_token))
        requester = Requester(user_id="@alice:test.local", device_id=None)
        racers = [
            defer.ensureDeferred(server.module.issue_token(requester, body, GET_TOKEN)) for _ in range(2)
        ]
        outcomes: list[Any] = []
        for racer in racers:
            try:
                outcomes.append(await racer)
            except MatrixError as failed:
                outcomes.append(failed)
        # Either may win (the password checks run in a pool); exactly one does.
        errors = [outcome for outcome in outcomes if isinstance(outcome, MatrixError)]
        assert len(errors) == 1, outcomes
        error = errors[0]
        assert error.code == 401
        answer = error.to_json()
        assert answer["errcode"] == "M_FORBIDDEN"
        assert isinstance(answer["error"], str) and answer["error"]
        assert answer["session"] != body["auth"]["session"]
        retried = await server.client.post(GET_TOKEN, password_auth(answer["session"]), access_token)
        assert retried.code == 200, retried
        assert await server.module.store.count_tokens() == 2
