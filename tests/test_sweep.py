"""The background sweep forgets expired tokens, UIA sessions and drained rate limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.helpers import GET_TOKEN, running, sleep


@pytest.mark.parametrize("store_type", ["memory", "sqlite", "sqlite-shared", "postgres"])
@pytest_twisted.ensureDeferred
async def test_expired_tokens_and_sessions_are_swept(
    tmp_path: Path, store_type: str, request: pytest.FixtureRequest
) -> None:
    store: dict[str, Any] = {"type": "memory"}
    if store_type.startswith("sqlite"):
        store = {"type": "sqlite", "path": "t.db", "shared_state": store_type == "sqlite-shared"}
    elif store_type == "postgres":
        store = {"type": "postgres", "dsn": request.getfixturevalue("pg_database").dsn}
    config = {
        "store": store,
        "token_lifetime_ms": 150,
        "ui_auth_session_lifetime_ms": 1_000,
        "sweep_interval_ms": 50,
        "ratelimit": {"per_second": 20, "burst_count": 5},
    }
    async with running(tmp_path, config) as server:
        client = server.client
        access_token = await client.access_token("alice")
        for _ in range(3):
            issued = await client.get_login_token(access_token)
            assert issued.code == 200
        await client.post(GET_TOKEN, {}, access_token)  # an abandoned UIA session
        module = server.module
        assert await module.store.count_tokens() == 3
        assert await module._uia.count() == 1
        assert await module._ratelimiter.count() == 1

        await sleep(0.4)
        assert await module.store.count_tokens() == 0
        assert await module._ratelimiter.count() == 0  # 3 actions drain in 0.15 s at 20/s
        assert await module._uia.count() == 1  # not expired yet

        await sleep(1.0)
        assert await module._uia.count() == 0
