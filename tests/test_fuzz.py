"""Property tests: whatever a client sends, the answer is a Matrix error, never a
crash, and a refused request never spends or issues a token.

Runs against a child server (`login-token-module serve`) with Hypothesis
generating the bodies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from login_token_module.pairing import APPROVE_PATH, DENY_PATH, PAGE_PATH, POLL_PATH, START_PATH
from login_token_module.tokens import generate_token
from tests.helpers import (
    GET_TOKEN,
    LOGIN,
    PASSWORD,
    ChildServer,
    call,
    cli,
    homeserver_yaml,
    start_child,
    sync_call,
    write_config,
)

# FUZZ_EXAMPLES=5000 scripts/test tests/test_fuzz.py for a longer hunt.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
# Values aimed at the fields the server reads, mixed with anything at all.
login_types = st.sampled_from(["m.login.password", "m.login.token", "m.login.sso", ""]) | json_values
identifiers = (
    st.fixed_dictionaries(
        {"type": st.sampled_from(["m.id.user", "m.id.phone"]) | json_values, "user": json_values}
    )
    | json_values
)
field_values = st.text(min_size=1, max_size=20) | json_values
login_bodies = st.fixed_dictionaries(
    {},
    optional={
        "type": login_types,
        "identifier": identifiers,
        "user": json_values,
        "password": json_values,
        "token": json_values,
        "device_id": field_values,
        "initial_device_display_name": field_values,
        "refresh_token": json_values,
    },
)
auth_dicts = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["m.login.password", "m.login.dummy"]) | json_values,
        "session": json_values,
        "password": json_values,
        "identifier": identifiers,
        "user": json_values,
    },
)
get_token_bodies = st.fixed_dictionaries({}, optional={"auth": auth_dicts | json_values}) | json_values
user_codes = st.text(alphabet="BCDFGHJKLMNPQRSTVWXZbcdf-", max_size=12) | json_values
pair_start_bodies = (
    st.fixed_dictionaries({}, optional={"initial_device_display_name": field_values}) | json_values
)
pair_poll_bodies = st.fixed_dictionaries({}, optional={"pairing_id": field_values}) | json_values
pair_approve_bodies = (
    st.fixed_dictionaries({}, optional={"user_code": user_codes, "auth": auth_dicts | json_values})
    | json_values
)


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChildServer, str]]:
    folder = tmp_path_factory.mktemp("fuzz")
    raw = homeserver_yaml(
        folder,
        {
            "store": {"type": "sqlite", "path": "tokens.db"},
            "ratelimit": {"per_second": 10_000, "burst_count": 10_000},
            "failed_auth_ratelimit": {"per_second": 10_000, "burst_count": 10_000},
            "pairing": {"enabled": True, "interval_ms": 10},
        },
    )
    config = write_config(folder, raw)
    assert cli("register-user", "-c", str(config), "alice", stdin=PASSWORD).returncode == 0
    server = start_child(config)
    code, body = sync_call(
        server.base_url,
        "POST",
        LOGIN,
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "alice"},
            "password": PASSWORD,
        },
    )
    assert code == 200, body
    yield server, str(body["access_token"])
    assert server.terminate() == 0
    assert "Traceback" not in server.log(), server.log()


def assert_matrix_error(code: int, body: Any, allowed: set[int]) -> None:
    assert code in allowed, (code, body)
    assert isinstance(body, dict)
    if code == 401 and "flows" in body:  # a UIA challenge may carry no errcode
        assert isinstance(body["session"], str)
        return
    assert isinstance(body.get("errcode"), str) and body["errcode"].startswith("M_"), body
    assert isinstance(body.get("error"), str), body


def mint(server: ChildServer, access_token: str) -> str:
    code, challenge = sync_call(server.base_url, "POST", GET_TOKEN, {}, access_token)
    assert code == 401, challenge
    auth = {"type": "m.login.password", "password": PASSWORD, "session": challenge["session"]}
    code, issued = sync_call(server.base_url, "POST", GET_TOKEN, {"auth": auth}, access_token)
    assert code == 200, issued
    return str(issued["login_token"])


@FUZZ_SETTINGS
@given(body=login_bodies | json_values)
def test_any_login_body_gets_a_matrix_error(child: tuple[ChildServer, str], body: Any) -> None:
    server, _ = child
    code, answer = sync_call(server.base_url, "POST", LOGIN, body)
    assert_matrix_error(code, answer, {400, 403})


@FUZZ_SETTINGS
@given(body=get_token_bodies)
def test_any_get_token_body_without_the_password_issues_nothing(
    child: tuple[ChildServer, str], body: Any
) -> None:
    server, access_token = child
    code, answer = sync_call(server.base_url, "POST", GET_TOKEN, body, access_token)
    assert_matrix_error(code, answer, {400, 401})
    assert "login_token" not in answer


@FUZZ_SETTINGS
@given(data=st.binary(max_size=200))
def test_any_bytes_get_a_matrix_error(child: tuple[ChildServer, str], data: bytes) -> None:
    server, access_token = child
    code, answer = sync_call(server.base_url, "POST", LOGIN, raw_body=data)
    assert_matrix_error(code, answer, {400, 403})
    code, answer = sync_call(server.base_url, "POST", GET_TOKEN, access_token=access_token, raw_body=data)
    assert_matrix_error(code, answer, {400, 401})


@settings(FUZZ_SETTINGS, max_examples=max(1, EXAMPLES // 3))
@given(
    extra=st.fixed_dictionaries(
        {},
        optional={
            "device_id": field_values,
            "initial_device_display_name": field_values,
            "identifier": identifiers,
            "user": json_values,
            "password": json_values,
        },
    )
)
def test_a_refused_token_login_leaves_the_token_usable(
    child: tuple[ChildServer, str], extra: dict[str, Any]
) -> None:
    server, access_token = child
    token = mint(server, access_token)
    code, answer = sync_call(
        server.base_url, "POST", LOGIN, {**extra, "type": "m.login.token", "token": token}
    )
    if code == 200:
        assert answer["user_id"] == "@alice:test.local"
    else:
        assert_matrix_error(code, answer, {400})
        code, answer = sync_call(server.base_url, "POST", LOGIN, {"type": "m.login.token", "token": token})
        assert code == 200, answer
    # Spent either way now.
    code, answer = sync_call(server.base_url, "POST", LOGIN, {"type": "m.login.token", "token": token})
    assert (code, answer["errcode"]) == (403, "M_FORBIDDEN")


@FUZZ_SETTINGS
@given(token=st.text(max_size=80) | st.just(generate_token()))
def test_any_token_string_that_was_never_issued_is_403(child: tuple[ChildServer, str], token: str) -> None:
    server, _ = child
    code, answer = sync_call(server.base_url, "POST", LOGIN, {"type": "m.login.token", "token": token})
    if re.search("[\x00\ud800-\udfff]", token):
        # NUL and lone surrogates are refused at the door, before any token is looked at.
        assert (code, answer["errcode"]) == (400, "M_BAD_JSON")
    else:
        assert (code, answer["errcode"]) == (403, "M_FORBIDDEN")


@FUZZ_SETTINGS
@given(start=pair_start_bodies, poll=pair_poll_bodies, decide=pair_approve_bodies)
def test_any_pairing_body_gets_a_pairing_or_a_matrix_error_and_never_a_token(
    child: tuple[ChildServer, str], start: Any, poll: Any, decide: Any
) -> None:
    server, access_token = child
    code, answer = sync_call(server.base_url, "POST", START_PATH, start)
    if code == 200:
        assert isinstance(answer["pairing_id"], str) and re.fullmatch(
            r"[A-Z]{4}-[A-Z]{4}", answer["user_code"]
        )
    else:
        assert_matrix_error(code, answer, {400, 429})
    code, answer = sync_call(server.base_url, "POST", POLL_PATH, poll)
    assert_matrix_error(code, answer, {400, 404})
    for path in (APPROVE_PATH, DENY_PATH):
        code, answer = sync_call(server.base_url, "POST", path, decide, access_token)
        assert_matrix_error(code, answer, {400, 401, 404, 429})
        assert "login_token" not in answer


@FUZZ_SETTINGS
@given(data=st.binary(max_size=200))
def test_any_bytes_to_the_pairing_paths_get_a_matrix_error(
    child: tuple[ChildServer, str], data: bytes
) -> None:
    server, access_token = child
    for path in (START_PATH, POLL_PATH):
        code, answer = sync_call(server.base_url, "POST", path, raw_body=data)
        if code != 200:  # an empty body is a start without a name
            assert_matrix_error(code, answer, {400, 404, 429})
        else:
            assert path == START_PATH and not data.strip()
    for path in (APPROVE_PATH, DENY_PATH):
        code, answer = sync_call(server.base_url, "POST", path, access_token=access_token, raw_body=data)
        assert_matrix_error(code, answer, {400, 401, 404, 429})
    # The approval page answers a page, never a 500: without its form token, 403 or 400.
    page = call(server.base_url, "POST", PAGE_PATH, raw_body=data)
    assert page.code in {400, 403}, page
