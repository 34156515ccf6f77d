"""A real JavaScript client (matrix-js-sdk, pinned in tests/js) signs a second device in.

tests/js/sign_in_with_token.mjs walks the flow with the library's own calls
(loginFlows, getCapabilities, requestLoginToken, loginWithToken, whoami) and prints
what it saw; this test checks that, and then checks the server over HTTP itself.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.external import JS_DIR, node_with
from tests.helpers import (
    GET_TOKEN,
    LOGIN,
    PASSWORD,
    cli,
    homeserver_yaml,
    start_child,
    sync_call,
    write_config,
)

WHOAMI = "/_matrix/client/v3/account/whoami"
ALICE = "@alice:test.local"


def run_script(node: str, base_url: str, user: str) -> dict[str, Any]:
    done = subprocess.run(
        [node, str(JS_DIR / "sign_in_with_token.mjs"), base_url, user, PASSWORD],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (
        f"node exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_matrix_js_sdk_signs_in_a_second_device_with_a_token(tmp_path: Path) -> None:
    node = node_with("matrix-js-sdk")
    config = write_config(tmp_path, homeserver_yaml(tmp_path))
    assert cli("register-user", "-c", str(config), "alice", stdin=PASSWORD).returncode == 0
    server = start_child(config)
    try:
        seen = run_script(node, server.base_url, "alice")

        # What the library read from the server to decide the feature is there.
        assert seen["login_flow"] == {"type": "m.login.token", "get_login_token": True}
        assert seen["capability"] == {"enabled": True}
        # requestLoginToken() without auth got the UIA challenge, then the token.
        assert seen["challenge"]["status"] == 401
        assert seen["challenge"]["flows"] == [{"stages": ["m.login.password"]}]
        assert seen["issued"]["expires_in_ms"] == 120000
        token = seen["issued"]["login_token"]
        assert isinstance(token, str) and token.startswith("mlt_")

        # loginWithToken made a new device for alice, and whoami (through the library) agrees.
        old, new = seen["old_device"], seen["new_device"]
        assert new["user_id"] == ALICE
        assert new["device_id"] != old["device_id"]
        assert new["access_token"] != old["access_token"]
        assert seen["whoami"]["user_id"] == ALICE
        assert seen["whoami"]["device_id"] == new["device_id"]
        # The library's second loginWithToken with the same token was refused.
        assert seen["replay"] == {"status": 403, "errcode": "M_FORBIDDEN"}

        # The server, asked directly: both devices' access tokens work, each as its own device.
        for device in (new, old):
            code, whoami = sync_call(server.base_url, "GET", WHOAMI, None, device["access_token"])
            assert (code, whoami["user_id"], whoami["device_id"]) == (200, ALICE, device["device_id"])
        # And the token stays spent.
        code, body = sync_call(server.base_url, "POST", LOGIN, {"type": "m.login.token", "token": token})
        assert (code, body["errcode"]) == (403, "M_FORBIDDEN")
    finally:
        assert server.terminate() == 0

    # js-sdk asked on the stable v1 path: a 401 challenge, then one token issued and spent once.
    log = server.log()
    assert f"POST {GET_TOKEN} 401" in log
    assert f"POST {GET_TOKEN} 200" in log
    assert log.count("login token event=issue outcome=issued") == 1
    assert log.count("login token event=spend outcome=spent") == 1
