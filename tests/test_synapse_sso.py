"""Single-sign-on users confirming get_token through the module in Synapse.

Synapse runs with the module and an OAuth2 identity provider that the test
starts on loopback (``oauth_provider.py``: authorize, token, userinfo). A user
created through it has no password; get_token's 401 offers ``m.login.sso`` in a
session of Synapse's own, which Synapse's fallback page completes once the user
signs in at the provider (scripted HTTP, cookies by hand); the retry with the
session gets the token, once.
"""

from __future__ import annotations

import html
import http.client
import re
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from benchmarks import servers
from login_token_module.pairing import APPROVE_PATH, POLL_PATH, START_PATH
from tests.oauth_provider import OAuthProvider, start_oauth_provider
from tests.synapse_helpers import (
    SERVER_NAME,
    STABLE,
    Client,
    Proxy,
    Synapse,
    start_nginx,
    synapse_config,
    synapse_python,
)

CLIENT_URL = "http://client.invalid/"
MODULE_CONFIG = {
    "ratelimit": {"per_second": 0.001, "burst_count": 10},
    "pairing": {"enabled": True, "interval_ms": 50},
}


@dataclass
class Sso:
    synapse: Synapse
    provider: OAuthProvider
    proxy: Proxy

    @property
    def client(self) -> Client:
        return self.proxy.client


@pytest.fixture(scope="module")
def sso(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sso]:
    provider = start_oauth_provider()
    directory = tmp_path_factory.mktemp("synapse-sso")
    synapse: Synapse | None = None
    proxy: Proxy | None = None
    try:
        extra = {
            "oidc_providers": [provider.synapse_config()],
            "sso": {"client_whitelist": [CLIENT_URL]},
        }
        config_path, secret = synapse_config(directory, MODULE_CONFIG, extra)
        config = yaml.safe_load(config_path.read_text())
        port = int(config["listeners"][0]["port"])
        config["public_baseurl"] = f"http://127.0.0.1:{port}/"
        config_path.write_text(yaml.safe_dump(config))
        synapse = Synapse(servers.start_synapse(synapse_python(), config_path, port), secret, directory)
        proxy = start_nginx(directory / "nginx", port)
        yield Sso(synapse, provider, proxy)
    finally:
        if proxy is not None:
            proxy.stop()
        if synapse is not None:
            synapse.stop()
        provider.stop()


def _get(url: str, cookies: dict[str, str] | None = None) -> tuple[int, dict[str, list[str]], str]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == "127.0.0.1", url  # nothing leaves loopback
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
        found: dict[str, list[str]] = {}
        for name, value in response.getheaders():
            found.setdefault(name.lower(), []).append(value)
        return response.status, found, body
    finally:
        conn.close()


def _cookies(headers: dict[str, list[str]]) -> dict[str, str]:
    # Synapse marks its SSO cookies Secure; on plain-HTTP loopback they are sent by hand.
    return dict(value.split(";", 1)[0].split("=", 1) for value in headers.get("set-cookie", []))


def _through_the_provider(
    authorize_url: str, cookies: dict[str, str]
) -> tuple[int, dict[str, list[str]], str]:
    """The provider signs the user in and sends them back to Synapse's callback."""
    status, headers, _ = _get(authorize_url)
    assert status == 302, (status, headers)
    callback = headers["location"][0]
    assert "/_synapse/client/oidc/callback" in callback, callback
    return _get(callback, cookies)


def _sign_up(sso: Sso, localpart: str) -> str:
    """A new user, through single sign-on only; their access token."""
    sso.provider.signed_in.clear()
    sso.provider.signed_in.update({"sub": f"sub-{localpart}", "preferred_username": localpart})
    base = sso.synapse.direct.base_url
    redirect = urllib.parse.quote(CLIENT_URL)
    status, headers, _ = _get(
        f"{base}/_matrix/client/v3/login/sso/redirect/oidc-loopback?redirectUrl={redirect}"
    )
    assert status == 302, (status, headers)
    status, headers, body = _through_the_provider(headers["location"][0], _cookies(headers))
    assert status == 302, (status, body[:500])
    back = urllib.parse.urlsplit(headers["location"][0])
    login_token = dict(urllib.parse.parse_qsl(back.query))["loginToken"]
    signed_in = sso.synapse.direct.token_login(login_token)
    assert signed_in.code == 200, signed_in
    assert signed_in.json["user_id"] == f"@{localpart}:{SERVER_NAME}"
    return str(signed_in.json["access_token"])


def _complete_at_the_fallback_page(sso: Sso, session: str) -> str:
    """Synapse's SSO fallback page for ``session``, followed through the provider; the final page."""
    base = sso.synapse.direct.base_url
    status, headers, page = _get(f"{base}/_matrix/client/v3/auth/m.login.sso/fallback/web?session={session}")
    assert status == 200, (status, page[:500])
    links = [html.unescape(link) for link in re.findall(r'href="([^"]+)"', page)]
    authorize = [link for link in links if link.startswith(sso.provider.base_url + "/authorize")]
    assert authorize, page[:2000]
    status, _, done = _through_the_provider(authorize[0], _cookies(headers))
    assert status == 200, (status, done[:500])
    return done


def _challenge(client: Client, access: str) -> dict[str, Any]:
    response = client.post(STABLE, {}, access)
    assert response.code == 401, response
    return dict(response.json)


def test_an_sso_user_confirms_get_token_at_synapses_fallback_page(sso: Sso) -> None:
    access = _sign_up(sso, "ssoalice")
    challenge = _challenge(sso.client, access)
    assert {"stages": ["m.login.sso"]} in challenge["flows"], challenge
    session = challenge["session"]

    # Not yet signed in at the provider: the session alone is asked for again, the same one.
    early = sso.client.post(STABLE, {"auth": {"session": session}}, access)
    assert early.code == 401 and early.json["session"] == session, early
    assert "login_token" not in early.json

    _complete_at_the_fallback_page(sso, session)
    # Synapse's own get_token (reached without the proxy) does not take the session as its UIA.
    builtin = sso.synapse.direct.post(STABLE, {"auth": {"session": session}}, access)
    assert builtin.code == 403 and "login_token" not in builtin.json, builtin
    done = sso.client.post(STABLE, {"auth": {"session": session}}, access)
    assert done.code == 200, done
    signed_in = sso.client.token_login(done.json["login_token"])
    assert signed_in.code == 200, signed_in
    assert signed_in.json["user_id"] == f"@ssoalice:{SERVER_NAME}"

    # The completed session, sent again (with or without its type), issues nothing.
    for auth in ({"session": session}, {"type": "m.login.sso", "session": session}):
        replayed = sso.client.post(STABLE, {"auth": auth}, access)
        assert replayed.code == 401, replayed
        assert "login_token" not in replayed.json and replayed.json["session"] != session


def test_an_sso_session_is_the_users_own(sso: Sso) -> None:
    bob = _sign_up(sso, "ssobob")
    carol = _sign_up(sso, "ssocarol")
    session = _challenge(sso.client, bob)["session"]
    sso.provider.signed_in.clear()
    sso.provider.signed_in.update({"sub": "sub-ssobob", "preferred_username": "ssobob"})
    _complete_at_the_fallback_page(sso, session)
    # Carol cannot spend the session Bob completed.
    stolen = sso.client.post(STABLE, {"auth": {"session": session}}, carol)
    assert stolen.code == 401 and "login_token" not in stolen.json, stolen
    assert stolen.json["session"] != session
    # Bob still can.
    assert sso.client.post(STABLE, {"auth": {"session": session}}, bob).code == 200


def test_signing_in_as_someone_else_at_the_provider_completes_nothing(sso: Sso) -> None:
    dave = _sign_up(sso, "ssodave")
    _sign_up(sso, "ssoerin")
    session = _challenge(sso.client, dave)["session"]
    # The provider now signs Erin in: Synapse refuses to complete Dave's session with her.
    sso.provider.signed_in.clear()
    sso.provider.signed_in.update({"sub": "sub-ssoerin", "preferred_username": "ssoerin"})
    base = sso.synapse.direct.base_url
    status, headers, page = _get(f"{base}/_matrix/client/v3/auth/m.login.sso/fallback/web?session={session}")
    assert status == 200
    links = [html.unescape(link) for link in re.findall(r'href="([^"]+)"', page)]
    authorize = next(link for link in links if link.startswith(sso.provider.base_url + "/authorize"))
    _through_the_provider(authorize, _cookies(headers))
    refused = sso.client.post(STABLE, {"auth": {"session": session}}, dave)
    assert refused.code == 401 and "login_token" not in refused.json, refused


def test_an_sso_user_approves_a_pairing_at_synapses_fallback_page(sso: Sso) -> None:
    access = _sign_up(sso, "ssohank")
    started = sso.client.post(START_PATH, {"initial_device_display_name": "Hall TV"})
    assert started.code == 200, started
    code, pairing_id = started.json["user_code"], started.json["pairing_id"]
    challenge = sso.client.post(APPROVE_PATH, {"user_code": code}, access)
    assert challenge.code == 401 and {"stages": ["m.login.sso"]} in challenge.json["flows"], challenge
    session = challenge.json["session"]
    # Synapse's confirmation page says what the session is for.
    base = sso.synapse.direct.base_url
    _, _, page = _get(f"{base}/_matrix/client/v3/auth/m.login.sso/fallback/web?session={session}")
    assert "approve signing in a new device by its pairing code" in html.unescape(page), page[:2000]

    early = sso.client.post(APPROVE_PATH, {"user_code": code, "auth": {"session": session}}, access)
    assert early.code == 401 and early.json["session"] == session, early
    assert sso.client.post(POLL_PATH, {"pairing_id": pairing_id}).json == {"status": "pending"}

    sso.provider.signed_in.clear()
    sso.provider.signed_in.update({"sub": "sub-ssohank", "preferred_username": "ssohank"})
    _complete_at_the_fallback_page(sso, session)
    approved = sso.client.post(APPROVE_PATH, {"user_code": code, "auth": {"session": session}}, access)
    assert approved.code == 200, approved
    assert approved.json == {"user_code": code, "initial_device_display_name": "Hall TV"}
    deadline = time.monotonic() + 10
    while (delivered := sso.client.post(POLL_PATH, {"pairing_id": pairing_id})).code == 429:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert delivered.code == 200 and delivered.json["status"] == "approved", delivered
    signed_in = sso.client.token_login(delivered.json["login_token"])
    assert signed_in.code == 200 and signed_in.json["user_id"] == f"@ssohank:{SERVER_NAME}", signed_in


def test_a_password_user_is_not_offered_sso(sso: Sso) -> None:
    sso.synapse.register("plainfrank", "frank's password")
    access = sso.client.access_token("plainfrank", "frank's password")
    assert _challenge(sso.client, access)["flows"] == [{"stages": ["m.login.password"]}]


def test_log_context_trouble_is_only_synapses_own_oidc_callback(sso: Sso) -> None:
    """Synapse 1.163.2's OIDC callback itself warns "Expected logging context sentinel"
    once per callback (a login's as much as a UIA's); nothing the module serves does."""
    access = _sign_up(sso, "ssogina")
    session = _challenge(sso.client, access)["session"]
    _complete_at_the_fallback_page(sso, session)
    assert sso.client.post(STABLE, {"auth": {"session": session}}, access).code == 200
    log = sso.synapse.log_once_it_shows("login token event=issue outcome=issued user_id=@ssogina:")
    callbacks = set(re.findall(r" - (\S+) - Received OIDC callback", log))
    troubled = re.findall(r"Expected logging context \S+ but found (\S+)", log)
    assert troubled and set(troubled) <= callbacks, (troubled, callbacks)
    module_lines = [line for line in log.splitlines() if "login_token_module" in line]
    assert not [line for line in module_lines if "Traceback" in line or "WARNING" in line]
