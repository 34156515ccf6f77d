"""Races over HTTP: one token presented by many clients at once logs in exactly once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

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
        assert sorted(r.code for r in results) == [200] + [401] * 19
        assert await server.module.store.count_tokens() == 1
