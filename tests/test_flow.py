"""The whole flow over HTTP: password login, get_token with UIA, token login."""

from __future__ import annotations

import pytest_twisted

from tests.helpers import GET_TOKEN, InProcessServer


@pytest_twisted.ensureDeferred
async def test_new_device_signs_in_with_a_login_token(server: InProcessServer) -> None:
    client = server.client
    first = await client.password_login("alice")
    assert first.code == 200
    issued = await client.get_login_token(first.json["access_token"])
    assert issued.code == 200, issued
    assert issued.json["expires_in_ms"] == 120000
    token = issued.json["login_token"]

    second = await client.token_login(token)
    assert second.code == 200, second
    assert second.json["user_id"] == "@alice:test.local"
    assert second.json["device_id"] != first.json["device_id"]
    whoami = await client.get("/_matrix/client/v3/account/whoami", second.json["access_token"])
    assert whoami.json["user_id"] == "@alice:test.local"

    again = await client.token_login(token)
    assert again.code == 403
    assert again.json["errcode"] == "M_FORBIDDEN"


@pytest_twisted.ensureDeferred
async def test_get_token_requires_an_access_token(server: InProcessServer) -> None:
    missing = await server.client.post(GET_TOKEN, {})
    assert (missing.code, missing.json["errcode"]) == (401, "M_MISSING_TOKEN")
    unknown = await server.client.post(GET_TOKEN, {}, access_token="mat_nope")
    assert (unknown.code, unknown.json["errcode"]) == (401, "M_UNKNOWN_TOKEN")
