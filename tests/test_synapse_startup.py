"""Synapse with the module, started with configs of their own: a short token
lifetime, and the configurations the module refuses at start-up."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks import servers
from tests.synapse_helpers import (
    CAPABILITIES,
    LOGIN,
    SERVER_NAME,
    doc_block,
    start_nginx,
    start_synapse,
    synapse_metrics,
    synapse_refuses_to_start,
)


def test_the_documented_homeserver_block_works_as_pasted(tmp_path: Path) -> None:
    pasted = yaml.safe_load(doc_block("yaml"))
    assert pasted["modules"][0]["module"] == "login_token_module.LoginTokenModule"
    synapse = start_synapse(tmp_path / "synapse", None, pasted)
    proxy = None
    try:
        proxy = start_nginx(tmp_path / "nginx", synapse.port)
        client = proxy.client
        synapse.register("pasted", "pasted password")
        access = client.access_token("pasted", "pasted password")
        assert {"type": "m.login.token", "get_login_token": True} in client.get(LOGIN).json["flows"]
        assert client.get(CAPABILITIES, access).json["capabilities"]["m.get_login_token"]["enabled"]

        token = client.get_login_token(access, "pasted password")
        assert client.token_login(token).json["user_id"] == f"@pasted:{SERVER_NAME}"
        # ratelimit {per_second: 0.0167, burst_count: 1}: the next token is a minute away.
        limited = client.answer(access, client.challenge(access), "pasted password")
        assert limited.code == 429, limited
        assert 50 <= int(limited.headers["retry-after"]) <= 60
    finally:
        if proxy is not None:
            proxy.stop()
        synapse.stop()


def test_a_short_token_lifetime_really_expires(tmp_path: Path) -> None:
    lifetime_ms = 3_000
    config = {"token_lifetime_ms": lifetime_ms, "ratelimit": {"per_second": 10, "burst_count": 10}}
    synapse = start_synapse(tmp_path / "synapse", config, metrics_port=servers.free_port())
    proxy = None
    try:
        proxy = start_nginx(tmp_path / "nginx", synapse.port)
        client = proxy.client
        synapse.register("shortlived", "short lived password")
        access = client.access_token("shortlived", "short lived password")

        fresh = client.answer(access, client.challenge(access), "short lived password")
        assert fresh.code == 200, fresh
        assert fresh.json["expires_in_ms"] == lifetime_ms
        stale = client.get_login_token(access, "short lived password")
        never_tried = client.get_login_token(access, "short lived password")
        issued_at = time.monotonic()

        # Synapse itself honours the lifetime the module asked for: good at once, refused after it.
        used = client.token_login(fresh.json["login_token"])
        assert used.code == 200, used
        assert used.json["user_id"] == f"@shortlived:{SERVER_NAME}"
        time.sleep(max(0.0, lifetime_ms / 1000 - (time.monotonic() - issued_at)) + 0.5)
        expired = client.token_login(stale)
        assert expired.code == 403, expired
        assert expired.json["errcode"] == "M_FORBIDDEN"

        # Logging out revokes the device's unused tokens, not those already expired.
        revoked = ("login_token_module_tokens_revoked_total", (("reason", "logout"),))
        before = synapse_metrics(synapse).get(revoked, 0)
        assert client.post("/_matrix/client/v3/logout", {}, access).code == 200
        assert synapse_metrics(synapse).get(revoked, 0) == before
        assert client.token_login(never_tried).code == 403
    finally:
        if proxy is not None:
            proxy.stop()
        synapse.stop()


REFUSED: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    (
        "a token store",
        {"store": {"type": "sqlite", "path": "tokens.db"}},
        {},
        "store: this host keeps login tokens in its own database",
    ),
    (
        "login_via_existing_session off",
        {},
        {"login_via_existing_session": {"enabled": False}},
        "set login_via_existing_session: {enabled: true}",
    ),
    (
        "passwords off",
        {},
        {"password_config": {"enabled": False}},
        "turns passwords off (password_config.enabled)",
    ),
    (
        "a bad module key",
        {"ratelimit": {"per_second": "fast"}},
        {},
        "ratelimit.per_second: must be a positive number, got 'fast'",
    ),
]


@pytest.mark.parametrize(
    ("module_config", "extra", "message"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_synapse_refuses_to_start_with_one_clear_error(
    tmp_path: Path, module_config: dict[str, Any], extra: dict[str, Any], message: str
) -> None:
    code, output = synapse_refuses_to_start(tmp_path, module_config, extra)
    assert code != 0, output[-3000:]
    assert message in output, output[-3000:]
