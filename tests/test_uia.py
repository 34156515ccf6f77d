"""User-Interactive Auth on the get_token endpoints, over real HTTP."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from login_token_module.uia import MAX_SESSIONS_PER_USER
from tests.helpers import (
    GET_TOKEN,
    PASSWORD,
    PASSWORD_FLOWS,
    InProcessServer,
    Response,
    assert_challenge,
    challenge,
    count_password_checks,
    password_auth,
    rename_table,
    running,
    sleep,
    start_in_process,
    warnings_logged,
)

R0_PATH = "/_matrix/client/unstable/org.matrix.msc3882/login/token"
R1_PATH = "/_matrix/client/unstable/org.matrix.msc3882/login/get_token"
# Enough allowance to mint several tokens for one user within a test.
GENEROUS_RATELIMIT = {"per_second": 100, "burst_count": 100}


def assert_failed_stage(response: Response) -> str:
    """A UIA 401 after a failed or refused stage; returns its session."""
    assert response.code == 401, response
    body = response.json
    assert body["errcode"] == "M_FORBIDDEN", body
    assert isinstance(body["error"], str) and body["error"], body
    assert body["flows"] == PASSWORD_FLOWS
    assert body["completed"] == []
    session = body["session"]
    assert isinstance(session, str) and session
    return session


def assert_token(response: Response) -> str:
    assert response.code == 200, response
    token = response.json["login_token"]
    assert isinstance(token, str) and token
    assert isinstance(response.json["expires_in_ms"], int)
    return token


# -- the basic dance ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_empty_request_gets_a_challenge(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    response = await server.client.post(GET_TOKEN, {}, access)
    assert_challenge(response)
    assert "login_token" not in response.json
    assert await server.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_an_empty_auth_gets_a_challenge_whose_session_works(server: InProcessServer) -> None:
    """`"auth": {}` (no session, no stage) is asked again, and the session it is given completes."""
    access = await server.client.access_token("alice")
    response = await server.client.post(GET_TOKEN, {"auth": {}}, access)
    assert_challenge(response)
    assert_token(await server.client.post(GET_TOKEN, password_auth(response.json["session"]), access))


@pytest_twisted.ensureDeferred
async def test_a_one_shot_auth_naming_another_user_gets_a_session_that_works(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    other = password_auth(identifier={"type": "m.id.user", "user": "bob"})
    session = assert_failed_stage(await server.client.post(GET_TOKEN, other, access))
    assert_token(await server.client.post(GET_TOKEN, password_auth(session), access))


@pytest_twisted.ensureDeferred
async def test_each_challenge_has_a_fresh_session(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    assert await challenge(server, access) != await challenge(server, access)


@pytest_twisted.ensureDeferred
async def test_wrong_password_keeps_the_session_and_issues_nothing(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    session = await challenge(server, access)
    wrong = await server.client.post(GET_TOKEN, password_auth(session, "not the password"), access)
    assert assert_failed_stage(wrong) == session
    assert "login_token" not in wrong.json
    assert await server.module.store.count_tokens() == 0

    # The same session can still be completed with the right password.
    right = await server.client.post(GET_TOKEN, password_auth(session), access)
    assert_token(right)
    assert await server.module.store.count_tokens() == 1


@pytest_twisted.ensureDeferred
async def test_right_password_gives_a_token(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    session = await challenge(server, access)
    response = await server.client.post(GET_TOKEN, password_auth(session), access)
    token = assert_token(response)
    assert set(response.json) == {"login_token", "expires_in_ms"}
    assert response.json["expires_in_ms"] == 120_000
    assert await server.module.store.count_tokens() == 1
    login = await server.client.token_login(token)
    assert login.code == 200, login
    assert login.json["user_id"] == "@alice:test.local"


# -- always re-prompt --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_completed_session_never_gives_a_second_token(tmp_path: Path) -> None:
    async with running(tmp_path, {"ratelimit": GENEROUS_RATELIMIT}) as srv:
        access = await srv.client.access_token("alice")
        session = await challenge(srv, access)
        assert_token(await srv.client.post(GET_TOKEN, password_auth(session), access))

        for _ in range(2):
            replay = await srv.client.post(GET_TOKEN, password_auth(session), access)
            new_session = assert_failed_stage(replay)
            assert new_session != session
            assert "login_token" not in replay.json
        assert await srv.module.store.count_tokens() == 1


@pytest_twisted.ensureDeferred
async def test_completed_one_shot_session_is_spent_too(tmp_path: Path) -> None:
    async with running(tmp_path, {"ratelimit": GENEROUS_RATELIMIT}) as srv:
        access = await srv.client.access_token("alice")
        wrong = await srv.client.post(GET_TOKEN, password_auth(None, "nope"), access)
        session = assert_failed_stage(wrong)
        assert_token(await srv.client.post(GET_TOKEN, password_auth(session), access))
        replay = await srv.client.post(GET_TOKEN, password_auth(session), access)
        assert assert_failed_stage(replay) != session
        assert await srv.module.store.count_tokens() == 1


@pytest_twisted.ensureDeferred
async def test_the_fresh_session_offered_after_a_refused_one_completes(tmp_path: Path) -> None:
    """An unknown or spent session gets a 401 with a new session, for this user and this path."""
    async with running(tmp_path, {"ratelimit": GENEROUS_RATELIMIT}) as srv:
        access = await srv.client.access_token("alice")
        for path in (GET_TOKEN, R1_PATH):
            refused = await srv.client.post(path, password_auth("no such session"), access)
            fresh = assert_failed_stage(refused)
            assert_token(await srv.client.post(path, password_auth(fresh), access))


@pytest_twisted.ensureDeferred
async def test_session_is_bound_to_the_user(server: InProcessServer) -> None:
    await server.register("bob")
    alice = await server.client.access_token("alice")
    bob = await server.client.access_token("bob")
    session = await challenge(server, alice)

    stolen = await server.client.post(GET_TOKEN, password_auth(session), bob)
    assert assert_failed_stage(stolen) != session
    assert "login_token" not in stolen.json
    assert await server.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_session_is_bound_to_the_endpoint(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    session = await challenge(server, access, GET_TOKEN)

    elsewhere = await server.client.post(R1_PATH, password_auth(session), access)
    assert assert_failed_stage(elsewhere) != session
    assert "login_token" not in elsewhere.json
    assert await server.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_session_expires(tmp_path: Path) -> None:
    async with running(tmp_path, {"ui_auth_session_lifetime_ms": 1000}) as srv:
        access = await srv.client.access_token("alice")
        session = await challenge(srv, access)
        await sleep(1.2)
        late = await srv.client.post(GET_TOKEN, password_auth(session), access)
        assert assert_failed_stage(late) != session
        assert "login_token" not in late.json
        assert await srv.module.store.count_tokens() == 0

        # A fresh session, used promptly, still works.
        fresh = await challenge(srv, access)
        assert_token(await srv.client.post(GET_TOKEN, password_auth(fresh), access))


@pytest_twisted.ensureDeferred
async def test_a_session_lives_exactly_its_configured_lifetime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Driven by the module's clock: usable 5 ms before the end of its 10 s, gone at the end."""
    async with running(tmp_path, {"ui_auth_session_lifetime_ms": 10_000}) as srv:
        access = await srv.client.access_token("alice")
        start = srv.module._now()
        monkeypatch.setattr(srv.module, "_now", lambda: start)
        early, late = await challenge(srv, access), await challenge(srv, access)
        monkeypatch.setattr(srv.module, "_now", lambda: start + 9.995)
        assert_token(await srv.client.post(GET_TOKEN, password_auth(early), access))
        monkeypatch.setattr(srv.module, "_now", lambda: start + 10.0)
        assert assert_failed_stage(await srv.client.post(GET_TOKEN, password_auth(late), access)) != late


# -- the per-user cap on live sessions ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_full_cap_of_sessions_all_work(tmp_path: Path) -> None:
    async with running(tmp_path, {"ratelimit": GENEROUS_RATELIMIT}) as srv:
        access = await srv.client.access_token("alice")
        sessions = [await challenge(srv, access) for _ in range(MAX_SESSIONS_PER_USER)]
        # Oldest first: none of them was pushed out.
        for session in sessions:
            assert_token(await srv.client.post(GET_TOKEN, password_auth(session), access))
        assert await srv.module.store.count_tokens() == MAX_SESSIONS_PER_USER


@pytest_twisted.ensureDeferred
async def test_sessions_past_the_cap_push_out_the_oldest(tmp_path: Path) -> None:
    async with running(tmp_path, {"ratelimit": GENEROUS_RATELIMIT}) as srv:
        access = await srv.client.access_token("alice")
        sessions = [await challenge(srv, access) for _ in range(MAX_SESSIONS_PER_USER + 2)]
        # The newest ones are there, down to the oldest that still fits.
        assert_token(await srv.client.post(GET_TOKEN, password_auth(sessions[-1]), access))
        assert_token(await srv.client.post(GET_TOKEN, password_auth(sessions[2]), access))
        # The two before it were pushed out (each refusal opens a fresh session).
        for pushed_out in sessions[:2]:
            refused = await srv.client.post(GET_TOKEN, password_auth(pushed_out), access)
            assert assert_failed_stage(refused) not in sessions
            assert "login_token" not in refused.json
        assert await srv.module.store.count_tokens() == 2


@pytest_twisted.ensureDeferred
async def test_spending_a_session_does_not_lift_the_cap(tmp_path: Path) -> None:
    """After one session is spent, the user's other sessions still count against the cap."""
    async with running(tmp_path, {"ratelimit": GENEROUS_RATELIMIT}) as srv:
        access = await srv.client.access_token("alice")
        sessions = [await challenge(srv, access) for _ in range(MAX_SESSIONS_PER_USER)]
        assert_token(await srv.client.post(GET_TOKEN, password_auth(sessions[-1]), access))
        # Seven left; a full cap's worth of new ones pushes out all seven.
        newer = [await challenge(srv, access) for _ in range(MAX_SESSIONS_PER_USER)]
        assert_token(await srv.client.post(GET_TOKEN, password_auth(newer[0]), access))
        for old in sessions[:-1]:
            refused = await srv.client.post(GET_TOKEN, password_auth(old), access)
            assert assert_failed_stage(refused) not in sessions
            assert "login_token" not in refused.json
        assert await srv.module.store.count_tokens() == 2


# -- shapes of the auth dict ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_password_without_session_works_in_one_request(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    assert_token(await server.client.post(GET_TOKEN, password_auth(None), access))
    assert await server.module.store.count_tokens() == 1


@pytest_twisted.ensureDeferred
async def test_session_without_type_repeats_the_challenge(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    session = await challenge(server, access)
    again = await server.client.post(GET_TOKEN, {"auth": {"session": session}}, access)
    assert assert_challenge(again) == session
    # And the session is still good.
    assert_token(await server.client.post(GET_TOKEN, password_auth(session), access))


@pytest_twisted.ensureDeferred
async def test_unsupported_stage_is_unrecognized(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    session = await challenge(server, access)
    auth = {"auth": {"type": "m.login.dummy", "session": session}}
    response = await server.client.post(GET_TOKEN, auth, access)
    assert (response.code, response.json["errcode"]) == (400, "M_UNRECOGNIZED")
    assert "m.login.password" in response.json["error"]
    assert await server.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_missing_password_is_a_missing_param(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    session = await challenge(server, access)
    auth = {"auth": {"type": "m.login.password", "session": session}}
    response = await server.client.post(GET_TOKEN, auth, access)
    assert (response.code, response.json["errcode"]) == (400, "M_MISSING_PARAM")
    assert isinstance(response.json["error"], str) and response.json["error"]
    assert await server.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_auth_that_is_not_an_object_is_bad_json(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    for auth in ("m.login.password", ["m.login.password"], 1, True):
        response = await server.client.post(GET_TOKEN, {"auth": auth}, access)
        assert (response.code, response.json["errcode"]) == (400, "M_BAD_JSON"), (auth, response)
    assert await server.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_malformed_auth_fields_are_400_and_change_nothing(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    session = await challenge(server, access)
    malformed: list[tuple[dict[str, Any], str]] = [
        ({"session": 1}, "M_BAD_JSON"),
        ({"session": [session]}, "M_BAD_JSON"),
        ({"password": 1234}, "M_BAD_JSON"),
        ({"password": ["correct horse battery staple"]}, "M_BAD_JSON"),
        ({"identifier": "alice"}, "M_BAD_JSON"),
        ({"identifier": ["alice"]}, "M_BAD_JSON"),
        ({"identifier": {"type": "m.id.thirdparty", "medium": "email"}}, "M_INVALID_PARAM"),
        ({"identifier": {"user": "alice"}}, "M_INVALID_PARAM"),
        ({"identifier": {"type": "m.id.user", "user": 7}}, "M_BAD_JSON"),
        ({"user": 7}, "M_BAD_JSON"),
        ({"user": ["alice"]}, "M_BAD_JSON"),
    ]
    for fields, errcode in malformed:
        body = password_auth(session)
        body["auth"].update(fields)
        response = await server.client.post(GET_TOKEN, body, access)
        assert (response.code, response.json.get("errcode")) == (400, errcode), (fields, response)
        assert isinstance(response.json["error"], str) and response.json["error"], response
        assert "login_token" not in response.json
    assert await server.module.store.count_tokens() == 0
    # Nothing was spent: the same session still completes.
    assert_token(await server.client.post(GET_TOKEN, password_auth(session), access))


# Every 400 that get_token's checks of ``auth`` give, each with the errcode it must carry.
AUTH_400S: list[tuple[Any, str]] = [
    ("m.login.password", "M_BAD_JSON"),  # auth is not an object
    (["m.login.password"], "M_BAD_JSON"),
    (1, "M_BAD_JSON"),
    (True, "M_BAD_JSON"),
    ({"session": 1}, "M_BAD_JSON"),  # the session is not a string
    ({"type": "m.login.dummy", "password": PASSWORD}, "M_UNRECOGNIZED"),  # another stage
    ({"type": 7, "password": PASSWORD}, "M_UNRECOGNIZED"),
    ({"type": "m.login.password"}, "M_MISSING_PARAM"),  # no password
    ({"type": "m.login.password", "password": 1234}, "M_BAD_JSON"),  # the password is not a string
    (
        {"type": "m.login.password", "password": PASSWORD, "identifier": {"type": "m.id.phone"}},
        "M_INVALID_PARAM",
    ),
    ({"type": "m.login.password", "password": PASSWORD, "identifier": "alice"}, "M_BAD_JSON"),
    (
        {"type": "m.login.password", "password": PASSWORD, "identifier": {"type": "m.id.user", "user": 7}},
        "M_BAD_JSON",
    ),
    ({"type": "m.login.password", "password": PASSWORD, "user": ["alice"]}, "M_BAD_JSON"),
]


@pytest_twisted.ensureDeferred
async def test_every_400_of_the_auth_checks_says_why_in_a_string(server: InProcessServer) -> None:
    """A client shows ``error`` to its user: a 400 never answers with a null or empty one."""
    access = await server.client.access_token("alice")
    for auth, errcode in AUTH_400S:
        response = await server.client.post(GET_TOKEN, {"auth": auth}, access)
        assert (response.code, response.json.get("errcode")) == (400, errcode), (auth, response)
        error = response.json.get("error")
        assert isinstance(error, str) and error.strip(), (auth, response)
        assert "login_token" not in response.json, auth
    assert await server.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_identifier_naming_another_user_is_refused(server: InProcessServer) -> None:
    await server.register("bob")
    access = await server.client.access_token("alice")
    session = await challenge(server, access)
    for name in ("bob", "@bob:test.local"):
        identifier = {"type": "m.id.user", "user": name}
        # Alice's own password, but claiming to be bob: still no token.
        response = await server.client.post(GET_TOKEN, password_auth(session, identifier=identifier), access)
        assert assert_failed_stage(response) == session, name
        assert "login_token" not in response.json
    assert await server.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_legacy_user_field_naming_another_user_is_refused(server: InProcessServer) -> None:
    await server.register("bob")
    access = await server.client.access_token("alice")
    session = await challenge(server, access)
    for name in ("bob", "@bob:test.local", "@alice:elsewhere.example"):
        # Alice's own password, but the legacy field names someone else: no token.
        response = await server.client.post(GET_TOKEN, password_auth(session, user=name), access)
        assert assert_failed_stage(response) == session, name
        assert "login_token" not in response.json
    assert await server.module.store.count_tokens() == 0
    # Naming herself, the same session completes.
    assert_token(await server.client.post(GET_TOKEN, password_auth(session, user="Alice"), access))


@pytest_twisted.ensureDeferred
async def test_identifier_naming_oneself_works(tmp_path: Path) -> None:
    async with running(tmp_path, {"ratelimit": GENEROUS_RATELIMIT}) as srv:
        access = await srv.client.access_token("alice")
        for name in ("alice", "@alice:test.local", "Alice", "@Alice:test.local"):
            identifier = {"type": "m.id.user", "user": name}
            session = await challenge(srv, access)
            response = await srv.client.post(GET_TOKEN, password_auth(session, identifier=identifier), access)
            assert_token(response)
        assert await srv.module.store.count_tokens() == 4


@pytest_twisted.ensureDeferred
async def test_repeated_wrong_passwords_are_rate_limited(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    session = await challenge(server, access)
    for _ in range(3):
        wrong = await server.client.post(GET_TOKEN, password_auth(session, "guess"), access)
        assert assert_failed_stage(wrong) == session
    # Even the right password is turned away now, so the endpoint is no password oracle.
    limited = await server.client.post(GET_TOKEN, password_auth(session), access)
    assert (limited.code, limited.json["errcode"]) == (429, "M_LIMIT_EXCEEDED"), limited
    assert isinstance(limited.json["retry_after_ms"], int)
    assert "login_token" not in limited.json
    assert await server.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_without_ui_auth_an_empty_request_gives_a_token(tmp_path: Path) -> None:
    async with running(tmp_path, {"require_ui_auth": False}) as srv:
        access = await srv.client.access_token("alice")
        token = assert_token(await srv.client.post(GET_TOKEN, {}, access))
        assert (await srv.client.token_login(token)).code == 200


# -- the request body -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_malformed_json_is_not_json(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    response = await server.client.request(
        "POST",
        GET_TOKEN,
        raw_body=b'{"auth": ',
        access_token=access,
        headers={"Content-Type": "application/json"},
    )
    assert (response.code, response.json["errcode"]) == (400, "M_NOT_JSON")


@pytest_twisted.ensureDeferred
async def test_json_array_is_bad_json(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    response = await server.client.post(GET_TOKEN, [{"auth": {}}], access)
    assert (response.code, response.json["errcode"]) == (400, "M_BAD_JSON")


@pytest_twisted.ensureDeferred
async def test_empty_body_is_an_empty_object(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    response = await server.client.request("POST", GET_TOKEN, raw_body=b"", access_token=access)
    assert_challenge(response)


# -- the unstable paths ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_r0_path_also_answers_expires_in_seconds(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    response = await server.client.get_login_token(access, path=R0_PATH)
    token = assert_token(response)
    assert response.json["expires_in_ms"] == 120_000
    assert response.json["expires_in"] == 120
    assert isinstance(response.json["expires_in"], int)
    login = await server.client.token_login(token)
    assert (login.code, login.json["user_id"]) == (200, "@alice:test.local")


@pytest_twisted.ensureDeferred
async def test_r1_path_works(server: InProcessServer) -> None:
    access = await server.client.access_token("alice")
    response = await server.client.get_login_token(access, path=R1_PATH)
    token = assert_token(response)
    assert set(response.json) == {"login_token", "expires_in_ms"}
    login = await server.client.token_login(token)
    assert (login.code, login.json["user_id"]) == (200, "@alice:test.local")


@pytest_twisted.ensureDeferred
async def test_a_failed_password_allowance_that_cannot_be_given_back_still_issues_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The right password gives back the failed attempt reserved before bcrypt; if the store
    fails just then (workers sharing state: the allowances are in the database), the token is
    still issued, and the operator is told why, once."""
    store = {"type": "sqlite", "path": "tokens.db", "shared_state": True}
    async with running(tmp_path, {"store": store}) as srv:
        access = await srv.client.access_token("alice")
        session = (await srv.client.post(GET_TOKEN, {}, access)).json["session"]
        checks = count_password_checks(srv, monkeypatch)
        db = tmp_path / "tokens.db"

        checks.during_next = partial(
            threads.deferToThread, rename_table, db, "login_token_ratelimits", "ratelimits_away"
        )
        with caplog.at_level(logging.WARNING):
            answer = await srv.client.post(GET_TOKEN, password_auth(session), access)
        await threads.deferToThread(rename_table, db, "ratelimits_away", "login_token_ratelimits")
        assert answer.code == 200 and answer.json["login_token"], answer
        warned = warnings_logged(caplog)
        assert warned == [
            "Could not give back a failed-password allowance: no such table: login_token_ratelimits"
        ]


@pytest_twisted.ensureDeferred
async def test_a_password_check_that_could_not_run_gives_its_allowance_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed-password allowance is reserved before bcrypt runs; when the check itself
    fails (not a wrong password), it is the user's again: an outage is not a guess."""
    one_guess = {"failed_auth_ratelimit": {"per_second": 0.001, "burst_count": 1}}
    async with running(tmp_path, one_guess) as srv:
        access = await srv.client.access_token("alice")
        session = await challenge(srv, access)
        hasher = srv.hs.hasher
        real = hasher.check

        async def broken(password: str, password_hash: str | None) -> bool:
            raise RuntimeError("the password check could not run")

        monkeypatch.setattr(hasher, "check", broken)
        failed = await srv.client.post(GET_TOKEN, password_auth(session), access)
        assert (failed.code, failed.json.get("errcode")) == (500, "M_UNKNOWN"), failed
        monkeypatch.setattr(hasher, "check", real)
        # The one allowance is back: the right password now issues, not a 429.
        assert_token(await srv.client.post(GET_TOKEN, password_auth(await challenge(srv, access)), access))


@pytest_twisted.ensureDeferred
async def test_a_full_user_id_is_split_at_its_first_colon(tmp_path: Path) -> None:
    """A server name may carry a port (and capitals): only the localpart before the first
    colon is case-folded, so naming oneself in full still matches the requester."""
    srv = await start_in_process(
        tmp_path, {"store": {"type": "sqlite", "path": "tokens.db"}}, server_name="Test.Local:8448"
    )
    try:
        await srv.register("alice")
        access = await srv.client.access_token("alice")
        identifier = {"type": "m.id.user", "user": "@Alice:Test.Local:8448"}
        session = await challenge(srv, access)
        response = await srv.client.post(GET_TOKEN, password_auth(session, identifier=identifier), access)
        assert assert_token(response)
        login = await srv.client.token_login(response.json["login_token"])
        assert (login.code, login.json["user_id"]) == (200, "@alice:Test.Local:8448")
        # The host's own login splits a full user id the same way.
        again = await srv.client.password_login("@Alice:Test.Local:8448")
        assert (again.code, again.json.get("user_id")) == (200, "@alice:Test.Local:8448"), again
    finally:
        await srv.stop()
