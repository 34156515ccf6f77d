"""A real Matrix client library (mautrix-python) signs a second device in with a token.

mautrix's ``login()`` always sends an ``identifier`` beside the token: the user the
client was made for, or ``{"type": "m.id.user"}`` with no user at all when it knows
none yet (a new device that has only the token); both must sign in.
mautrix has no get_token binding, so the old device asks through mautrix's own
HTTP API (``client.api.request``), answering the UIA challenge it gets back.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mautrix.api import Method
from mautrix.api import Path as ApiPath
from mautrix.client import ClientAPI
from mautrix.errors import MatrixRequestError, MatrixUnknownRequestError
from mautrix.types import LoginType, UserID

from tests.helpers import LOGIN, PASSWORD, cli, homeserver_yaml, start_child, sync_call, write_config

WHOAMI = "/_matrix/client/v3/account/whoami"
ALICE = UserID("@alice:test.local")
GET_TOKEN = ApiPath.v1.login.get_token


async def _request_login_token(old: ClientAPI) -> dict[str, Any]:
    """get_token through mautrix: the 401 challenge, then the password in its session."""
    with pytest.raises(MatrixUnknownRequestError) as challenge:
        await old.api.request(Method.POST, GET_TOKEN, {})
    assert challenge.value.http_status == 401
    body = json.loads(challenge.value.text)
    assert body["flows"] == [{"stages": ["m.login.password"]}]
    auth = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": old.mxid},
        "password": PASSWORD,
        "session": body["session"],
    }
    issued = await old.api.request(Method.POST, GET_TOKEN, {"auth": auth}, sensitive=True)
    assert isinstance(issued, dict)
    return issued


def _recording_session(bodies: list[Any]) -> aiohttp.ClientSession:
    """An aiohttp session that keeps the JSON bodies sent to /login, to see what mautrix sends."""

    async def on_chunk_sent(
        session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestChunkSentParams
    ) -> None:
        if params.url.path == LOGIN:
            bodies.append(json.loads(params.chunk))

    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(on_chunk_sent)
    return aiohttp.ClientSession(trace_configs=[trace])


async def _walk(base_url: str, new_device_knows_user: bool) -> dict[str, Any]:
    sent: list[Any] = []
    old = ClientAPI(ALICE, base_url=base_url)
    new_user = ALICE if new_device_knows_user else UserID("")
    new = ClientAPI(new_user, base_url=base_url, client_session=_recording_session(sent))
    replay = ClientAPI(ALICE, base_url=base_url)
    try:
        flows = await old.get_login_flows()
        token_flow = flows.get_first_of_type(LoginType.TOKEN)
        assert token_flow is not None
        assert token_flow.serialize() == {"type": "m.login.token", "get_login_token": True}

        first = await old.login(password=PASSWORD, device_name="mautrix old device")
        issued = await _request_login_token(old)
        assert issued["expires_in_ms"] == 120000
        token = issued["login_token"]

        second = await new.login(login_type=LoginType.TOKEN, token=token, device_name="mautrix new device")
        assert sent == [
            {
                "type": "m.login.token",
                "identifier": {"type": "m.id.user", "user": new_user} if new_user else {"type": "m.id.user"},
                "token": token,
                "initial_device_display_name": "mautrix new device",
            }
        ]
        assert second.user_id == ALICE
        assert second.device_id != first.device_id
        whoami = await new.whoami()
        assert (whoami.user_id, whoami.device_id) == (ALICE, second.device_id)

        with pytest.raises(MatrixRequestError) as refused:
            await replay.login(login_type=LoginType.TOKEN, token=token)
        assert refused.value.http_status == 403
        assert getattr(refused.value, "errcode", None) == "M_FORBIDDEN"
        return {
            "token": token,
            "old": (first.device_id, first.access_token),
            "new": (second.device_id, second.access_token),
        }
    finally:
        for client in (old, new, replay):
            await client.api.session.close()


@pytest.mark.parametrize("new_device_knows_user", [True, False], ids=["identifier-alice", "identifier-empty"])
def test_mautrix_signs_in_a_second_device_with_a_token(tmp_path: Path, new_device_knows_user: bool) -> None:
    config = write_config(tmp_path, homeserver_yaml(tmp_path))
    assert cli("register-user", "-c", str(config), "alice", stdin=PASSWORD).returncode == 0
    server = start_child(config)
    try:
        seen = asyncio.run(_walk(server.base_url, new_device_knows_user))

        # The server, asked directly: both devices' access tokens work, each as its own device.
        for device_id, access_token in (seen["new"], seen["old"]):
            code, whoami = sync_call(server.base_url, "GET", WHOAMI, None, access_token)
            assert (code, whoami["user_id"], whoami["device_id"]) == (200, ALICE, device_id)
        # And the token stays spent.
        code, body = sync_call(
            server.base_url, "POST", LOGIN, {"type": "m.login.token", "token": seen["token"]}
        )
        assert (code, body["errcode"]) == (403, "M_FORBIDDEN")
    finally:
        assert server.terminate() == 0
    log = server.log()
    assert log.count("login token event=issue outcome=issued") == 1
    assert log.count("login token event=spend outcome=spent") == 1
