"""Pairing (sign in a device by code) served inside a real Synapse, through the reverse proxy.

One Synapse (the module with ``pairing.enabled``, its state in Synapse's SQLite
database, a ``public_baseurl`` of its own) and one nginx running docs/synapse.md's
site serve every test here. The pairing paths are under ``/_synapse/client/``, which
the documented site passes to Synapse as they are. The new device signs in with
``m.login.token`` on Synapse's own ``/login``: Synapse spends the token it minted.
"""

from __future__ import annotations

import html
import http.client
import itertools
import json
import re
import secrets
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml

from benchmarks import servers
from login_token_module.pairing import APPROVE_PATH, DENY_PATH, PAGE_PATH, POLL_PATH, START_PATH
from tests.synapse_helpers import (
    SERVER_NAME,
    WHOAMI,
    Client,
    Proxy,
    Synapse,
    start_nginx,
    start_synapse,
    synapse_config,
    synapse_metrics,
    synapse_python,
)
from tests.watchdog import watch

PUBLIC_BASEURL = "https://matrix.example.com/"
INTERVAL_MS = 50
RATE_WINDOW_S = 3.0
MODULE_CONFIG: dict[str, Any] = {
    "token_lifetime_ms": 120_000,
    "ratelimit": {"per_second": 1 / RATE_WINDOW_S, "burst_count": 1},
    "sweep_interval_ms": 500,
    "pairing": {"enabled": True, "lifetime_ms": 600_000, "interval_ms": INTERVAL_MS},
}
CODE_RE = re.compile(r"^[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}$")
LOGCONTEXT_TROUBLE = re.compile(r"logging context|logcontext|Traceback", re.IGNORECASE)

_numbers = itertools.count()


@pytest.fixture(scope="module")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    directory = tmp_path_factory.mktemp("synapse-pairing")
    config_path, secret = synapse_config(directory, MODULE_CONFIG, {"public_baseurl": PUBLIC_BASEURL})
    config = yaml.safe_load(config_path.read_text())
    # As docs/synapse.md says: Synapse takes the client's address from the proxy's X-Forwarded-For.
    config["listeners"][0]["x_forwarded"] = True
    metrics_port = servers.free_port()
    config["enable_metrics"] = True
    config["listeners"].append({"type": "metrics", "port": metrics_port, "bind_addresses": ["127.0.0.1"]})
    config_path.write_text(yaml.safe_dump(config))
    port = int(config["listeners"][0]["port"])
    process = servers.start_synapse(synapse_python(), config_path, port)
    server = Synapse(process, secret, directory, metrics_port, watch(pids=[process.pid]))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def nginx(synapse: Synapse, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    proxy = start_nginx(tmp_path_factory.mktemp("nginx-pairing"), synapse.port)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def client(nginx: Proxy) -> Client:
    return nginx.client


def new_user(synapse: Synapse) -> tuple[str, str]:
    localpart = f"pairer{next(_numbers)}"
    password = f"password of {localpart}"
    synapse.register(localpart, password)
    return localpart, password


_addresses = itertools.count(1)


def new_device_address() -> str:
    """A loopback address of its own for each new device: starting is limited per address."""
    number = next(_addresses)
    return f"127.0.{number // 250 + 1}.{number % 250 + 1}"


def post_from(
    client: Client, source: str, path: str, body: Any, access_token: str | None = None
) -> tuple[int, dict[str, Any]]:
    """A JSON POST through ``client``'s proxy, connecting from the loopback address ``source``."""
    parts = urllib.parse.urlsplit(client.base_url)
    conn = http.client.HTTPConnection(
        parts.hostname or "", parts.port, timeout=30, source_address=(source, 0)
    )
    headers = {"Content-Type": "application/json"}
    if access_token is not None:
        headers["Authorization"] = f"Bearer {access_token}"
    try:
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert isinstance(answer, dict), answer
    return response.status, answer


def start(client: Client, name: str | None = "Living-room TV", address: str | None = None) -> dict[str, Any]:
    """pair/start from a new device connecting from ``address`` (a fresh one by default)."""
    source = address if address is not None else new_device_address()
    status, answer = post_from(
        client, source, START_PATH, {} if name is None else {"initial_device_display_name": name}
    )
    assert status == 200, (status, answer)
    answer["address"] = source
    return answer


def poll(client: Client, pairing_id: Any) -> Any:
    return client.post(POLL_PATH, {"pairing_id": pairing_id})


def poll_until_decided(client: Client, pairing_id: str) -> Any:
    deadline = time.monotonic() + 10
    while True:
        answer = poll(client, pairing_id)
        if answer.code == 200 and answer.json["status"] != "pending":
            return answer
        assert answer.code in (200, 429), answer
        assert time.monotonic() < deadline, answer
        time.sleep(INTERVAL_MS / 1000)


def approve(client: Client, access: str, code: str, password: str) -> Any:
    """pair/approve's UIA: the 401 with a session, then the password."""
    challenge = client.post(APPROVE_PATH, {"user_code": code}, access)
    if challenge.code != 401:
        return challenge
    assert challenge.json["flows"] == [{"stages": ["m.login.password"]}], challenge
    auth = {"type": "m.login.password", "password": password, "session": challenge.json["session"]}
    return client.post(APPROVE_PATH, {"user_code": code, "auth": auth}, access)


def assert_not_found(response: Any) -> None:
    assert response.code == 404, response
    assert response.json["errcode"] == "M_NOT_FOUND"
    assert "login_token" not in response.json


def test_the_whole_flow_signs_in_the_new_device_on_synapses_login(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    started = start(client)
    assert CODE_RE.match(started["user_code"]), started
    assert len(started["pairing_id"]) >= 43
    # The approval page's address is built from Synapse's public_baseurl.
    assert started["verification_uri"] == PUBLIC_BASEURL + "_synapse/client/login_token/pair"
    assert (
        started["verification_uri_complete"] == started["verification_uri"] + "?code=" + started["user_code"]
    )
    assert (started["expires_in_ms"], started["interval_ms"]) == (600_000, INTERVAL_MS)
    assert poll(client, started["pairing_id"]).json == {"status": "pending"}

    access = client.access_token(localpart, password)
    typed = started["user_code"].replace("-", "").lower()
    seen = client.get(f"{APPROVE_PATH}?user_code={typed}", access)
    assert seen.code == 200, seen
    assert seen.json["user_code"] == started["user_code"]
    assert seen.json["initial_device_display_name"] == "Living-room TV"
    # The new device's address, as the proxy passed it on.
    assert seen.json["client_address"] == started["address"] != "127.0.0.1"
    assert 0 < seen.json["expires_in_ms"] <= 600_000

    challenge = client.post(APPROVE_PATH, {"user_code": started["user_code"]}, access)
    assert challenge.code == 401 and challenge.json["flows"] == [{"stages": ["m.login.password"]}], challenge
    wrong = client.post(
        APPROVE_PATH,
        {
            "user_code": started["user_code"],
            "auth": {"type": "m.login.password", "password": "nope", "session": challenge.json["session"]},
        },
        access,
    )
    assert wrong.code == 401 and wrong.json["errcode"] == "M_FORBIDDEN", wrong
    time.sleep(INTERVAL_MS / 1000)
    assert poll(client, started["pairing_id"]).json == {"status": "pending"}

    approved = approve(client, access, started["user_code"], password)
    assert approved.code == 200, approved
    assert approved.json == {
        "user_code": started["user_code"],
        "initial_device_display_name": "Living-room TV",
    }

    delivered = poll_until_decided(client, started["pairing_id"])
    assert delivered.json["status"] == "approved", delivered
    assert delivered.json["user_id"] == f"@{localpart}:{SERVER_NAME}"
    assert 0 < delivered.json["expires_in_ms"] <= 120_000
    token = delivered.json["login_token"]
    assert token.startswith("syl_"), "Synapse minted it (create_login_token)"
    login = client.token_login(token)
    assert login.code == 200, login
    assert login.json["user_id"] == f"@{localpart}:{SERVER_NAME}"
    assert client.get(WHOAMI, login.json["access_token"]).json["user_id"] == f"@{localpart}:{SERVER_NAME}"
    # Delivered once; and Synapse spent the token.
    assert_not_found(poll(client, started["pairing_id"]))
    assert client.token_login(token).code == 403


def test_approving_takes_the_get_token_allowance(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    started = start(client)
    assert approve(client, access, started["user_code"], password).code == 200
    # get_token, right after, within the window: refused after the password, as a second token would be.
    refused = client.answer(access, client.challenge(access), password)
    assert refused.code == 429 and refused.json["errcode"] == "M_LIMIT_EXCEEDED", refused
    # And a second approval likewise.
    second = approve(client, access, start(client)["user_code"], password)
    assert second.code == 429 and second.json["errcode"] == "M_LIMIT_EXCEEDED", second


def test_deny_signs_nothing_in(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    started = start(client, None)
    denied = client.post(DENY_PATH, {"user_code": started["user_code"]}, access)
    assert denied.code == 200, denied
    answer = poll_until_decided(client, started["pairing_id"])
    assert answer.json == {"status": "denied"}
    assert_not_found(poll(client, started["pairing_id"]))
    # A denied code can no longer be approved.
    assert_not_found(client.post(APPROVE_PATH, {"user_code": started["user_code"]}, access))


def test_32_parallel_polls_after_approval_deliver_one_token(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    started = start(client)
    assert approve(client, access, started["user_code"], password).code == 200
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: poll(client, started["pairing_id"]), range(32)))
    delivered = [answer for answer in answers if answer.code == 200]
    assert len(delivered) == 1, [answer.code for answer in answers]
    assert all(answer.code == 404 for answer in answers if answer.code != 200), answers
    assert delivered[0].json["status"] == "approved"
    assert client.token_login(delivered[0].json["login_token"]).code == 200


def test_a_guessed_or_another_pairings_id_gets_nothing(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    mine, other = start(client), start(client, "Someone else's")
    assert approve(client, access, mine["user_code"], password).code == 200
    assert poll(client, other["pairing_id"]).json == {"status": "pending"}
    for guess in (secrets.token_urlsafe(32), mine["pairing_id"][:-1], mine["user_code"], "x" * 129):
        assert_not_found(poll(client, guess))
    for bad in (None, 7, ["a"]):
        refused = poll(client, bad)
        assert refused.code == 400 and refused.json["errcode"] == "M_BAD_JSON", refused
    # An unknown code is 404 before any UIA, for approve and deny alike.
    for path in (APPROVE_PATH, DENY_PATH):
        assert_not_found(client.post(path, {"user_code": "BBBB-BBBB"}, access))
    assert poll_until_decided(client, mine["pairing_id"]).json["status"] == "approved"


def test_wrong_codes_hit_the_limit_and_a_right_one_then_waits(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    started = start(client)
    approver = new_device_address()
    answers = [
        post_from(client, approver, APPROVE_PATH, {"user_code": "BBBB-BBBB"}, access) for _ in range(6)
    ]
    assert [status for status, _ in answers] == [404] * 5 + [429], answers
    assert answers[-1][1]["errcode"] == "M_LIMIT_EXCEEDED" and answers[-1][1]["retry_after_ms"] > 0
    # Over the limit, even the right code is refused (nothing to learn by guessing on).
    status, answer = post_from(client, approver, APPROVE_PATH, {"user_code": started["user_code"]}, access)
    assert status == 429, answer
    time.sleep(INTERVAL_MS / 1000)
    assert poll(client, started["pairing_id"]).json == {"status": "pending"}


def test_other_paths_below_the_page_are_unrecognized(client: Client) -> None:
    for path in (PAGE_PATH + "/", PAGE_PATH + "/other", START_PATH + "/more"):
        answer = client.post(path, {})
        assert answer.code == 404 and answer.json["errcode"] == "M_UNRECOGNIZED", (path, answer)
    assert client.get(START_PATH).code == 405


def test_the_pairing_state_is_in_synapses_database(synapse: Synapse, client: Client) -> None:
    started = start(client)
    with sqlite3.connect(synapse.directory / "homeserver.db") as db:
        rows = db.execute("SELECT user_code, status FROM login_token_module_pairings").fetchall()
    assert (started["user_code"].replace("-", ""), "pending") in rows, rows
    # Only the pairing_id's hash is stored.
    with sqlite3.connect(synapse.directory / "homeserver.db") as db:
        dump = "\n".join(db.iterdump())
    assert started["pairing_id"] not in dump


def test_an_expired_pairing_is_gone_for_both_sides(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A Synapse of its own, whose pairings live 1.5 s: then poll and approve get 404, and the
    sweep deletes the row from Synapse's database."""
    directory = tmp_path_factory.mktemp("synapse-pairing-expiry")
    short = {**MODULE_CONFIG, "pairing": {"enabled": True, "lifetime_ms": 1_500, "interval_ms": INTERVAL_MS}}
    server = start_synapse(directory, short)
    try:
        direct = server.direct
        server.register("expiring", "expiring password")
        access = direct.access_token("expiring", "expiring password")
        started = direct.post(START_PATH, {})
        assert started.code == 200 and started.json["expires_in_ms"] == 1_500, started
        assert direct.post(POLL_PATH, {"pairing_id": started.json["pairing_id"]}).json == {
            "status": "pending"
        }
        time.sleep(1.7)
        assert_not_found(direct.post(POLL_PATH, {"pairing_id": started.json["pairing_id"]}))
        assert_not_found(direct.post(APPROVE_PATH, {"user_code": started.json["user_code"]}, access))
        deadline = time.monotonic() + 10
        while True:
            with sqlite3.connect(directory / "homeserver.db") as db:
                (left,) = db.execute("SELECT count(*) FROM login_token_module_pairings").fetchone()
            if left == 0:
                break
            assert time.monotonic() < deadline, "the expired pairing was never swept"
            time.sleep(0.3)
    finally:
        server.stop()


# -- the browser page, as a phone's browser posts it (no JavaScript) -----------------


def _page(
    proxy: Proxy, method: str, target: str, form: dict[str, str] | None = None, cookie: str = ""
) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    headers = {"Cookie": cookie} if cookie else {}
    body = None
    if form is not None:
        body = urllib.parse.urlencode(form)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize("action", ["approve", "deny"])
def test_the_approval_page_works_inside_synapse(
    synapse: Synapse, client: Client, nginx: Proxy, action: str
) -> None:
    localpart, password = new_user(synapse)
    started = start(client, "Kitchen tablet")
    status, headers, page = _page(nginx, "GET", f"{PAGE_PATH}?code={started['user_code']}")
    assert status == 200, page[:500]
    named = {name.lower(): value for name, value in headers}
    assert "frame-ancestors 'none'" in named["content-security-policy"]
    assert named["cache-control"] == "no-store"
    assert "Kitchen tablet" in page and started["user_code"] in page
    csrf = html.unescape(re.search(r'name="csrf_token" value="([^"]+)"', page).group(1))  # type: ignore[union-attr]
    cookie = named["set-cookie"].split(";", 1)[0]
    form = {"csrf_token": csrf, "code": started["user_code"], "user": localpart, "action": action}

    # A wrong password: the page again, nothing decided.
    status, _, page = _page(nginx, "POST", PAGE_PATH, {**form, "password": "wrong"}, cookie)
    assert status == 403 and "Wrong user id or password" in page, page[:500]
    # Without the cookie (another site's form): refused.
    status, _, page = _page(nginx, "POST", PAGE_PATH, {**form, "password": password})
    assert status == 403, page[:500]
    time.sleep(INTERVAL_MS / 1000)
    assert poll(client, started["pairing_id"]).json == {"status": "pending"}

    status, _, page = _page(nginx, "POST", PAGE_PATH, {**form, "password": password}, cookie)
    assert status == 200, page[:500]
    decided = poll_until_decided(client, started["pairing_id"])
    if action == "approve":
        assert "Approved" in page
        assert decided.json["status"] == "approved", decided
        login = client.token_login(decided.json["login_token"])
        assert login.code == 200 and login.json["user_id"] == f"@{localpart}:{SERVER_NAME}", login
    else:
        assert "Denied" in page
        assert decided.json == {"status": "denied"}


def test_pairing_metrics_land_in_synapses_registry(synapse: Synapse, client: Client) -> None:
    def count(metrics: dict[Any, float], event: str) -> float:
        return metrics.get(("login_token_module_pairings_total", (("event", event),)), 0)

    before = synapse_metrics(synapse)
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    approved, denied = start(client), start(client)
    assert approve(client, access, approved["user_code"], password).code == 200
    assert client.post(DENY_PATH, {"user_code": denied["user_code"]}, access).code == 200
    assert poll_until_decided(client, approved["pairing_id"]).json["status"] == "approved"
    after = synapse_metrics(synapse)
    for event, expected in (("started", 2), ("approved", 1), ("denied", 1), ("delivered", 1)):
        assert count(after, event) - count(before, event) == expected, event
    routes = {
        dict(labels)["endpoint"]
        for name, labels in after
        if name == "login_token_module_http_request_duration_seconds_count"
    }
    assert {START_PATH, POLL_PATH, APPROVE_PATH, DENY_PATH} <= routes, routes


def test_synapse_log_shows_no_log_context_trouble_and_no_secrets(synapse: Synapse, client: Client) -> None:
    localpart, password = new_user(synapse)
    access = client.access_token(localpart, password)
    started = start(client)
    assert approve(client, access, started["user_code"], password).code == 200
    delivered = poll_until_decided(client, started["pairing_id"])
    token = delivered.json["login_token"]
    time.sleep(1.2)  # a couple of background sweeps
    user = f"user_id=@{localpart}:"
    log = synapse.log_once_it_shows(
        f"pair_approve outcome=approved {user}", f"pair_deliver outcome=delivered {user}"
    )
    assert "login token event=pair_start outcome=started" in log
    trouble = [line for line in log.splitlines() if LOGCONTEXT_TROUBLE.search(line)]
    assert not trouble, "\n".join(trouble[:10])
    for secret in (password, token, started["pairing_id"], access):
        assert secret not in log
