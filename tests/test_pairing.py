"""Pairing (sign in a device by code) over real HTTP against the reference host:
start, approve with UIA, poll, m.login.token; deny; expiry; delivery once; limits.
"""

from __future__ import annotations

import logging
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from prometheus_client import REGISTRY
from twisted.internet import defer, threads

from login_token_module import pairing
from login_token_module.config import ConfigError, parse_config
from login_token_module.host.config import parse_homeserver_config
from login_token_module.pairing import APPROVE_PATH, DENY_PATH, MAX_USER_CODE_LENGTH, POLL_PATH, START_PATH
from tests.helpers import (
    GET_TOKEN,
    PASSWORD,
    AuditRecords,
    HttpClient,
    InProcessServer,
    Response,
    hold_clock,
    homeserver_yaml,
    rename_table,
    running,
    sleep,
    start_in_process,
    warnings_logged,
)
from tests.test_host_minting import store_timings

PAIRING = {"enabled": True, "lifetime_ms": 600_000, "interval_ms": 10}
CODE_RE = re.compile(r"^[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}$")


def config(**pairing: Any) -> dict[str, Any]:
    return {"pairing": {**PAIRING, **pairing}}


async def start_behind_proxy(tmp_path: Path) -> InProcessServer:
    """A server with pairing whose listener takes each client's address from
    X-Forwarded-For, so that one test can speak from many addresses."""
    listener = {"port": 0, "bind_addresses": ["127.0.0.1"], "x_forwarded": True}
    return await start_in_process(
        tmp_path, {"store": {"type": "sqlite", "path": "tokens.db"}, **config()}, listeners=[listener]
    )


async def start(client: HttpClient, name: str | None = "Living-room TV") -> dict[str, Any]:
    response = await client.post(START_PATH, {} if name is None else {"initial_device_display_name": name})
    assert response.code == 200, response
    return response.json


async def poll(client: HttpClient, pairing_id: Any) -> Response:
    return await client.post(POLL_PATH, {"pairing_id": pairing_id})


async def approve(client: HttpClient, access: str, code: str, password: str = PASSWORD) -> Response:
    """The UIA dance on pair/approve: ask, then answer the challenge with the password."""
    challenge = await client.post(APPROVE_PATH, {"user_code": code}, access)
    if challenge.code != 401:
        return challenge
    auth = {"type": "m.login.password", "password": password, "session": challenge.json["session"]}
    return await client.post(APPROVE_PATH, {"user_code": code, "auth": auth}, access)


def pairings_counted(event: str) -> float:
    """How many pairings the module has counted as ``event`` (started, approved, denied, delivered)."""
    return REGISTRY.get_sample_value("login_token_module_pairings_total", {"event": event}) or 0.0


def refused_by(limiter: str) -> float:
    """How many requests the module has refused with 429 under ``limiter``."""
    return REGISTRY.get_sample_value("login_token_module_ratelimited_total", {"limiter": limiter}) or 0.0


def assert_not_found(response: Response) -> None:
    assert response.code == 404, response
    assert response.json["errcode"] == "M_NOT_FOUND"
    assert "login_token" not in response.json


@pytest_twisted.ensureDeferred
async def test_the_whole_flow_signs_in_the_new_device(tmp_path: Path, audit_log: AuditRecords) -> None:
    async with running(tmp_path, config()) as srv:
        client = srv.client
        started = await start(client)
        assert CODE_RE.match(started["user_code"]), started
        assert len(started["pairing_id"]) >= 43  # 256 bits, base64url
        assert started["verification_uri"] == client.base_url + "/_synapse/client/login_token/pair"
        assert started["verification_uri_complete"] == (
            started["verification_uri"] + "?code=" + started["user_code"]
        )
        assert (started["expires_in_ms"], started["interval_ms"]) == (600_000, 10)
        assert (await poll(client, started["pairing_id"])).json == {"status": "pending"}

        access = await client.access_token("alice")
        seen = await client.get(f"{APPROVE_PATH}?user_code={started['user_code']}", access)
        assert seen.code == 200, seen
        assert seen.json["user_code"] == started["user_code"]
        assert seen.json["initial_device_display_name"] == "Living-room TV"
        assert seen.json["client_address"] == "127.0.0.1"
        assert 0 < seen.json["expires_in_ms"] <= 600_000
        assert isinstance(seen.json["created_at_ms"], int)

        # Approving asks for the password first, as get_token does.
        challenge = await client.post(APPROVE_PATH, {"user_code": started["user_code"]}, access)
        assert challenge.code == 401 and challenge.json["flows"] == [{"stages": ["m.login.password"]}]
        wrong = await client.post(
            APPROVE_PATH,
            {
                "user_code": started["user_code"],
                "auth": {
                    "type": "m.login.password",
                    "password": "nope",
                    "session": challenge.json["session"],
                },
            },
            access,
        )
        assert wrong.code == 401 and wrong.json["errcode"] == "M_FORBIDDEN"
        # At least interval_ms (10) since the last poll, however fast the steps above ran.
        await sleep(0.02)
        assert (await poll(client, started["pairing_id"])).json == {"status": "pending"}
        approved = await approve(client, access, started["user_code"])
        assert approved.code == 200, approved
        assert approved.json == {
            "user_code": started["user_code"],
            "initial_device_display_name": "Living-room TV",
        }

        await sleep(0.02)
        delivered = await poll(client, started["pairing_id"])
        assert delivered.code == 200, delivered
        assert delivered.json["status"] == "approved"
        assert delivered.json["user_id"] == "@alice:test.local"
        assert 0 < delivered.json["expires_in_ms"] <= 120_000
        login = await client.token_login(delivered.json["login_token"], initial_device_display_name="TV")
        assert login.code == 200, login
        assert login.json["user_id"] == "@alice:test.local"
        assert_not_found(await poll(client, started["pairing_id"]))

        history = await srv.module.store.lineage("@alice:test.local")
        assert [(entry.paired, entry.outcome, entry.new_device_id) for entry in history] == [
            (True, "spent", login.json["device_id"])
        ]
    events = [
        record.audit["event"]  # type: ignore[attr-defined]
        for record in audit_log.records
        if record.audit["event"].startswith("pair_")  # type: ignore[attr-defined]
    ]
    assert events == ["pair_start", "pair_approve", "pair_deliver"]
    approval = audit_log.of("pair_approve")[0]
    assert approval["user_id"] == "@alice:test.local"
    assert approval["minted_by_device"] is not None
    assert approval["new_device_address"] == "127.0.0.1"
    assert audit_log.of("pair_deliver")[0]["token_fingerprint"] == approval["token_fingerprint"]
    assert all("login_token" not in str(record.getMessage()) for record in audit_log.records)


@pytest_twisted.ensureDeferred
async def test_a_code_is_taken_in_any_case_with_or_without_the_dash(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as srv:
        started = await start(srv.client, name=None)
        access = await srv.client.access_token("alice")
        typed = started["user_code"].replace("-", "").lower()
        seen = await srv.client.get(f"{APPROVE_PATH}?user_code=%20{typed}%20", access)
        assert seen.code == 200, seen
        assert seen.json["initial_device_display_name"] is None
        # Spaces around count towards the longest a typed code may be (32 characters).
        padded = started["user_code"].center(MAX_USER_CODE_LENGTH)
        assert len(padded) == 32
        assert (await srv.client.get(f"{APPROVE_PATH}?user_code={quote(padded)}", access)).code == 200
        assert_not_found(await srv.client.get(f"{APPROVE_PATH}?user_code={quote(padded + ' ')}", access))
        assert (await approve(srv.client, access, started["user_code"].lower())).code == 200
        assert (await poll(srv.client, started["pairing_id"])).json["status"] == "approved"


@pytest_twisted.ensureDeferred
async def test_a_denied_pairing_says_so_once_and_cannot_be_approved(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as srv:
        started = await start(srv.client)
        access = await srv.client.access_token("alice")
        denied = await srv.client.post(DENY_PATH, {"user_code": started["user_code"]}, access)
        assert denied.code == 200, denied
        assert_not_found(await approve(srv.client, access, started["user_code"]))
        assert (await poll(srv.client, started["pairing_id"])).json == {"status": "denied"}
        assert_not_found(await poll(srv.client, started["pairing_id"]))
        assert await srv.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_a_denial_is_counted_and_audited_with_who_denied_it(
    tmp_path: Path, audit_log: AuditRecords
) -> None:
    """The deny record and the denied poll's record both name the user, the device and
    the address that denied, and the same pairing; the denial is counted once."""

    async with running(tmp_path, config()) as srv:
        started = await start(srv.client)
        login = await srv.client.password_login("alice", device_id="PHONE")
        access = login.json["access_token"]
        before, timed_before = pairings_counted("denied"), store_timings("pair_deny")
        denied = await srv.client.post(DENY_PATH, {"user_code": started["user_code"]}, access)
        assert (denied.code, denied.body) == (200, {}), denied
        assert (pairings_counted("denied"), store_timings("pair_deny")) == (before + 1, timed_before + 1)
        await sleep(0.02)
        assert (await poll(srv.client, started["pairing_id"])).json == {"status": "denied"}
    (deny,) = audit_log.of("pair_deny")
    assert {key: deny[key] for key in ("outcome", "user_id", "minted_by_device", "client_address")} == {
        "outcome": "denied",
        "user_id": "@alice:test.local",
        "minted_by_device": "PHONE",
        "client_address": "127.0.0.1",
    }, deny
    assert deny["new_device_address"] == "127.0.0.1", deny
    assert isinstance(deny["pairing"], str) and deny["pairing"], deny
    (delivered,) = audit_log.of("pair_deliver")
    assert {
        key: delivered[key]
        for key in ("outcome", "user_id", "minted_by_device", "approver_address", "client_address", "pairing")
    } == {
        "outcome": "denied",
        "user_id": "@alice:test.local",
        "minted_by_device": "PHONE",
        "approver_address": "127.0.0.1",
        "client_address": "127.0.0.1",
        "pairing": deny["pairing"],
    }, delivered


@pytest_twisted.ensureDeferred
async def test_an_approval_is_counted_timed_and_audited_with_who_approved_it(
    tmp_path: Path, audit_log: AuditRecords
) -> None:
    """As a denial: the approval is counted and timed once, its record names the user,
    the device and the address that approved, and the delivery's record (read back from
    the stored pairing) names the same, for the same pairing."""

    srv = await start_behind_proxy(tmp_path)
    try:
        await srv.register("alice")
        device = await srv.client.request(
            "POST", START_PATH, json_body={}, headers={"X-Forwarded-For": "10.0.0.1"}
        )
        code = device.json["user_code"]
        login = await srv.client.password_login("alice", device_id="PHONE")
        access = login.json["access_token"]
        phone = {"Authorization": f"Bearer {access}", "X-Forwarded-For": "10.0.0.2"}
        challenge = await srv.client.request(
            "POST", APPROVE_PATH, json_body={"user_code": code}, headers=phone
        )
        auth = {"type": "m.login.password", "password": PASSWORD, "session": challenge.json["session"]}
        before, timed_before = pairings_counted("approved"), store_timings("pair_approve")
        approved = await srv.client.request(
            "POST", APPROVE_PATH, json_body={"user_code": code, "auth": auth}, headers=phone
        )
        assert approved.code == 200, approved
        assert (pairings_counted("approved"), store_timings("pair_approve")) == (before + 1, timed_before + 1)
        await sleep(0.02)
        polls_timed, deliveries = store_timings("pair_poll"), pairings_counted("delivered")
        delivered = await srv.client.request(
            "POST",
            POLL_PATH,
            json_body={"pairing_id": device.json["pairing_id"]},
            headers={"X-Forwarded-For": "10.0.0.1"},
        )
        assert delivered.json["status"] == "approved", delivered
        assert store_timings("pair_poll") == polls_timed + 1
        assert pairings_counted("delivered") == deliveries + 1
    finally:
        await srv.stop()
    (approval,) = audit_log.of("pair_approve")
    assert {
        key: approval[key]
        for key in ("outcome", "user_id", "minted_by_device", "client_address", "new_device_address")
    } == {
        "outcome": "approved",
        "user_id": "@alice:test.local",
        "minted_by_device": "PHONE",
        "client_address": "10.0.0.2",
        "new_device_address": "10.0.0.1",
    }, approval
    (issued,) = audit_log.of("issue")
    assert (issued["minted_by_device"], issued["client_address"]) == ("PHONE", "10.0.0.2"), issued
    (started,) = audit_log.of("pair_start")
    assert (started["outcome"], started["client_address"]) == ("started", "10.0.0.1"), started
    assert isinstance(approval["pairing"], str) and approval["pairing"] == started["pairing"], approval
    (delivery,) = audit_log.of("pair_deliver")
    assert {
        key: delivery[key]
        for key in ("outcome", "user_id", "minted_by_device", "approver_address", "client_address", "pairing")
    } == {
        "outcome": "delivered",
        "user_id": "@alice:test.local",
        "minted_by_device": "PHONE",
        "approver_address": "10.0.0.2",
        "client_address": "10.0.0.1",
        "pairing": approval["pairing"],
    }, delivery
    assert delivery["token_fingerprint"] == approval["token_fingerprint"]


@pytest.mark.parametrize("path", [DENY_PATH, APPROVE_PATH])
@pytest_twisted.ensureDeferred
async def test_wrong_codes_count_against_the_user_and_the_address_each_on_its_own(
    tmp_path: Path, path: str
) -> None:
    """deny's and approve's wrong codes are counted under the user (from any address) and
    under the address (for any user), not under some shared key."""
    srv = await start_behind_proxy(tmp_path)

    async def deny(access: str, code: str, address: str) -> Response:
        headers = {"Authorization": f"Bearer {access}", "X-Forwarded-For": address}
        return await srv.client.request("POST", path, json_body={"user_code": code}, headers=headers)

    async def look_up(access: str, code: str, address: str) -> Response:
        headers = {"Authorization": f"Bearer {access}", "X-Forwarded-For": address}
        return await srv.client.request("GET", f"{APPROVE_PATH}?user_code={code}", headers=headers)

    try:
        for user in ("alice", "bob", "carol"):
            await srv.register(user)
        started = await start(srv.client)
        code = started["user_code"]
        alice = await srv.client.access_token("alice")
        bob = await srv.client.access_token("bob")
        carol = await srv.client.access_token("carol")
        # Alice: five wrong codes, each from another address ...
        for n in range(1, 6):
            assert_not_found(await deny(alice, "BBBB-BBBB", f"10.0.1.{n}"))
        # ... waits from a sixth; bob, from a fresh address, does not.
        assert (await look_up(alice, code, "10.0.1.6")).code == 429
        assert (await look_up(bob, code, "10.0.2.1")).code == 200
        # Bob: five wrong codes from one address: carol waits there, and only there.
        for _ in range(5):
            assert_not_found(await deny(bob, "CCCC-CCCC", "10.0.3.1"))
        assert (await look_up(carol, code, "10.0.3.1")).code == 429
        assert (await look_up(carol, code, "10.0.4.1")).code == 200
    finally:
        await srv.stop()


# The sealed-token construction, pinned: a token sealed by one worker (or version)
# must open on another. Fixed inputs: a pairing_id, a token and the ephemeral key
# seal() draws (here a fixed one); the answers were made by the code as it is.
KNOWN_PAIRING_ID = "known-answer-pairing-id-0123456789abcdefghij"
KNOWN_TOKEN = "syt_known_answer_token"
KNOWN_SEAL_KEY = bytes.fromhex("14b9dadf9ec9693cbcc9434a1784895e3f17306a8244659f3bae67d4a480843b")
KNOWN_EPHEMERAL = bytes(range(32))
KNOWN_SEALED = bytes.fromhex(
    "8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f"  # the ephemeral public key
    "08ea4563df315bfe14d841d0e91b61a699bdeef9af121cd74e44edc58ddfea13825ff05d43ab"  # token and tag
)


def test_the_sealed_token_construction_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pairing.seal_key(KNOWN_PAIRING_ID) == KNOWN_SEAL_KEY
    assert pairing.unseal(KNOWN_PAIRING_ID, KNOWN_SEALED) == KNOWN_TOKEN
    assert pairing.unseal(KNOWN_PAIRING_ID + "x", KNOWN_SEALED) is None

    class FixedEphemeral:
        """X25519 keys as pairing.py makes them, but the ephemeral one fixed."""

        from_private_bytes = staticmethod(X25519PrivateKey.from_private_bytes)

        @staticmethod
        def generate() -> X25519PrivateKey:
            return X25519PrivateKey.from_private_bytes(KNOWN_EPHEMERAL)

    monkeypatch.setattr(pairing, "X25519PrivateKey", FixedEphemeral)
    assert pairing.seal(KNOWN_SEAL_KEY, KNOWN_TOKEN) == KNOWN_SEALED


@pytest_twisted.ensureDeferred
async def test_an_expired_pairing_gives_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running(tmp_path, config(lifetime_ms=1000)) as srv:
        started = await start(srv.client)
        access = await srv.client.access_token("alice")
        await sleep(1.1)
        assert_not_found(await poll(srv.client, started["pairing_id"]))
        assert_not_found(await srv.client.get(f"{APPROVE_PATH}?user_code={started['user_code']}", access))
        assert_not_found(await srv.client.post(APPROVE_PATH, {"user_code": started["user_code"]}, access))
        # The sweep forgets the expired pairing (counted as an expiry, and timed), not one
        # started just now, and drains the limits without a warning.
        fresh = await start(srv.client, "Just now")
        expired, sweeps = pairings_counted("expired"), store_timings("sweep_pairings")
        with caplog.at_level(logging.WARNING):
            await srv.module.pairings.sweep()
        assert warnings_logged(caplog) == []
        assert pairings_counted("expired") == expired + 1
        assert store_timings("sweep_pairings") == sweeps + 1
        assert await srv.module.state.pairings.count() == 1
        assert (await poll(srv.client, fresh["pairing_id"])).json == {"status": "pending"}
        assert await srv.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_expired_pairings_are_swept_on_the_sweep_interval(tmp_path: Path) -> None:
    """Nobody calls the sweep here: the module's own background sweep forgets the pairing."""
    async with running(tmp_path, {**config(lifetime_ms=1000), "sweep_interval_ms": 100}) as srv:
        expired = pairings_counted("expired")
        await start(srv.client)
        assert await srv.module.state.pairings.count() == 1
        deadline = time.monotonic() + 10
        while await srv.module.state.pairings.count():
            assert time.monotonic() < deadline, "the pairing was never swept"
            await sleep(0.05)
        assert pairings_counted("expired") == expired + 1


@pytest_twisted.ensureDeferred
async def test_a_sweep_that_fails_warns_with_the_reason_and_the_next_one_sweeps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(tmp_path, config(lifetime_ms=1000)) as srv:
        await start(srv.client)
        await sleep(1.1)
        db = tmp_path / "tokens.db"
        await threads.deferToThread(rename_table, db, "login_token_pairings", "pairings_away")
        with caplog.at_level(logging.WARNING):
            await srv.module.pairings.sweep()
        warned = warnings_logged(caplog)
        assert warned == ["Could not sweep the pairings: no such table: login_token_pairings"]
        await threads.deferToThread(rename_table, db, "pairings_away", "login_token_pairings")
        expired = pairings_counted("expired")
        await srv.module.pairings.sweep()
        assert pairings_counted("expired") == expired + 1
        assert await srv.module.state.pairings.count() == 0


@pytest_twisted.ensureDeferred
async def test_a_right_code_whose_allowance_cannot_be_given_back_is_still_served_and_warned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The wrong-code allowance reserved for a look-up is given back when the code is
    right; if the store fails just then, the look-up is still answered, and the operator
    is told why, once per allowance (the user's and the address's). The allowances are
    kept in the database when workers share state."""
    store_config = {"type": "sqlite", "path": "tokens.db", "shared_state": True}
    async with running(tmp_path, {"store": store_config, **config()}) as srv:
        started = await start(srv.client)
        access = await srv.client.access_token("alice")
        db = tmp_path / "tokens.db"
        store = srv.module.pairings._store
        find = store.find

        async def find_then_fail_the_limits(user_code: str, now_ms: int) -> Any:
            found = await find(user_code, now_ms)
            await threads.deferToThread(rename_table, db, "login_token_ratelimits", "ratelimits_away")
            return found

        monkeypatch.setattr(store, "find", find_then_fail_the_limits)
        with caplog.at_level(logging.WARNING):
            described = await srv.client.get(f"{APPROVE_PATH}?user_code={started['user_code']}", access)
        await threads.deferToThread(rename_table, db, "ratelimits_away", "login_token_ratelimits")
        assert described.code == 200, described
        warned = warnings_logged(caplog)
        reason = "no such table: login_token_ratelimits"
        assert warned == [f"Could not give back a wrong-code allowance: {reason}"] * 2


@pytest_twisted.ensureDeferred
async def test_each_pairing_limiter_is_timed_and_shared_under_its_own_name(tmp_path: Path) -> None:
    """A limiter's name is part of what operators and workers see: its store timings are
    labelled with it, and with shared state its counts are kept under it in the one table
    every worker reads (a worker that named it otherwise would count apart): pair_start,
    pair_poll and pair_wrong_code."""
    store_config = {"type": "sqlite", "path": "tokens.db", "shared_state": True}
    async with running(tmp_path, {"store": store_config, **config()}) as srv:
        timings = (
            "pair_start_acquire",
            "pair_poll_acquire",
            "pair_wrong_code_acquire",
            "pair_wrong_code_refund",
        )
        before = {operation: store_timings(operation) for operation in timings}
        started = await start(srv.client)
        assert (await poll(srv.client, started["pairing_id"])).json == {"status": "pending"}
        access = await srv.client.access_token("alice")
        assert_not_found(await srv.client.post(DENY_PATH, {"user_code": "BBBB-BBBB"}, access))
        seen = await srv.client.get(f"{APPROVE_PATH}?user_code={started['user_code']}", access)
        assert seen.code == 200, seen
        # Each wrong-code check is made against the user and the address: the wrong code
        # keeps both, the right one gives both back.
        assert {operation: store_timings(operation) - before[operation] for operation in timings} == {
            "pair_start_acquire": 1,
            "pair_poll_acquire": 1,
            "pair_wrong_code_acquire": 4,
            "pair_wrong_code_refund": 2,
        }
        with sqlite3.connect(tmp_path / "tokens.db") as db:
            rows = db.execute(
                "SELECT limiter, key FROM login_token_ratelimits ORDER BY limiter, key"
            ).fetchall()
        assert [limiter for limiter, _ in rows] == [
            "pair_poll",
            "pair_start",
            "pair_wrong_code",
            "pair_wrong_code",
        ]
        assert [key for limiter, key in rows if limiter != "pair_poll"] == [
            "127.0.0.1",
            "address:127.0.0.1",
            "user:@alice:test.local",
        ]


@pytest_twisted.ensureDeferred
async def test_a_code_in_the_query_that_is_not_utf8_is_a_wrong_code(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as srv:
        access = await srv.client.access_token("alice")
        for raw in ("%FF", "ABCD%80EFGH", "%C3"):
            assert_not_found(await srv.client.get(f"{APPROVE_PATH}?user_code={raw}", access))


@pytest_twisted.ensureDeferred
async def test_a_guessed_or_another_pairings_id_gets_nothing(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as srv:
        mine, other = await start(srv.client), await start(srv.client, "Someone else's")
        access = await srv.client.access_token("alice")
        assert (await approve(srv.client, access, mine["user_code"])).code == 200
        await sleep(0.02)
        # The other pairing is still pending, and says nothing of mine.
        assert (await poll(srv.client, other["pairing_id"])).json == {"status": "pending"}
        # A pairing_id of 1 to 128 characters is looked up; an empty or longer one is not.
        polls = store_timings("pair_poll")
        for guess in ("", "x" * 129):
            assert_not_found(await poll(srv.client, guess))
        assert store_timings("pair_poll") == polls
        guesses = ("x", "x" * 128, secrets.token_urlsafe(32), mine["pairing_id"][:-1], mine["user_code"])
        for guess in guesses:
            assert_not_found(await poll(srv.client, guess))
        assert store_timings("pair_poll") == polls + len(guesses)
        for bad in (None, 7, ["a"], {"pairing_id": "a"}):
            refused = await poll(srv.client, bad)
            assert refused.code == 400 and refused.json["errcode"] == "M_BAD_JSON", refused
        assert (await poll(srv.client, mine["pairing_id"])).json["status"] == "approved"


def tamper_pairing(db_path: Path, column: str, change: Callable[[Any], Any]) -> None:
    """Change one column of the one stored pairing behind the server's back (as someone
    with the database could). Blocking: run it in a thread."""
    with sqlite3.connect(db_path) as conn:
        (old,) = conn.execute(f"SELECT {column} FROM login_token_pairings").fetchone()
        conn.execute(f"UPDATE login_token_pairings SET {column} = ?", (change(old),))


@pytest.mark.parametrize(
    ("column", "change"),
    [
        ("sealed_token", lambda sealed: sealed[:-1] + bytes([sealed[-1] ^ 1])),
        ("sealed_token", lambda _: None),
        ("token_expires_at_ms", lambda _: None),
        ("user_id", lambda _: None),
    ],
    ids=["sealed_token_altered", "sealed_token_gone", "token_expiry_gone", "user_id_gone"],
)
@pytest_twisted.ensureDeferred
async def test_an_approved_pairing_tampered_with_in_the_database_delivers_nothing_and_warns(
    tmp_path: Path,
    column: str,
    change: Callable[[Any], Any],
    caplog: pytest.LogCaptureFixture,
    audit_log: AuditRecords,
) -> None:
    """A sealed token that does not open, or an approval without its expiry or its user,
    is answered as no pairing (never a 500, never a token or a null one), and the
    operator is told; the row is gone, as after a delivery."""
    async with running(tmp_path, config()) as srv:
        started = await start(srv.client)
        access = await srv.client.access_token("alice")
        assert (await approve(srv.client, access, started["user_code"])).code == 200
        await threads.deferToThread(tamper_pairing, tmp_path / "tokens.db", column, change)
        deliveries = pairings_counted("delivered")
        with caplog.at_level(logging.WARNING):
            answer = await poll(srv.client, started["pairing_id"])
        assert_not_found(answer)
        warned = warnings_logged(caplog)
        assert warned == ["A pairing's sealed token could not be opened; nothing delivered"]
        assert pairings_counted("delivered") == deliveries
        assert_not_found(await poll(srv.client, started["pairing_id"]))
    assert audit_log.of("pair_deliver") == []


@pytest_twisted.ensureDeferred
async def test_a_token_delivered_in_its_last_millisecond_says_so_and_still_signs_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, config()) as srv:
        clock = hold_clock(srv, monkeypatch)
        started = await start(srv.client)
        access = await srv.client.access_token("alice")
        approved_at_ms = clock.ms
        assert (await approve(srv.client, access, started["user_code"])).code == 200
        # The token lives 120 s from its approval (get_token's lifetime): 1 ms of it is left.
        clock.advance(119.9995)
        assert clock.ms == approved_at_ms + 119_999
        delivered = await poll(srv.client, started["pairing_id"])
        assert delivered.code == 200, delivered
        assert delivered.json["expires_in_ms"] == 1
        assert (await srv.client.token_login(delivered.json["login_token"])).code == 200


@pytest_twisted.ensureDeferred
async def test_32_parallel_polls_after_approval_deliver_one_token(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as srv:
        started = await start(srv.client)
        access = await srv.client.access_token("alice")
        assert (await approve(srv.client, access, started["user_code"])).code == 200
        answers = await defer.gatherResults(
            [defer.ensureDeferred(poll(srv.client, started["pairing_id"])) for _ in range(32)]
        )
        delivered = [answer for answer in answers if answer.code == 200]
        assert len(delivered) == 1, [answer.code for answer in answers]
        assert all(answer.code == 404 for answer in answers if answer.code != 200)
        assert (await srv.client.token_login(delivered[0].json["login_token"])).code == 200


@pytest_twisted.ensureDeferred
async def test_polling_faster_than_the_interval_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One poll per interval_ms: a poll exactly interval_ms after the last is answered,
    one 4 ms sooner waits those 4 ms."""
    async with running(tmp_path, config(interval_ms=5000)) as srv:
        clock = hold_clock(srv, monkeypatch)
        started = await start(srv.client)
        assert started["interval_ms"] == 5000
        polled_at = clock.now
        assert (await poll(srv.client, started["pairing_id"])).json == {"status": "pending"}
        refused = refused_by("pair_poll")
        fast = await poll(srv.client, started["pairing_id"])
        assert fast.code == 429 and fast.json["errcode"] == "M_LIMIT_EXCEEDED", fast
        assert fast.json["retry_after_ms"] == 5000
        assert refused_by("pair_poll") == refused + 1
        clock.now = polled_at + 4.996
        early = await poll(srv.client, started["pairing_id"])
        assert early.code == 429 and early.json["retry_after_ms"] == 4, early
        clock.now = polled_at + 5
        assert (await poll(srv.client, started["pairing_id"])).json == {"status": "pending"}


@pytest_twisted.ensureDeferred
async def test_approving_takes_the_get_token_allowance(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as srv:
        access = await srv.client.access_token("alice")
        assert (await srv.client.get_login_token(access)).code == 200
        started = await start(srv.client)
        limited = await approve(srv.client, access, started["user_code"])
        assert limited.code == 429 and limited.json["errcode"] == "M_LIMIT_EXCEEDED", limited
        # Nothing changed: the pairing still waits, and no second token exists.
        assert (await poll(srv.client, started["pairing_id"])).json == {"status": "pending"}
        assert await srv.module.store.count_tokens() == 1

    (tmp_path / "second").mkdir()
    async with running(tmp_path / "second", config()) as srv:
        access = await srv.client.access_token("alice")
        started = await start(srv.client)
        assert (await approve(srv.client, access, started["user_code"])).code == 200
        # ... and after an approval, get_token waits as after a get_token.
        challenge = await srv.client.post(GET_TOKEN, {}, access)
        auth = {"type": "m.login.password", "password": PASSWORD, "session": challenge.json["session"]}
        limited = await srv.client.post(GET_TOKEN, {"auth": auth}, access)
        assert limited.code == 429, limited


@pytest_twisted.ensureDeferred
async def test_wrong_codes_hit_the_limit_per_user_and_per_address(tmp_path: Path) -> None:
    async with running(tmp_path, config(), users=("alice", "bob")) as srv:
        started = await start(srv.client)
        alice = await srv.client.access_token("alice")
        wrong = ["BBBBBBBB", "bcdf-ghjk", "AEIOUAEI", "", "x" * 40]
        lookups, refused = store_timings("pair_find"), refused_by("pair_wrong_code")
        looked_up = 0
        for code in wrong:
            if code.upper().replace("-", "") == started["user_code"].replace("-", ""):
                continue
            assert_not_found(await srv.client.post(DENY_PATH, {"user_code": code}, alice))
            # Only what can be a code (8 of the 20 letters, with or without the dash) is looked up.
            looked_up += code in ("BBBBBBBB", "bcdf-ghjk")
        assert store_timings("pair_find") == lookups + looked_up
        # Over the limit: even the right code waits (and is not looked up), and the pairing is untouched.
        for attempt in (
            srv.client.post(DENY_PATH, {"user_code": started["user_code"]}, alice),
            srv.client.get(f"{APPROVE_PATH}?user_code={started['user_code']}", alice),
            srv.client.post(APPROVE_PATH, {"user_code": started["user_code"]}, alice),
        ):
            limited = await attempt
            assert limited.code == 429 and limited.json["errcode"] == "M_LIMIT_EXCEEDED", limited
        # The address is over the limit too: bob, from the same address, waits as well.
        bob = await srv.client.access_token("bob")
        limited = await srv.client.post(DENY_PATH, {"user_code": started["user_code"]}, bob)
        assert limited.code == 429, limited
        assert refused_by("pair_wrong_code") == refused + 4
        assert store_timings("pair_find") == lookups + looked_up
        assert (await poll(srv.client, started["pairing_id"])).json == {"status": "pending"}


@pytest_twisted.ensureDeferred
async def test_start_is_limited_per_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten starts at once, then one per 6 s, from each address (another address is not
    held back); and no more than ten pairings waiting from one address: past those, a
    start waits for one of them (interval_ms). Only the starts that began a pairing are
    counted as started."""
    srv = await start_behind_proxy(tmp_path)

    async def start_from(address: str) -> Response:
        return await srv.client.request(
            "POST", START_PATH, json_body={}, headers={"X-Forwarded-For": address}
        )

    try:
        clock = hold_clock(srv, monkeypatch)
        refused = (refused_by("pair_start"), refused_by("pair_pending"))
        starts, started = store_timings("pair_start"), pairings_counted("started")
        for _ in range(10):
            assert (await start_from("10.0.0.1")).code == 200
        limited = await start_from("10.0.0.1")
        assert limited.code == 429 and limited.json["errcode"] == "M_LIMIT_EXCEEDED", limited
        assert (refused_by("pair_start"), refused_by("pair_pending")) == (refused[0] + 1, refused[1])
        assert (await start_from("10.0.0.2")).code == 200
        clock.advance(6)
        full = await start_from("10.0.0.1")
        assert (full.code, full.json) == (
            429,
            {
                "errcode": "M_LIMIT_EXCEEDED",
                "error": "Too many pairings are waiting for approval from this address",
                "retry_after_ms": 10,
            },
        ), full
        assert (refused_by("pair_start"), refused_by("pair_pending")) == (refused[0] + 1, refused[1] + 1)
        # Each start the limiter let through reached the store (and was timed there).
        assert store_timings("pair_start") == starts + 12
        assert pairings_counted("started") == started + 11
        assert await srv.module.state.pairings.count() == 11
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_a_start_draws_again_while_its_code_is_taken_and_gives_up_after_eight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drawn code still held by a live pairing is drawn again; eight taken in a row (the
    code space nearly full) give up with 503, storing and counting nothing. The draws are
    fixed here (20^8 codes make a collision too rare to wait for); the store finds them
    taken as it would any."""
    drawn = iter(["BBBBBBBB", "BBBBBBBB", "CCCCCCCC", *["BBBBBBBB"] * 8, "DDDDDDDD"])
    monkeypatch.setattr(pairing, "new_user_code", lambda: next(drawn))
    async with running(tmp_path, config()) as srv:
        assert (await start(srv.client))["user_code"] == "BBBB-BBBB"
        starts, started = store_timings("pair_start"), pairings_counted("started")
        assert (await start(srv.client))["user_code"] == "CCCC-CCCC"
        assert store_timings("pair_start") == starts + 2
        full = await srv.client.post(START_PATH, {})
        assert (full.code, full.json) == (
            503,
            {"errcode": "M_UNKNOWN", "error": "No pairing code is free; try again later"},
        ), full
        assert next(drawn) == "DDDDDDDD"  # eight drawn for it, no more
        assert store_timings("pair_start") == starts + 2 + 8
        assert pairings_counted("started") == started + 1
        assert await srv.module.state.pairings.count() == 2


@pytest_twisted.ensureDeferred
async def test_hostile_client_strings_get_matrix_errors_without_echo(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as srv:
        access = await srv.client.access_token("alice")
        marker = "<script>evil</script>"
        cases: list[tuple[str, Any, str | None]] = [
            (START_PATH, {"initial_device_display_name": 5}, None),
            (START_PATH, {"initial_device_display_name": marker * 10}, None),
            (START_PATH, {"initial_device_display_name": "a\nb" + marker}, None),
            (START_PATH, {"initial_device_display_name": "a\u202eb" + marker}, None),
            (START_PATH, {"initial_device_display_name": "a\x00b" + marker}, None),
            (POLL_PATH, {"pairing_id": marker + "\ud800"}, None),
            (POLL_PATH, {}, None),
            (APPROVE_PATH, {"user_code": ["BCDF-GHJK"]}, access),
            (DENY_PATH, {"user_code": {"a": marker}}, access),
        ]
        for path, body, token in cases:
            response = await srv.client.post(path, body, token)
            assert 400 <= response.code < 500, (path, body, response)
            assert "errcode" in response.json
            assert "evil" not in str(response.body)
        not_json = await srv.client.request("POST", POLL_PATH, raw_body=b"\xff\xfe{")
        assert not_json.code == 400 and not_json.json["errcode"] == "M_NOT_JSON"
        # Approving and denying need an access token; looking a code up too.
        for path in (APPROVE_PATH, DENY_PATH):
            assert (await srv.client.post(path, {"user_code": "BCDF-GHJK"})).code == 401
        assert (await srv.client.get(f"{APPROVE_PATH}?user_code=BCDFGHJK")).code == 401


@pytest_twisted.ensureDeferred
async def test_a_display_name_is_a_string_of_at_most_100_printable_characters_or_none(tmp_path: Path) -> None:
    """The name the new device gives itself is shown to the user who approves it: up to
    100 printable characters; one more, or not a string, is refused with its own errcode.
    A start with no body (or only white space) is a start without a name."""
    async with running(tmp_path, config()) as srv:
        access = await srv.client.access_token("alice")

        async def shown_name(started: dict[str, Any]) -> Any:
            seen = await srv.client.get(f"{APPROVE_PATH}?user_code={started['user_code']}", access)
            assert seen.code == 200, seen
            return seen.json["initial_device_display_name"]

        longest = "x" * 100
        assert await shown_name(await start(srv.client, name=longest)) == longest
        too_long = await srv.client.post(START_PATH, {"initial_device_display_name": longest + "x"})
        assert (too_long.code, too_long.json) == (
            400,
            {
                "errcode": "M_INVALID_PARAM",
                "error": "'initial_device_display_name' must be at most 100 printable characters",
            },
        ), too_long
        not_text = await srv.client.post(START_PATH, {"initial_device_display_name": 5})
        assert (not_text.code, not_text.json) == (
            400,
            {"errcode": "M_BAD_JSON", "error": "'initial_device_display_name' must be a string"},
        ), not_text
        for body in (None, b"", b" \r\n"):
            nameless = await srv.client.request("POST", START_PATH, raw_body=body)
            assert nameless.code == 200, (body, nameless)
            assert await shown_name(nameless.json) is None


@pytest_twisted.ensureDeferred
async def test_pairing_is_off_unless_enabled(tmp_path: Path) -> None:
    async with running(tmp_path, {}) as srv:
        for path in (START_PATH, POLL_PATH, APPROVE_PATH, DENY_PATH):
            response = await srv.client.post(path, {})
            assert response.code == 404 and response.json["errcode"] == "M_UNRECOGNIZED", response


@pytest_twisted.ensureDeferred
async def test_verification_uri_uses_public_baseurl(tmp_path: Path) -> None:
    from tests.helpers import start_in_process

    srv: InProcessServer = await start_in_process(
        tmp_path,
        {"store": {"type": "sqlite", "path": "tokens.db"}, **config()},
        public_baseurl="https://matrix.example.org",
    )
    try:
        started = await start(srv.client)
        assert started["verification_uri"] == "https://matrix.example.org/_synapse/client/login_token/pair"
        # Behind the TLS proxy that address implies, the page's CSRF cookie is Secure
        # though the request reached the server as plain HTTP.
        page = await srv.client.get(f"/_synapse/client/login_token/pair?code={started['user_code']}")
        assert page.code == 200
        cookie = page.headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie, cookie
    finally:
        await srv.stop()


@pytest.mark.parametrize(
    ("pairing", "key"),
    [
        ({"enabled": "yes"}, "enabled"),
        ({"lifetime_ms": 0}, "lifetime_ms"),
        ({"lifetime_ms": "600000"}, "lifetime_ms"),
        ({"interval_ms": 5}, "interval_ms"),
        ({"interval_ms": True}, "interval_ms"),
        ({"lifetime_ms": 2000, "interval_ms": 2000}, "interval_ms"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_pairing_config_is_refused_naming_the_key(pairing: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"pairing": pairing})
    assert raised.value.path == ["pairing", key]


def test_pairing_config_defaults() -> None:
    parsed = parse_config({}).pairing
    assert (parsed.enabled, parsed.lifetime_ms, parsed.interval_ms) == (False, 600_000, 5000)
    assert parse_config({"pairing": {"enabled": True}}).pairing.enabled
    # The longest poll interval allowed: a minute.
    assert parse_config({"pairing": {"interval_ms": 60_000}}).pairing.interval_ms == 60_000


@pytest.mark.parametrize("value", ["matrix.example.org", "ftp://x/", "https://a b/", 5, "https://x/?q=1"])
def test_a_bad_public_baseurl_is_refused(tmp_path: Path, value: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_homeserver_config(homeserver_yaml(tmp_path, public_baseurl=value), str(tmp_path))
    assert raised.value.path == ["public_baseurl"]
