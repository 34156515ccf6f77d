"""A real Matrix client library (matrix-nio) walks the flow against the server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import nio

from tests.helpers import GET_TOKEN, PASSWORD, cli, homeserver_yaml, start_child, write_config


async def _walk(base_url: str) -> None:
    old = nio.AsyncClient(base_url, "@alice:test.local")
    new = nio.AsyncClient(base_url, "")
    reused = nio.AsyncClient(base_url, "")
    try:
        info = await old.login_info()
        assert isinstance(info, nio.LoginInfoResponse), info
        assert "m.login.token" in info.flows

        logged_in = await old.login(PASSWORD, device_name="old phone")
        assert isinstance(logged_in, nio.LoginResponse), logged_in

        # nio has no binding for get_token; the old device asks over plain HTTP.
        headers = {"Authorization": f"Bearer {old.access_token}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(base_url + GET_TOKEN, json={}, headers=headers) as challenge:
                assert challenge.status == 401
                session = (await challenge.json())["session"]
            auth = {"type": "m.login.password", "password": PASSWORD, "session": session}
            async with http.post(base_url + GET_TOKEN, json={"auth": auth}, headers=headers) as issued:
                assert issued.status == 200
                token = (await issued.json())["login_token"]

        second = await new.login(token=token, device_name="new laptop")
        assert isinstance(second, nio.LoginResponse), second
        assert second.user_id == "@alice:test.local"
        assert second.device_id != logged_in.device_id
        whoami = await new.whoami()
        assert isinstance(whoami, nio.WhoamiResponse), whoami
        assert whoami.user_id == "@alice:test.local"

        refused = await reused.login(token=token)
        assert isinstance(refused, nio.LoginError), refused
        assert refused.status_code == "M_FORBIDDEN"
    finally:
        for client in (old, new, reused):
            await client.close()


def test_matrix_nio_signs_in_a_second_device_with_a_token(tmp_path: Path) -> None:
    config = write_config(tmp_path, homeserver_yaml(tmp_path))
    assert cli("register-user", "-c", str(config), "alice", stdin=PASSWORD).returncode == 0
    server = start_child(config)
    try:
        asyncio.run(_walk(server.base_url))
    finally:
        assert server.terminate() == 0
