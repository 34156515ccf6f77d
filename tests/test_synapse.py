"""The module inside a real Synapse, reached through a real reverse proxy.

One Synapse process (the pinned release, with the module in its ``modules:``
list and a password pepper) and one nginx in front of it, running docs/synapse.md's
nginx site, serve every test in this file; each test uses users of
its own. Requests go to the spec paths on nginx, which rewrites the three
get_token paths to ``/_synapse/client/login_token/...`` and passes the rest
(``/login``, ``/capabilities``) to Synapse untouched.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sqlite3
import subprocess
import time
import unicodedata
from collections.abc import Iterator
from typing import Any

import aiohttp
import nio
import pytest

from benchmarks import servers
from login_token_module.tokens import hash_token
from tests.helpers import call
from tests.synapse_helpers import (
    CAPABILITIES,
    LOGIN,
    MODULE_PREFIX,
    MODULE_STABLE,
    SERVER_NAME,
    SPEC_PATHS,
    STABLE,
    UNSTABLE_R0,
    UNSTABLE_R1,
    WHOAMI,
    Client,
    Proxy,
    Synapse,
    doc_block,
    start_caddy,
    start_nginx,
    start_synapse,
    synapse_metrics,
    transactions,
)

PEPPER = "a pepper only homeserver.yaml knows"
RATE_WINDOW_S = 3.0  # ratelimit below: one token per user per 3 seconds (room for a slow machine)
MODULE_CONFIG: dict[str, Any] = {
    "token_lifetime_ms": 120_000,
    "ratelimit": {"per_second": 1 / RATE_WINDOW_S, "burst_count": 1},
    # Sweep often, so the background call runs (and is checked) during the tests.
    "sweep_interval_ms": 500,
}
LOGCONTEXT_TROUBLE = re.compile(r"logging context|logcontext|Traceback", re.IGNORECASE)

_numbers = itertools.count()


@pytest.fixture(scope="module")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    directory = tmp_path_factory.mktemp("synapse")
    server = start_synapse(
        directory, MODULE_CONFIG, {"password_config": {"pepper": PEPPER}}, metrics_port=servers.free_port()
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def nginx(synapse: Synapse, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    proxy = start_nginx(tmp_path_factory.mktemp("nginx"), synapse.port)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def client(nginx: Proxy) -> Client:
    return nginx.client


def new_user(synapse: Synapse, password: str | None = None) -> tuple[str, str]:
    """A fresh user (localpart, password) registered in Synapse."""
    localpart = f"user{next(_numbers)}"
    password = password if password is not None else f"password of {localpart}"
    synapse.register(localpart, password)
    return localpart, password


def assert_error(response: Any, code: int, errcode: str) -> None:
    assert response.code == code, response
    assert isinstance(response.body, dict) and response.body.get("errcode") == errcode, response


# -- advertised, and the flow ------------------------------------------------------


def test_synapse_advertises_the_feature_through_the_proxy(synapse: Synapse, client: Client) -> None:
    flows = client.get(LOGIN).json["flows"]
    assert {"type": "m.login.token", "get_login_token": True} in flows, flows
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    capabilities = client.get(CAPABILITIES, access).json["capabilities"]
    assert capabilities["m.get_login_token"] == {"enabled": True}


@pytest.mark.parametrize("path", SPEC_PATHS)
def test_get_token_and_login_through_synapse(synapse: Synapse, client: Client, path: str) -> None:
    localpart, password = new_user(synapse)
    login = client.login(localpart, password).json
    access, old_device = login["access_token"], login["device_id"]

    session = client.challenge(access, path)
    assert client.post(path, {}, access).json["params"] == {}

    wrong = client.answer(access, session, "not the password", path)
    assert wrong.code == 401, wrong
    assert wrong.json["errcode"] == "M_FORBIDDEN"
    assert wrong.json["session"] == session
    assert wrong.json["completed"] == []

    issued = client.answer(access, session, password, path)
    assert issued.code == 200, issued
    token = issued.json["login_token"]
    assert token.startswith("syl_"), "Synapse mints the token (create_login_token)"
    assert issued.json["expires_in_ms"] == MODULE_CONFIG["token_lifetime_ms"]
    if path == UNSTABLE_R0:
        assert issued.json["expires_in"] == MODULE_CONFIG["token_lifetime_ms"] // 1000
    else:
        assert "expires_in" not in issued.json

    new = client.token_login(token)
    assert new.code == 200, new
    assert new.json["user_id"] == f"@{localpart}:{SERVER_NAME}"
    assert new.json["device_id"] != old_device
    assert client.get(WHOAMI, new.json["access_token"]).json["user_id"] == new.json["user_id"]

    assert_error(client.token_login(token), 403, "M_FORBIDDEN")


def test_the_proxy_is_what_reaches_the_module(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    # Synapse alone does not serve MSC3882's final path; through the proxy the module does.
    assert_error(synapse.direct.post(UNSTABLE_R1, {}, access), 404, "M_UNRECOGNIZED")
    client.challenge(access, UNSTABLE_R1)
    # The module's own paths, straight at Synapse.
    for spec_path in SPEC_PATHS:
        synapse.direct.challenge(access, spec_path.replace("/_matrix/client/", MODULE_PREFIX))
    # Nothing else lives under the module's prefix, and the proxy rewrites only the three paths.
    assert_error(synapse.direct.post(MODULE_PREFIX + "v3/login", {}), 404, "M_UNRECOGNIZED")
    below = synapse.direct.post(MODULE_PREFIX + "v1/login/get_token/x", {}, access)
    assert_error(below, 404, "M_UNRECOGNIZED")
    assert_error(client.post(STABLE + "x", {}, access), 404, "M_UNRECOGNIZED")


# -- UIA: single use, bound, rate limited --------------------------------------------


def test_a_completed_session_sent_again_issues_nothing_even_after_the_window(
    synapse: Synapse, client: Client
) -> None:
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    session = client.challenge(access)
    assert client.answer(access, session, password).code == 200

    time.sleep(RATE_WINDOW_S + 0.3)
    replay = client.answer(access, session, password)
    assert replay.code == 401, replay
    assert "login_token" not in replay.json
    assert replay.json["session"] != session
    # The window really had passed: a new session gets a token.
    assert client.answer(access, replay.json["session"], password).code == 200


def test_a_second_token_within_the_window_is_429_and_costs_nothing(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    client.get_login_token(access, password)

    session = client.challenge(access)
    started = time.monotonic()
    limited = client.answer(access, session, password)
    assert_error(limited, 429, "M_LIMIT_EXCEEDED")
    retry_after_ms = limited.json["retry_after_ms"]
    assert 0 < retry_after_ms <= RATE_WINDOW_S * 1000
    assert limited.headers["retry-after"] == str(-(-retry_after_ms // 1000))

    # The refused request spent nothing: the same session works once the window has passed.
    time.sleep(max(0.0, retry_after_ms / 1000 - (time.monotonic() - started)) + 0.3)
    assert client.answer(access, session, password).code == 200


def test_wrong_passwords_are_limited_per_user(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    session = client.challenge(access)
    for _ in range(3):  # failed_auth_ratelimit's default burst
        assert client.answer(access, session, "guess").code == 401
    limited = client.answer(access, session, password)
    assert_error(limited, 429, "M_LIMIT_EXCEEDED")
    assert int(limited.headers["retry-after"]) >= 1


def test_a_session_belongs_to_one_user_and_one_endpoint(synapse: Synapse, client: Client) -> None:
    alice, alice_password = new_user(synapse)
    bob, bob_password = new_user(synapse)
    alice_access = client.access_token(alice, alice_password)
    bob_access = client.access_token(bob, bob_password)
    session = client.challenge(alice_access)

    stolen = client.answer(bob_access, session, bob_password)
    assert stolen.code == 401 and stolen.json["session"] != session, stolen
    elsewhere = client.answer(alice_access, session, alice_password, UNSTABLE_R1)
    assert elsewhere.code == 401 and elsewhere.json["session"] != session, elsewhere
    assert client.answer(alice_access, session, alice_password).code == 200


# -- the password check is Synapse's -------------------------------------------------


def test_a_password_in_another_unicode_normal_form_passes_as_it_logs_in(
    synapse: Synapse, client: Client
) -> None:
    # Full-width letters, a ligature, a decomposed accent and a circled digit: NFKC changes them all.
    typed = "\uff30\uff41\uff53\uff53 \ufb01ne cafe\u0301 \u2460"
    normalised = unicodedata.normalize("NFKC", typed)
    assert normalised != typed
    for attempt in (typed, normalised):
        localpart, _ = new_user(synapse, typed)
        access = client.access_token(localpart, attempt)  # Synapse's own login accepts both
        assert client.answer(access, client.challenge(access), attempt).code == 200, attempt


def test_a_password_longer_than_bcrypt_reads_passes(synapse: Synapse, client: Client) -> None:
    password = "long " * 30  # 150 bytes: Synapse hashes the first 72 of password + pepper
    localpart, _ = new_user(synapse, password)
    access = client.access_token(localpart, password)
    assert client.answer(access, client.challenge(access), password).code == 200


def test_a_user_without_a_password_gets_a_clear_error(synapse: Synapse, client: Client) -> None:
    admin, admin_password = f"admin{next(_numbers)}", "admin password"
    synapse.register(admin, admin_password, admin=True)
    admin_access = client.access_token(admin, admin_password)
    user_id = f"@sso{next(_numbers)}:{SERVER_NAME}"
    # An account with no password, as single sign-on creates them, and a session for it.
    direct = synapse.direct.base_url
    created = call(direct, "PUT", f"/_synapse/admin/v2/users/{user_id}", {}, admin_access)
    assert created.code == 201, created
    login = call(direct, "POST", f"/_synapse/admin/v1/users/{user_id}/login", {}, admin_access)
    assert login.code == 200, login
    access = login.json["access_token"]

    session = client.challenge(access)
    refused = client.answer(access, session, "anything")
    assert_error(refused, 403, "M_FORBIDDEN")
    assert "no password" in refused.json["error"]


# -- bad input ------------------------------------------------------------------------


BAD_BODIES: list[tuple[bytes, int, str]] = [
    (b"not json", 400, "M_NOT_JSON"),
    (b"[1, 2]", 400, "M_BAD_JSON"),
    (b'{"auth": "password"}', 400, "M_BAD_JSON"),
    (b'{"auth": {"type": "m.login.dummy", "password": "x"}}', 400, "M_UNRECOGNIZED"),
    (b'{"auth": {"type": "m.login.password"}}', 400, "M_MISSING_PARAM"),
    (b'{"auth": {"type": "m.login.password", "password": 5}}', 400, "M_BAD_JSON"),
    (b'{"auth": {"type": "m.login.password", "password": "x", "session": 5}}', 400, "M_BAD_JSON"),
    (b'{"auth": {"type": "m.login.password", "password": "x", "identifier": []}}', 400, "M_BAD_JSON"),
    # A lone surrogate is refused at the door, before any password is checked.
    (b'{"auth": {"type": "m.login.password", "password": "\\ud800"}}', 400, "M_BAD_JSON"),
    (b"\xff\xfe{}", 400, "M_NOT_JSON"),
    (b'{"auth": {"session": "nope", "type": "m.login.password", "password": "x"}}', 401, "M_FORBIDDEN"),
]


@pytest.mark.parametrize("path", SPEC_PATHS)
def test_bad_requests_get_matrix_errors_and_issue_nothing(
    synapse: Synapse, client: Client, path: str
) -> None:
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    for raw, code, errcode in BAD_BODIES:
        answer = _raw_post(client, path, raw, access)
        assert (answer.code, answer.json.get("errcode")) == (code, errcode), (raw, answer)
    assert_error(_raw_post(client, path, b"{}", None), 401, "M_MISSING_TOKEN")
    assert_error(_raw_post(client, path, b"{}", "syt_not_a_token"), 401, "M_UNKNOWN_TOKEN")
    for method in ("GET", "PUT", "DELETE"):
        refused = call(client.base_url, method, path, access_token=access)
        assert_error(refused, 405, "M_UNRECOGNIZED")
    # No bad request spent the user's one token in the window.
    assert client.answer(access, client.challenge(access, path), password, path).code == 200


def _raw_post(client: Client, path: str, raw: bytes, access: str | None) -> Any:
    return call(client.base_url, "POST", path, access_token=access, raw_body=raw)


# -- clients, docs/synapse.md, the log -----------------------------------------


def test_matrix_nio_signs_in_a_second_device_through_synapse(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    asyncio.run(_nio_walk(client.base_url, f"@{localpart}:{SERVER_NAME}", password))


async def _nio_walk(base_url: str, user_id: str, password: str) -> None:
    old = nio.AsyncClient(base_url, user_id)
    new = nio.AsyncClient(base_url, "")
    try:
        info = await old.login_info()
        assert isinstance(info, nio.LoginInfoResponse), info
        assert "m.login.token" in info.flows
        logged_in = await old.login(password, device_name="old phone")
        assert isinstance(logged_in, nio.LoginResponse), logged_in

        # nio has no binding for get_token; the old device asks over plain HTTP.
        headers = {"Authorization": f"Bearer {old.access_token}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(base_url + STABLE, json={}, headers=headers) as challenge:
                assert challenge.status == 401
                session = (await challenge.json())["session"]
            auth = {"type": "m.login.password", "password": password, "session": session}
            async with http.post(base_url + STABLE, json={"auth": auth}, headers=headers) as issued:
                assert issued.status == 200
                token = (await issued.json())["login_token"]

        second = await new.login(token=token, device_name="new laptop")
        assert isinstance(second, nio.LoginResponse), second
        assert second.user_id == user_id
        assert second.device_id != logged_in.device_id
        whoami = await new.whoami()
        assert isinstance(whoami, nio.WhoamiResponse), whoami
        assert whoami.user_id == user_id
    finally:
        await old.close()
        await new.close()


def test_the_documented_curl_check_works_through_nginx(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)

    def run_check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", doc_block("sh", 1)],
            env={"HS": client.base_url, "USERNAME": localpart, "PASSWORD": password, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def assert_it_worked(done: subprocess.CompletedProcess[str]) -> None:
        assert done.returncode == 0 and not done.stderr, done.stderr
        lines = done.stdout.splitlines()
        assert '"get_login_token":true' in lines[0].replace(" ", ""), lines
        assert '"session"' in lines[1] and '"flows"' in lines[1], lines
        assert f'"user_id":"@{localpart}:{SERVER_NAME}"' in lines[2].replace(" ", ""), lines
        assert '"M_FORBIDDEN"' in lines[3], lines

    assert_it_worked(run_check())
    # Run again at once, it meets the module's rate limit (one token per RATE_WINDOW_S): it
    # stops there with one plain line saying when to try again, never a traceback (on a
    # machine slow enough for the window to pass, it simply works again).
    again = run_check()
    if again.returncode == 0:
        assert_it_worked(again)
    else:
        assert re.fullmatch(r"stopped: M_LIMIT_EXCEEDED [^\n]*; try again in \d+ s\n", again.stderr), (
            again.stderr
        )
        assert len(again.stdout.splitlines()) == 2, again.stdout  # the flows, the unstable path's 401


def test_the_documented_caddy_block_reaches_the_module(
    synapse: Synapse, tmp_path_factory: pytest.TempPathFactory
) -> None:
    caddy = start_caddy(tmp_path_factory.mktemp("caddy"), synapse.port)
    try:
        via = caddy.client
        localpart, password = new_user(synapse)
        access = via.access_token(localpart, password)
        for path in SPEC_PATHS:
            via.challenge(access, path)
        token = via.get_login_token(access, password, UNSTABLE_R1)
        assert via.token_login(token).code == 200
    finally:
        caddy.stop()


def test_synapse_log_shows_no_log_context_trouble_and_no_secrets(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    token = client.get_login_token(access, password)
    assert client.answer(access, None, "wrong").code in (401, 429)
    assert client.token_login(token).code == 200
    time.sleep(1.2)  # a couple of background sweeps
    log = synapse.log_once_it_shows("login token event=issue outcome=issued")
    assert "login_token_module" in log and "Loaded module" in log
    trouble = [line for line in log.splitlines() if LOGCONTEXT_TROUBLE.search(line)]
    assert not trouble, "\n".join(trouble[:10])
    assert password not in log and PEPPER not in log
    assert token not in log
    module_lines = [line for line in log.splitlines() if " - login_token_module." in line]
    assert module_lines and not any(access in line for line in module_lines)


# -- operators: metrics, revocation -------------------------------------------------


def test_module_metrics_land_in_synapses_registry(synapse: Synapse, client: Client) -> None:
    issued = ("login_token_module_tokens_issued_total", ())
    before = synapse_metrics(synapse)
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    session = client.challenge(access)
    assert client.answer(access, session, "wrong").code == 401
    client.get_login_token(access, password)
    after = synapse_metrics(synapse)
    assert after[issued] - before.get(issued, 0) == 1
    failures = ("login_token_module_uia_failures_total", (("reason", "password"),))
    assert after[failures] - before.get(failures, 0) == 1
    # The same scrape serves Synapse's own metrics: one registry.
    assert any(name.startswith("synapse_") for name, _ in after)
    latency = [key for key in after if key[0] == "login_token_module_http_request_duration_seconds_count"]
    assert any(dict(labels)["endpoint"].startswith(MODULE_PREFIX) for _, labels in latency), latency
    # The password check's database transaction is named in Synapse's own metrics.
    assert transactions(after, "login_token_module_password_hash") > 0


def test_module_metrics_in_synapse_label_the_route_never_the_spelling(synapse: Synapse) -> None:
    from tests.test_hostile_property import send

    stable = MODULE_STABLE
    spellings = [
        stable.replace("get_token", "get_%74oken"),
        stable.replace("/login/", "/log%69n/"),
        stable.replace("/v1/", "/%761/"),
    ]
    for path in spellings:  # each routed to the module's resource: no access token, so 401
        assert send(synapse.port, "POST", path, b"{}").status == 401, path
    # Methods are case-sensitive: pOsT is not POST (405, counted as "other").
    assert send(synapse.port, "pOsT", stable, b"{}").status == 405
    latency = [
        dict(labels)
        for name, labels in synapse_metrics(synapse)
        if name == "login_token_module_http_request_duration_seconds_count"
    ]
    for labels in latency:
        assert "%" not in labels["endpoint"], labels
        assert labels["method"] in {"GET", "POST", "HEAD", "OPTIONS", "other"}, labels


def test_logout_in_synapse_revokes_only_that_devices_tokens(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    first = client.login(localpart, password).json
    second = client.login(localpart, password).json
    from_first = client.get_login_token(first["access_token"], password)
    time.sleep(RATE_WINDOW_S)
    from_second = client.get_login_token(second["access_token"], password)
    before = synapse_metrics(synapse)
    assert client.post("/_matrix/client/v3/logout", {}, first["access_token"]).code == 200
    assert_error(client.token_login(from_first), 403, "M_FORBIDDEN")
    new = client.token_login(from_second)
    assert new.code == 200, new
    revoked = ("login_token_module_tokens_revoked_total", (("reason", "logout"),))
    after = synapse_metrics(synapse)
    assert after[revoked] - before.get(revoked, 0) == 1
    # The revocation's database transaction is named in Synapse's own metrics.
    assert transactions(after, "login_token_module_invalidate") > transactions(
        before, "login_token_module_invalidate"
    )
    user_id = f"@{localpart}:{SERVER_NAME}"
    log = synapse.log_once_it_shows(
        f"event=revoke outcome=revoked user_id={user_id} minted_by_device={first['device_id']}"
    )
    assert from_first not in log and from_second not in log


def test_the_modules_state_is_in_synapses_own_database(synapse: Synapse, client: Client) -> None:
    """UIA sessions, rate limits and the notes of minted tokens are in tables of the module's
    own (prefixed, versioned) in Synapse's database, beside Synapse's login_tokens."""
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    pending = client.challenge(access)
    client.get_login_token(access, password)
    user_id = f"@{localpart}:{SERVER_NAME}"
    with sqlite3.connect(synapse.directory / "homeserver.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        ours = {name for name in tables if name.startswith("login_token_module_")}
        assert ours == {
            "login_token_module_schema_versions",
            "login_token_module_tokens",
            "login_token_module_history",
            "login_token_module_uia_sessions",
            "login_token_module_ratelimits",
            # Pairings' table comes with the schema (version 4); pairing itself is not
            # served inside Synapse yet.
            "login_token_module_pairings",
        }, tables
        assert "login_tokens" in tables  # Synapse's own, untouched
        assert db.execute("SELECT component, version FROM login_token_module_schema_versions").fetchall() == [
            ("login_token_module", 4)
        ]
        assert db.execute(
            "SELECT user_id FROM login_token_module_uia_sessions WHERE session_id = ?", (pending,)
        ).fetchall() == [(user_id,)]
        noted = db.execute("SELECT device_id FROM login_token_module_tokens WHERE user_id = ?", (user_id,))
        assert len(noted.fetchall()) == 1
        limited = db.execute("SELECT limiter FROM login_token_module_ratelimits WHERE key = ?", (user_id,))
        assert {row[0] for row in limited} == {"get_token", "get_token_failed_auth"}


def test_lineage_a_token_login_records_the_spend_and_the_new_device_in_the_history(
    synapse: Synapse, client: Client
) -> None:
    """Synapse's own login spends the token; its account-validity callback tells the module,
    which finds the new device through Synapse's rows and records it as the reference host does."""
    localpart, password = new_user(synapse)
    user_id = f"@{localpart}:{SERVER_NAME}"
    asking = client.login(localpart, password).json
    spent = client.get_login_token(asking["access_token"], password)
    time.sleep(RATE_WINDOW_S)
    unspent = client.get_login_token(asking["access_token"], password)
    new = client.token_login(spent)
    assert new.code == 200, new
    # A password login is no token's: it changes nothing in the history.
    assert client.login(localpart, password).code == 200
    history = (
        "SELECT token_hash, device_id, outcome, finished_at_ms, new_device_id FROM login_token_module_history"
    )
    with sqlite3.connect(synapse.directory / "homeserver.db") as db:
        rows = {
            bytes(row[0]): row[1:]
            for row in db.execute(history + " WHERE user_id = ?", (user_id,)).fetchall()
        }
        used_ts = db.execute("SELECT used_ts FROM login_tokens WHERE token = ?", (spent,)).fetchone()[0]
        left = {bytes(row[0]) for row in db.execute("SELECT token_hash FROM login_token_module_tokens")}
    assert rows == {
        hash_token(spent): (asking["device_id"], "spent", used_ts, new.json["device_id"]),
        hash_token(unspent): (asking["device_id"], None, None, None),
    }
    # Spent: no longer among the tokens a logout would revoke; the other still is.
    assert hash_token(spent) not in left and hash_token(unspent) in left
    synapse.log_once_it_shows(
        f"event=spend outcome=spent user_id={user_id} minted_by_device={asking['device_id']}"
        f" new_device_id={new.json['device_id']}"
    )
