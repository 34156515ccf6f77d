"""Signing in with m.login.token at POST /login, over real HTTP."""

from __future__ import annotations

import sqlite3
import string
import zlib
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest_twisted

from login_token_module.tokens import generate_token, is_well_formed
from tests.helpers import LOGIN, InProcessServer, Response, flip_last, recreate_token_table, running, sleep

WHOAMI = "/_matrix/client/v3/account/whoami"
# Enough allowance to mint several tokens for one user within a test.
GENEROUS_RATELIMIT = {"per_second": 100, "burst_count": 100}


def generous(
    tmp_path: Path, module_config: Mapping[str, Any]
) -> AbstractAsyncContextManager[InProcessServer]:
    """A server where alice and bob may mint as many tokens as a test needs."""
    return running(tmp_path, {"ratelimit": GENEROUS_RATELIMIT, **module_config}, users=("alice", "bob"))


@pytest_twisted.async_yield_fixture
async def srv(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """A server that lets alice and bob mint as many tokens as a test needs."""
    async with generous(tmp_path, {}) as started:
        yield started


async def new_token(server: InProcessServer, user: str = "alice") -> str:
    access = await server.client.access_token(user)
    response = await server.client.get_login_token(access)
    assert response.code == 200, response
    token = response.json["login_token"]
    assert isinstance(token, str)
    return token


def assert_forbidden(response: Response) -> None:
    assert response.code == 403, response
    assert response.json["errcode"] == "M_FORBIDDEN"
    assert isinstance(response.json["error"], str) and response.json["error"], response
    assert "access_token" not in response.json


def assert_logged_in(response: Response, user_id: str = "@alice:test.local") -> None:
    assert response.code == 200, response
    assert response.json["user_id"] == user_id
    assert isinstance(response.json["access_token"], str) and response.json["access_token"]
    assert isinstance(response.json["device_id"], str) and response.json["device_id"]


BASE62 = string.digits + string.ascii_letters


def with_checksum(body: str) -> str:
    """``body`` + ``_`` + its CRC-32 in six base62 digits, worked out here independently."""
    crc = zlib.crc32(body.encode("ascii"))
    digits = ""
    for _ in range(6):
        crc, digit = divmod(crc, 62)
        digits = BASE62[digit] + digits
    return f"{body}_{digits}"


# Each has a checksum that matches, so only the shape check can turn it away.
MISSHAPEN_WITH_GOOD_CHECKSUMS = [
    with_checksum("mlt_" + "a" * 42),  # one character short
    with_checksum("mlt_" + "a" * 44),  # one character long
    with_checksum("mlt_" + "a" * 20),
    with_checksum("mlt_" + "a" * 100),
    with_checksum("mlt_" + "a" * 42 + "-"),  # not base62
    with_checksum("mlt_" + "a" * 42 + "_"),
    with_checksum("mlt_" + "a" * 21 + "_" + "a" * 21),
    with_checksum("mlx_" + "a" * 43),  # another prefix
    with_checksum("MLT_" + "a" * 43),
    with_checksum("mlt" + "a" * 44),
    with_checksum("a" * 47),
    "mlt_" + "a" * 36 + "_" + "a" * 13,  # the right length, split at another underscore
]
# The right length, with no underscore but the prefix's: the part after the last
# underscore is 50 characters, and not ASCII (which secrets.compare_digest refuses
# with a TypeError, so only the length check keeps it from there).
SPLIT_AT_THE_PREFIX = "mlt_" + "\u00e9" * 50


def test_tokens_have_the_documented_shape() -> None:
    """mlt_ + 43 base62 characters + _ + the CRC-32 of what precedes it in 6 base62 characters."""
    seen = set()
    for _ in range(200):
        token = generate_token()
        assert len(token) == 54
        assert token.startswith("mlt_") and token[47] == "_"
        assert all(char in BASE62 for char in token[4:47] + token[48:])
        assert token == with_checksum(token[:47])
        assert is_well_formed(token)
        seen.add(token[4:47])
    assert len(seen) == 200
    # 256 random bits fill the body: its first character is not always the same.
    assert len({body[0] for body in seen}) > 1


def test_misshapen_tokens_are_not_well_formed() -> None:
    assert is_well_formed(with_checksum("mlt_" + "a" * 43))
    for candidate in MISSHAPEN_WITH_GOOD_CHECKSUMS:
        assert not is_well_formed(candidate), candidate
    token = generate_token()
    assert not is_well_formed(token[:47] + "-" + token[48:])
    assert not is_well_formed(token[:47] + "_" + token[48:-1])
    assert len(SPLIT_AT_THE_PREFIX) == len(token)
    assert not is_well_formed(SPLIT_AT_THE_PREFIX)


@pytest_twisted.ensureDeferred
async def test_token_login_succeeds(server: InProcessServer) -> None:
    first = await server.client.password_login("alice")
    token = await new_token(server)
    response = await server.client.token_login(token)
    assert_logged_in(response)
    assert response.json["device_id"] != first.json["device_id"]
    whoami = await server.client.get(WHOAMI, response.json["access_token"])
    assert whoami.code == 200, whoami
    assert whoami.json["user_id"] == "@alice:test.local"
    assert whoami.json["device_id"] == response.json["device_id"]
    assert await server.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_used_token_is_forbidden(server: InProcessServer) -> None:
    token = await new_token(server)
    assert_logged_in(await server.client.token_login(token))
    for _ in range(2):
        assert_forbidden(await server.client.token_login(token))


@pytest_twisted.ensureDeferred
async def test_bad_tokens_are_forbidden(server: InProcessServer) -> None:
    token = await new_token(server)
    bad: list[Any] = [
        generate_token(),  # well formed, never issued
        flip_last(token),  # wrong checksum
        token[:-1],  # truncated
        token[:20],
        token + "A",
        " " + token,
        token.upper(),
        SPLIT_AT_THE_PREFIX,
        "not a token",
        "",
        12345,
        0,
        None,
        [token],
        {"token": token},
        True,
    ]
    for candidate in bad:
        response = await server.client.token_login(candidate)
        assert response.code == 403, (candidate, response)
        assert_forbidden(response)
    # None of that spent or disturbed the real token.
    assert_logged_in(await server.client.token_login(token))


@pytest_twisted.ensureDeferred
async def test_malformed_tokens_are_refused_without_a_store_lookup(tmp_path: Path) -> None:
    """With the store's table gone, any lookup fails with a 500, so a 403 proves there was none."""
    async with running(tmp_path, {}) as server:
        assert await server.module.store.count_tokens() == 0  # the store's connection is open
        with sqlite3.connect(tmp_path / "tokens.db") as conn:
            conn.execute("DROP TABLE login_tokens")
        token = generate_token()
        candidates: list[Any] = [
            *MISSHAPEN_WITH_GOOD_CHECKSUMS,
            flip_last(token),
            token[:-1],
            token + "A",
            token.upper(),
            "",
            7,
            None,
        ]
        for candidate in candidates:
            assert_forbidden(await server.client.token_login(candidate))
        # A well-formed token does reach the store (and its failure is a 500).
        looked_up = await server.client.token_login(token)
        assert looked_up.code == 500, looked_up
        assert looked_up.json["errcode"] == "M_UNKNOWN"

        recreate_token_table(tmp_path / "tokens.db")
        assert_forbidden(await server.client.token_login(token))


@pytest_twisted.ensureDeferred
async def test_missing_token_is_a_missing_param(server: InProcessServer) -> None:
    response = await server.client.post(LOGIN, {"type": "m.login.token"})
    assert (response.code, response.json["errcode"]) == (400, "M_MISSING_PARAM")


@pytest_twisted.ensureDeferred
async def test_expired_token_is_forbidden(tmp_path: Path) -> None:
    async with generous(tmp_path, {"token_lifetime_ms": 300}) as server:
        stale = await new_token(server)
        await sleep(0.5)
        assert_forbidden(await server.client.token_login(stale))
        # A fresh one, used promptly, works: the lifetime is what refused the first.
        assert_logged_in(await server.client.token_login(await new_token(server)))


@pytest_twisted.ensureDeferred
async def test_identifier_beside_the_token_does_not_break_it(srv: InProcessServer) -> None:
    identifiers: list[Any] = [
        {"type": "m.id.user", "user": "alice"},
        {"type": "m.id.user", "user": "@alice:test.local"},
        {"type": "m.id.user", "user": "bob"},  # another user: the token decides
        {"type": "m.id.user", "user": "@carol:elsewhere.example"},
        {"type": "m.id.user", "user": "not a valid localpart!"},
        {"type": "m.id.thirdparty", "medium": "email", "address": "a@example.com"},
        {"type": "m.id.user"},
        {"type": "m.id.user", "user": 7},
        {"type": "m.id.user", "user": ""},
        {},
        "alice",
        ["alice"],
        42,
    ]
    for identifier in identifiers:
        token = await new_token(srv)
        response = await srv.client.token_login(token, identifier=identifier)
        assert response.code == 200, (identifier, response)
        assert_logged_in(response)


@pytest_twisted.ensureDeferred
async def test_legacy_user_field_does_not_break_it(srv: InProcessServer) -> None:
    for user in ("bob", "alice", 3):
        response = await srv.client.token_login(await new_token(srv), user=user)
        assert_logged_in(response)


@pytest_twisted.ensureDeferred
async def test_device_fields_beside_the_token(srv: InProcessServer) -> None:
    token = await new_token(srv)
    response = await srv.client.token_login(
        token, device_id="MYNEWPHONE", initial_device_display_name="Alice's phone"
    )
    assert_logged_in(response)
    assert response.json["device_id"] == "MYNEWPHONE"
    whoami = await srv.client.get(WHOAMI, response.json["access_token"])
    assert whoami.json["device_id"] == "MYNEWPHONE"

    display_only = await srv.client.token_login(await new_token(srv), initial_device_display_name="Laptop")
    assert_logged_in(display_only)


@pytest_twisted.ensureDeferred
async def test_invalid_device_fields_do_not_spend_the_token(srv: InProcessServer) -> None:
    token = await new_token(srv)
    invalid: list[dict[str, Any]] = [
        {"device_id": 12345},
        {"device_id": "D" * 300},
        {"device_id": ""},
        {"device_id": ["ABC"]},
        {"initial_device_display_name": 7},
        {"initial_device_display_name": "n" * 300},
    ]
    for fields in invalid:
        response = await srv.client.token_login(token, **fields)
        assert (response.code, response.json["errcode"]) == (400, "M_INVALID_PARAM"), (fields, response)
        assert await srv.module.store.count_tokens() == 1
    assert_logged_in(await srv.client.token_login(token))
    assert await srv.module.store.count_tokens() == 0


@pytest_twisted.ensureDeferred
async def test_token_login_through_the_r0_path(server: InProcessServer) -> None:
    token = await new_token(server)
    response = await server.client.post("/_matrix/client/r0/login", {"type": "m.login.token", "token": token})
    assert_logged_in(response)
    assert_forbidden(await server.client.token_login(token))


@pytest_twisted.ensureDeferred
async def test_token_logs_in_as_the_user_it_was_issued_to(server: InProcessServer) -> None:
    await server.register("bob")
    alice_token = await new_token(server, "alice")
    bob_token = await new_token(server, "bob")
    bob_login = await server.client.token_login(bob_token)
    assert_logged_in(bob_login, "@bob:test.local")
    alice_login = await server.client.token_login(alice_token)
    assert_logged_in(alice_login, "@alice:test.local")
    whoami = await server.client.get(WHOAMI, bob_login.json["access_token"])
    assert whoami.json["user_id"] == "@bob:test.local"


@pytest_twisted.ensureDeferred
async def test_login_flows_list_the_token_type(server: InProcessServer) -> None:
    response = await server.client.get(LOGIN)
    assert response.code == 200, response
    flows = response.json["flows"]
    assert {"type": "m.login.token", "get_login_token": True} in flows
    assert {"type": "m.login.password"} in flows
