"""The reference host's own endpoints and HTTP behaviour, over real HTTP."""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import pytest_twisted
from prometheus_client import REGISTRY
from twisted.internet import threads
from twisted.web.resource import Resource
from twisted.web.server import Site

from login_token_module.host.resources import new_device_id
from login_token_module.http import OTHER
from tests.helpers import (
    GET_TOKEN,
    LOGIN,
    PASSWORD,
    REACTOR,
    HttpClient,
    InProcessServer,
    Response,
    homeserver_yaml,
    running,
    sleep,
    start_in_process,
)
from tests.probe_module import (
    FAULTY_MODULE,
    PROBE_LOGIN,
    PROBE_MODULE,
    FaultyModule,
    FaultyResource,
    ProbeModule,
)

VERSIONS = "/_matrix/client/versions"
CAPABILITIES = "/_matrix/client/v3/capabilities"
WHOAMI = "/_matrix/client/v3/account/whoami"
LOGOUT = "/_matrix/client/v3/logout"
LOGOUT_ALL = "/_matrix/client/v3/logout/all"


def _blocking_post(
    base_url: str, path: str, chunks: list[bytes], *, chunked: bool
) -> tuple[int, dict[str, Any]]:
    """POST with http.client: a plain Content-Length body, or Transfer-Encoding: chunked."""
    parts = urlsplit(base_url)
    assert parts.hostname is not None and parts.port is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if chunked:
            body: Iterator[bytes] | bytes = iter(chunks)
            conn.request("POST", path, body=body, headers=headers, encode_chunked=True)
        else:
            conn.request("POST", path, body=b"".join(chunks), headers=headers)
        response = conn.getresponse()
        payload = response.read()
        if chunked:
            assert response.status != 411
        return response.status, json.loads(payload)
    finally:
        conn.close()


async def raw_post(
    server: InProcessServer, path: str, chunks: list[bytes], *, chunked: bool
) -> tuple[int, dict[str, Any]]:
    result: tuple[int, dict[str, Any]] = await threads.deferToThread(
        _blocking_post, server.client.base_url, path, chunks, chunked=chunked
    )
    return result


def assert_error(response: Response, code: int, errcode: str) -> None:
    assert (response.code, response.json.get("errcode")) == (code, errcode), response
    assert isinstance(response.json.get("error"), str) and response.json["error"], response


# -- discovery ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_versions_advertise_v1_7_and_msc3882(server: InProcessServer) -> None:
    response = await server.client.get(VERSIONS)
    assert response.code == 200
    assert "v1.7" in response.json["versions"]
    features = response.json["unstable_features"]
    assert features["org.matrix.msc3882"] is True
    assert features["org.matrix.msc3882.r1"] is True
    assert response.headers["content-type"] == "application/json"


@pytest_twisted.ensureDeferred
async def test_capabilities_need_auth_and_offer_get_login_token(server: InProcessServer) -> None:
    anonymous = await server.client.get(CAPABILITIES)
    assert_error(anonymous, 401, "M_MISSING_TOKEN")
    token = await server.client.access_token("alice")
    response = await server.client.get(CAPABILITIES, token)
    assert response.code == 200
    capabilities = response.json["capabilities"]
    assert capabilities["m.get_login_token"] == {"enabled": True}
    # MSC3882's unstable name, for clients that predate spec v1.7.
    assert capabilities["org.matrix.msc3882.get_login_token"] == {"enabled": True}
    # The host's own, none of which this server supports.
    for name in ("m.change_password", "m.set_displayname", "m.set_avatar_url", "m.3pid_changes"):
        assert capabilities[name] == {"enabled": False}, name
    assert len(capabilities) == 6, capabilities


@pytest_twisted.ensureDeferred
async def test_login_flows_offer_password_and_token_with_get_login_token(server: InProcessServer) -> None:
    response = await server.client.get(LOGIN)
    assert response.code == 200
    flows = response.json["flows"]
    assert {"type": "m.login.password"} in flows
    assert {"type": "m.login.token", "get_login_token": True} in flows


# -- errors, methods and CORS ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_paths_are_404_unrecognized(server: InProcessServer) -> None:
    for path in (
        "/",
        "/_matrix/client/v3/nonexistent",
        "/_matrix/client/v3/login/extra",
        "/_matrix/client/v1/login/get_token/more",
        "/elsewhere/entirely",
    ):
        response = await server.client.get(path)
        assert_error(response, 404, "M_UNRECOGNIZED")
        assert response.headers["content-type"] == "application/json"


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow(server: InProcessServer) -> None:
    """Allow lists the methods served, HEAD wherever GET is, and OPTIONS (CORS) everywhere."""
    cases = [
        ("GET", LOGOUT, "POST, OPTIONS"),
        ("DELETE", LOGIN, "GET, POST, HEAD, OPTIONS"),
        ("PUT", VERSIONS, "GET, HEAD, OPTIONS"),
        ("GET", GET_TOKEN, "POST, OPTIONS"),
        ("HEAD", GET_TOKEN, "POST, OPTIONS"),
    ]
    for method, path, allowed in cases:
        response = await server.client.request(method, path)
        assert response.code == 405, (method, path, response)
        assert response.headers["allow"] == allowed, (path, response.headers)
        if method != "HEAD":
            assert response.json == {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}


def _blocking_exchange(base_url: str, request: bytes) -> tuple[bytes, bool]:
    """Send ``request`` as written: every byte the server sent back, and whether it closed
    the connection (rather than keeping it open, silent for 5 s, for another request)."""
    parts = urlsplit(base_url)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
        return received, True


async def exchange(server: InProcessServer, request: bytes) -> bytes:
    """The server's whole answer to ``request`` (one that asks to close the connection)."""
    received, _ = await threads.deferToThread(_blocking_exchange, server.client.base_url, request)
    return received


def closing_request(method: bytes, path: str, headers: str = "") -> bytes:
    """A request as a client writes it, asking the server to close the connection after."""
    return method + f" {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode()


@pytest_twisted.ensureDeferred
async def test_head_is_served_wherever_get_is_with_the_same_headers_and_no_body(
    server: InProcessServer,
) -> None:
    answers = []
    for method in (b"GET", b"HEAD"):
        received = await exchange(server, closing_request(method, VERSIONS))
        answers.append(split_response(received))
    (get_status, get_headers, get_body), (head_status, head_headers, head_body) = answers
    assert get_status == head_status == b"HTTP/1.1 200 OK"
    assert head_body == b"" and json.loads(get_body)["versions"]
    assert head_headers["content-length"] == get_headers["content-length"] == str(len(get_body))
    assert head_headers["content-type"] == "application/json"


@pytest_twisted.ensureDeferred
async def test_a_method_spelled_otherwise_is_405_and_one_not_ascii_never_reaches_a_resource(
    server: InProcessServer,
) -> None:
    """Methods are case-sensitive (gEt is not GET). Bytes that are no HTTP token at all
    get Twisted's bare 400 before any resource runs, in both hosts: that is why the
    resources' method decoding never meets a byte it cannot decode."""
    for method, answer in (
        (b"gEt", b"HTTP/1.1 405 Method Not Allowed"),
        (b"G\xc3\xa9T", b"HTTP/1.1 400 Bad Request"),
        (b"\xff", b"HTTP/1.1 400 Bad Request"),
    ):
        received = await exchange(server, closing_request(method, VERSIONS))
        status, headers, body = split_response(received)
        assert status == answer, (method, received)
        if answer.startswith(b"HTTP/1.1 405"):
            assert headers["allow"] == "GET, HEAD, OPTIONS"
            assert json.loads(body) == {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}
        else:
            assert body == b"", received
    assert (await server.client.get(VERSIONS)).code == 200


@pytest_twisted.ensureDeferred
async def test_options_on_any_path_is_200_with_cors(server: InProcessServer) -> None:
    for path in (LOGIN, GET_TOKEN, VERSIONS, LOGOUT_ALL, f"{LOGIN}/extra", "/nowhere/at/all", "/"):
        response = await server.client.request("OPTIONS", path)
        assert response.code == 200, (path, response)
        assert response.body == {}, (path, response)  # an empty JSON object
        assert response.headers["access-control-allow-origin"] == "*"
        assert "Authorization" in response.headers["access-control-allow-headers"]


@pytest_twisted.ensureDeferred
async def test_cors_headers_on_ordinary_responses(server: InProcessServer) -> None:
    responses = [
        await server.client.get(VERSIONS),
        await server.client.get("/nowhere"),
        await server.client.get(WHOAMI),
        await server.client.password_login("alice"),
        await server.client.password_login("alice", "wrong"),
    ]
    assert [r.code for r in responses] == [200, 404, 401, 200, 403]
    for response in responses:
        assert response.headers["access-control-allow-origin"] == "*"


@pytest_twisted.ensureDeferred
async def test_malformed_json_is_400_not_json(server: InProcessServer) -> None:
    for body in (b"{not json", b"\xff\xfe", b'{"type": NaN}', b""):
        response = await server.client.request("POST", LOGIN, raw_body=body)
        assert_error(response, 400, "M_NOT_JSON")


@pytest_twisted.ensureDeferred
async def test_a_number_too_large_for_a_double_is_400_not_json(server: InProcessServer) -> None:
    """1e400 parses to infinity, which no JSON can carry back out: refused as not JSON."""
    for number in (b"1e400", b"-1e400", b"1.5e400"):
        body = b'{"type": "m.login.password", "user": "alice", "device_id": %s}' % number
        response = await server.client.request("POST", LOGIN, raw_body=body)
        assert_error(response, 400, "M_NOT_JSON")
        assert response.json["error"] == "Content not JSON"
    # A number that fits is parsed as the number it is: a device id that is not a string.
    finite = {"type": "m.login.password", "user": "alice", "password": PASSWORD, "device_id": 2.5}
    response = await server.client.post(LOGIN, finite)
    assert_error(response, 400, "M_INVALID_PARAM")
    assert response.json["error"].startswith("'device_id' must be a non-empty string"), response


@pytest_twisted.ensureDeferred
async def test_json_that_is_not_an_object_is_400_bad_json(server: InProcessServer) -> None:
    for body in ([1, 2], "a string", 42, None):
        response = await server.client.request("POST", LOGIN, raw_body=json.dumps(body).encode())
        assert_error(response, 400, "M_BAD_JSON")
    token = await server.client.access_token("alice")
    response = await server.client.request("POST", GET_TOKEN, raw_body=b"[]", access_token=token)
    assert_error(response, 400, "M_BAD_JSON")


def _padded_login(size: int) -> list[bytes]:
    """A password login body of exactly ``size`` bytes, split into a few chunks."""
    head = b'{"type": "m.login.password", "user": "alice", "password": "nope", "pad": "'
    tail = b'"}'
    body = head + b"x" * (size - len(head) - len(tail)) + tail
    assert len(body) == size
    return [body[i : i + 8192] for i in range(0, size, 8192)]


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413_with_content_length(server: InProcessServer) -> None:
    status, body = await raw_post(server, LOGIN, _padded_login(65536 + 1), chunked=False)
    assert (status, body["errcode"]) == (413, "M_TOO_LARGE")
    # Exactly at the limit is still read and judged (a wrong password here).
    status, body = await raw_post(server, LOGIN, _padded_login(65536), chunked=False)
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")


@pytest_twisted.ensureDeferred
async def test_oversized_chunked_body_is_413(server: InProcessServer) -> None:
    status, body = await raw_post(server, LOGIN, _padded_login(65536 + 1), chunked=True)
    assert (status, body["errcode"]) == (413, "M_TOO_LARGE")
    status, body = await raw_post(server, LOGIN, _padded_login(65536), chunked=True)
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")


@pytest_twisted.ensureDeferred
async def test_max_request_body_size_is_configurable(tmp_path: Path) -> None:
    srv = await start_in_process(tmp_path, max_request_body_size=2048)
    try:
        for chunked in (False, True):
            status, body = await raw_post(srv, LOGIN, _padded_login(2049), chunked=chunked)
            assert (status, body["errcode"]) == (413, "M_TOO_LARGE")
            status, body = await raw_post(srv, LOGIN, _padded_login(2048), chunked=chunked)
            assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    finally:
        await srv.stop()


# -- password login ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_password_login_by_localpart_user_id_and_legacy_user(server: InProcessServer) -> None:
    by_localpart = await server.client.password_login("alice")
    by_user_id = await server.client.password_login("@alice:test.local")
    by_capitals = await server.client.password_login("Alice")
    legacy = await server.client.post(
        LOGIN, {"type": "m.login.password", "user": "alice", "password": PASSWORD}
    )
    legacy_full = await server.client.post(
        LOGIN, {"type": "m.login.password", "user": "@alice:test.local", "password": PASSWORD}
    )
    responses = [by_localpart, by_user_id, by_capitals, legacy, legacy_full]
    for response in responses:
        assert response.code == 200, response
        assert response.json["user_id"] == "@alice:test.local"
        assert response.json["home_server"] == "test.local"
        assert response.json["access_token"].startswith("mat_")
    # Each login is its own device with its own working access token.
    assert len({r.json["device_id"] for r in responses}) == len(responses)
    assert len({r.json["access_token"] for r in responses}) == len(responses)
    for response in responses:
        whoami = await server.client.get(WHOAMI, response.json["access_token"])
        assert whoami.json["device_id"] == response.json["device_id"]


@pytest_twisted.ensureDeferred
async def test_wrong_password_and_unknown_user_are_403(server: InProcessServer) -> None:
    cases = [
        await server.client.password_login("alice", "not the password"),
        await server.client.password_login("alice", ""),
        await server.client.password_login("mallory"),
        await server.client.password_login("@alice:other.server"),
        await server.client.password_login("no spaces allowed"),
        await server.client.post(LOGIN, {"type": "m.login.password", "user": "bob", "password": PASSWORD}),
    ]
    for response in cases:
        assert_error(response, 403, "M_FORBIDDEN")


@pytest_twisted.ensureDeferred
async def test_a_device_id_or_name_holding_control_characters_is_400_and_makes_no_device(
    tmp_path: Path,
) -> None:
    """A device id or display name ends up in logs and other clients' device lists: one that
    holds a control character (an escape sequence, a line break, DEL) is refused by name."""
    async with running(tmp_path, {}) as srv:
        for key in ("device_id", "initial_device_display_name"):
            for value in ("\x1b[31mred", "two\nlines", "tab\there", "del\x7f", "c1\x85"):
                response = await srv.client.password_login("alice", **{key: value})
                assert_error(response, 400, "M_INVALID_PARAM")
                assert response.json["error"] == f"'{key}' must not hold control characters", response
        # Other unusual but printable characters are fine.
        fine = await srv.client.password_login(
            "alice", device_id="TV-Ünïcode", initial_device_display_name="📺"
        )
        assert fine.code == 200, fine
        with sqlite3.connect(tmp_path / "homeserver.db") as db:
            assert db.execute("SELECT device_id, display_name FROM devices").fetchall() == [
                ("TV-Ünïcode", "📺")
            ]


@pytest_twisted.ensureDeferred
async def test_missing_password_is_400_missing_param(server: InProcessServer) -> None:
    no_password = await server.client.post(
        LOGIN, {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}}
    )
    assert_error(no_password, 400, "M_MISSING_PARAM")
    no_user = await server.client.post(LOGIN, {"type": "m.login.password", "password": PASSWORD})
    assert_error(no_user, 400, "M_MISSING_PARAM")
    no_type = await server.client.post(LOGIN, {"user": "alice", "password": PASSWORD})
    assert_error(no_type, 400, "M_MISSING_PARAM")


@pytest_twisted.ensureDeferred
async def test_unknown_login_type_is_400_unknown(server: InProcessServer) -> None:
    for login_type in ("m.login.sso", "m.login.magic", "M.LOGIN.PASSWORD"):
        response = await server.client.post(
            LOGIN, {"type": login_type, "user": "alice", "password": PASSWORD}
        )
        assert_error(response, 400, "M_UNKNOWN")


@pytest_twisted.ensureDeferred
async def test_login_with_device_id_reuses_it_and_replaces_its_token(server: InProcessServer) -> None:
    first = await server.client.password_login("alice", device_id="PHONE")
    other = await server.client.password_login("alice", device_id="LAPTOP")
    second = await server.client.password_login("alice", device_id="PHONE")
    assert [r.code for r in (first, other, second)] == [200, 200, 200]
    assert first.json["device_id"] == second.json["device_id"] == "PHONE"
    assert first.json["access_token"] != second.json["access_token"]

    old = await server.client.get(WHOAMI, first.json["access_token"])
    assert_error(old, 401, "M_UNKNOWN_TOKEN")
    new = await server.client.get(WHOAMI, second.json["access_token"])
    assert (new.code, new.json["device_id"]) == (200, "PHONE")
    # Another device's token is untouched.
    laptop = await server.client.get(WHOAMI, other.json["access_token"])
    assert (laptop.code, laptop.json["device_id"]) == (200, "LAPTOP")


# -- access tokens -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_whoami_returns_user_and_device(server: InProcessServer) -> None:
    login = await server.client.password_login("alice", device_id="DESK")
    response = await server.client.get(WHOAMI, login.json["access_token"])
    assert response.code == 200
    assert response.json["user_id"] == "@alice:test.local"
    assert response.json["device_id"] == "DESK"
    assert response.json["is_guest"] is False
    unknown = await server.client.get(WHOAMI, "mat_unknown")
    assert_error(unknown, 401, "M_UNKNOWN_TOKEN")
    assert unknown.json["soft_logout"] is False


@pytest_twisted.ensureDeferred
async def test_logout_invalidates_only_that_token(server: InProcessServer) -> None:
    first = await server.client.access_token("alice")
    second = await server.client.access_token("alice")
    response = await server.client.post(LOGOUT, {}, first)
    assert (response.code, response.json) == (200, {})
    assert_error(await server.client.get(WHOAMI, first), 401, "M_UNKNOWN_TOKEN")
    assert_error(await server.client.post(LOGOUT, {}, first), 401, "M_UNKNOWN_TOKEN")
    assert (await server.client.get(WHOAMI, second)).code == 200


@pytest_twisted.ensureDeferred
async def test_logout_all_invalidates_every_token_of_the_user(server: InProcessServer) -> None:
    await server.register("bob")
    alices = [await server.client.access_token("alice") for _ in range(3)]
    bob = await server.client.access_token("bob")
    response = await server.client.post(LOGOUT_ALL, {}, alices[0])
    assert response.code == 200
    for token in alices:
        assert_error(await server.client.get(WHOAMI, token), 401, "M_UNKNOWN_TOKEN")
    still = await server.client.get(WHOAMI, bob)
    assert (still.code, still.json["user_id"]) == (200, "@bob:test.local")
    # Alice can sign in again afterwards.
    assert (await server.client.password_login("alice")).code == 200


@pytest_twisted.ensureDeferred
async def test_access_token_query_parameter_works(server: InProcessServer) -> None:
    token = await server.client.access_token("alice")
    response = await server.client.get(f"{WHOAMI}?access_token={quote(token)}")
    assert (response.code, response.json["user_id"]) == (200, "@alice:test.local")
    capabilities = await server.client.get(f"{CAPABILITIES}?access_token={quote(token)}")
    assert capabilities.code == 200
    issued = await server.client.post(f"{GET_TOKEN}?access_token={quote(token)}", {})
    assert issued.code == 401 and "session" in issued.json, issued
    bad = await server.client.get(f"{WHOAMI}?access_token=mat_nope")
    assert_error(bad, 401, "M_UNKNOWN_TOKEN")


@pytest_twisted.ensureDeferred
async def test_an_access_token_query_parameter_holding_nul_is_400_before_any_lookup(
    server: InProcessServer,
) -> None:
    """A NUL in the query's access token is refused by name, not looked up. (The same check
    guards the Authorization header, but Twisted itself answers a bare 400 to a header holding
    NUL before any resource sees it.)"""
    token = await server.client.access_token("alice")
    for target in (f"{WHOAMI}?access_token=mat_%00", f"{WHOAMI}?access_token={quote(token)}%00"):
        response = await server.client.get(target)
        assert_error(response, 400, "M_INVALID_PARAM")
        assert response.json["error"] == "'access_token' holds a character not allowed here (NUL)"
    assert (await server.client.get(f"{WHOAMI}?access_token={quote(token)}")).code == 200


@pytest_twisted.ensureDeferred
async def test_non_bearer_authorization_is_401_missing_token(server: InProcessServer) -> None:
    token = await server.client.access_token("alice")
    for value in ("Basic x", "Basic " + token, "Bearer", "Bearer   ", token):
        response = await server.client.request("GET", WHOAMI, headers={"Authorization": value})
        assert_error(response, 401, "M_MISSING_TOKEN")
    # The scheme is case-insensitive, and more than one space may follow it.
    for value in (f"bearer {token}", f"BEARER {token}", f"Bearer   {token}"):
        response = await server.client.request("GET", WHOAMI, headers={"Authorization": value})
        assert response.code == 200, (value, response)


@pytest_twisted.ensureDeferred
async def test_an_access_token_that_is_not_utf8_is_401_not_500(server: InProcessServer) -> None:
    response = await server.client.get(f"{WHOAMI}?access_token=%ff%fe")
    assert_error(response, 401, "M_UNKNOWN_TOKEN")


@pytest_twisted.ensureDeferred
async def test_new_devices_get_ten_capital_letters(server: InProcessServer) -> None:
    ids = {(await server.client.password_login("alice")).json["device_id"] for _ in range(5)}
    assert len(ids) == 5
    for device_id in ids:
        assert re.fullmatch(r"[A-Z]{10}", device_id), device_id


@pytest_twisted.ensureDeferred
async def test_a_form_content_type_is_not_parsed_as_a_form(server: InProcessServer) -> None:
    """Bodies are JSON whatever the Content-Type says; form fields never become arguments."""
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}}
    body["password"] = PASSWORD
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    logged_in = await server.client.request("POST", LOGIN, raw_body=json.dumps(body).encode(), headers=form)
    assert logged_in.code == 200, logged_in
    token = logged_in.json["access_token"]
    as_form = await server.client.request(
        "POST", GET_TOKEN, raw_body=f"access_token={token}".encode(), headers=form
    )
    assert (as_form.code, as_form.json["errcode"]) == (401, "M_MISSING_TOKEN")


# -- a second module: the host's side of the module contract -----------------
# tests/probe_module.py registers a login type of its own and an on_logged_out
# callback, as a third-party module would, and records what the host hands it.


@asynccontextmanager
async def probed(tmp_path: Path) -> AsyncIterator[tuple[InProcessServer, ProbeModule]]:
    """Our module (SQLite store) and the probe module, with one user, alice."""
    ours = homeserver_yaml(tmp_path)["modules"][0]
    srv = await start_in_process(tmp_path, modules=[ours, {"module": PROBE_MODULE, "config": {}}])
    try:
        await srv.register("alice")
        probe = srv.hs.modules[1]
        assert isinstance(probe, ProbeModule)
        yield srv, probe
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_login_flows_list_a_module_login_type_that_has_no_flow_fields(tmp_path: Path) -> None:
    async with probed(tmp_path) as (srv, _):
        response = await srv.client.get(LOGIN)
        assert response.code == 200, response
        assert response.json["flows"] == [
            {"type": "m.login.password"},
            {"type": "m.login.token", "get_login_token": True},
            {"type": PROBE_LOGIN},
        ]


@pytest_twisted.ensureDeferred
async def test_a_module_login_missing_a_required_field_is_400_and_never_asks_the_module(
    tmp_path: Path,
) -> None:
    async with probed(tmp_path) as (srv, probe):
        probe.answer = ("alice", None)
        response = await srv.client.post(LOGIN, {"type": PROBE_LOGIN})
        assert_error(response, 400, "M_MISSING_PARAM")
        assert probe.checked == []


@pytest_twisted.ensureDeferred
async def test_a_module_login_the_module_refuses_is_403_forbidden(tmp_path: Path) -> None:
    async with probed(tmp_path) as (srv, probe):
        body = {"type": PROBE_LOGIN, "secret": "wrong"}
        response = await srv.client.post(LOGIN, body)
        assert_error(response, 403, "M_FORBIDDEN")
        # The checker is told which of its login types this is (Synapse's contract).
        assert probe.checked == [(None, PROBE_LOGIN, body)]


@pytest_twisted.ensureDeferred
async def test_a_module_login_answering_a_localpart_signs_in_that_user_of_this_server(
    tmp_path: Path,
) -> None:
    async with probed(tmp_path) as (srv, probe):
        probe.answer = ("alice", None)
        response = await srv.client.post(LOGIN, {"type": PROBE_LOGIN, "secret": "s", "device_id": "PROBE"})
        assert response.code == 200, response
        assert response.json["user_id"] == "@alice:test.local"
        whoami = await srv.client.get(WHOAMI, response.json["access_token"])
        assert (whoami.code, whoami.json["user_id"], whoami.json["device_id"]) == (
            200,
            "@alice:test.local",
            "PROBE",
        )


@pytest_twisted.ensureDeferred
async def test_a_module_login_answering_a_full_user_id_keeps_it_as_given(tmp_path: Path) -> None:
    """The checker's answer is the canonical user id: the host does not rewrite it.

    An account from before user ids had to be lower case (``@Legacy:...``) signs in
    as itself, not as a lower-cased account that does not exist.
    """
    async with probed(tmp_path) as (srv, probe):
        legacy = await srv.register("Legacy")
        probe.answer = (legacy, None)
        response = await srv.client.post(LOGIN, {"type": PROBE_LOGIN, "secret": "s"})
        assert response.code == 200, response
        assert response.json["user_id"] == "@Legacy:test.local"
        whoami = await srv.client.get(WHOAMI, response.json["access_token"])
        assert (whoami.code, whoami.json["user_id"]) == (200, "@Legacy:test.local")


@pytest_twisted.ensureDeferred
async def test_logout_tells_modules_the_device_and_its_access_token(tmp_path: Path) -> None:
    async with probed(tmp_path) as (srv, probe):
        token = (await srv.client.password_login("alice", device_id="DESK")).json["access_token"]
        other = (await srv.client.password_login("alice", device_id="LAPTOP")).json["access_token"]
        assert (await srv.client.post(LOGOUT, {}, token)).code == 200
        assert probe.logged_out == [("@alice:test.local", "DESK", token)]
        # By the query parameter too.
        assert (await srv.client.post(f"{LOGOUT}?access_token={quote(other)}", {})).code == 200
        assert probe.logged_out[1:] == [("@alice:test.local", "LAPTOP", other)]


@pytest_twisted.ensureDeferred
async def test_logout_all_gives_modules_the_callers_token_and_empty_for_the_others(
    tmp_path: Path,
) -> None:
    """Only the caller's access token is known in full; the host keeps hashes of the rest."""
    async with probed(tmp_path) as (srv, probe):
        tokens = {}
        for device in ("ONE", "TWO", "THREE"):
            login = await srv.client.password_login("alice", device_id=device)
            tokens[device] = login.json["access_token"]
        assert (await srv.client.post(LOGOUT_ALL, {}, tokens["TWO"])).code == 200
        assert sorted(probe.logged_out) == [
            ("@alice:test.local", "ONE", ""),
            ("@alice:test.local", "THREE", ""),
            ("@alice:test.local", "TWO", tokens["TWO"]),
        ]


@pytest_twisted.ensureDeferred
async def test_a_module_login_is_told_which_user_the_client_named(tmp_path: Path) -> None:
    async with probed(tmp_path) as (srv, probe):
        probe.answer = ("alice", None)
        named = {"type": "m.id.user", "user": "Alice"}
        body = {"type": PROBE_LOGIN, "secret": "s", "identifier": named}
        assert (await srv.client.post(LOGIN, body)).code == 200
        # The name as a full user id of this server, as for a password login.
        assert probe.checked == [("@alice:test.local", PROBE_LOGIN, body)]


@pytest_twisted.ensureDeferred
async def test_a_module_login_for_a_user_that_does_not_exist_is_403_and_makes_no_device(
    tmp_path: Path,
) -> None:
    async with probed(tmp_path) as (srv, probe):
        probe.answer = ("@ghost:test.local", None)
        response = await srv.client.post(LOGIN, {"type": PROBE_LOGIN, "secret": "s", "device_id": "GHOST"})
        assert_error(response, 403, "M_FORBIDDEN")
        assert "access_token" not in response.json
        devices = await srv.hs.db.run(
            lambda conn: conn.execute("SELECT count(*) FROM devices WHERE device_id = 'GHOST'").fetchone()[0]
        )
        assert devices == 0


# -- bad login bodies: each gets its own Matrix error, and nobody is signed in --

BAD_LOGINS: list[tuple[dict[str, Any], int, str]] = [
    ({"type": 5, "password": PASSWORD}, 400, "M_BAD_JSON"),
    ({"type": "m.login.password", "identifier": "alice", "password": PASSWORD}, 400, "M_BAD_JSON"),
    (
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.thirdparty", "medium": "email", "address": "alice@example.org"},
            "password": PASSWORD,
        },
        400,
        "M_INVALID_PARAM",
    ),
    (
        {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": ""}, "password": PASSWORD},
        400,
        "M_BAD_JSON",
    ),
    (
        {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": 5}, "password": PASSWORD},
        400,
        "M_BAD_JSON",
    ),
    ({"type": "m.login.password", "user": "", "password": PASSWORD}, 400, "M_BAD_JSON"),
    (
        {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}},
        400,
        "M_MISSING_PARAM",
    ),
    (
        {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": 5},
        400,
        "M_BAD_JSON",
    ),
    (
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "@alice:elsewhere.example"},
            "password": PASSWORD,
        },
        403,
        "M_FORBIDDEN",
    ),
    (
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "alice"},
            "password": PASSWORD,
            "device_id": "D" * 256,
        },
        400,
        "M_INVALID_PARAM",
    ),
]


@pytest_twisted.ensureDeferred
async def test_each_bad_login_body_gets_its_own_error_and_signs_nobody_in(server: InProcessServer) -> None:
    for body, code, errcode in BAD_LOGINS:
        response = await server.client.post(LOGIN, body)
        assert_error(response, code, errcode)
        assert "access_token" not in response.json, body
    # The same request, well formed, signs alice in: the refusals above were about the body.
    good = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": "alice"},
        "password": PASSWORD,
    }
    assert (await server.client.post(LOGIN, good)).code == 200


@pytest_twisted.ensureDeferred
async def test_a_device_id_of_the_longest_allowed_length_is_kept(server: InProcessServer) -> None:
    longest = "D" * 255
    body = {"type": "m.login.password", "user": "alice", "password": PASSWORD, "device_id": longest}
    response = await server.client.post(LOGIN, body)
    assert response.code == 200, response
    assert response.json["device_id"] == longest


def test_new_device_ids_are_ten_capitals_drawn_afresh_in_every_place() -> None:
    ids = [new_device_id() for _ in range(200)]
    assert all(re.fullmatch(r"[A-Z]{10}", device_id) for device_id in ids)
    assert len(set(ids)) == len(ids)
    # Every one of the ten letters varies: none is fixed (a draw too small would
    # leave the later letters always "A").
    for place in range(10):
        assert len({device_id[place] for device_id in ids}) > 10, place


# -- the last resort: a handler whose answer cannot go out -------------------------
# tests/probe_module.py's FaultyModule serves handlers that fail after the point where
# a Matrix error could still be written; what goes out then is a fixed 500, and the
# connection is closed whatever state the response was in.

INTERNAL_ERROR = b'{"errcode":"M_UNKNOWN","error":"Internal server error"}'


@asynccontextmanager
async def faulty(tmp_path: Path) -> AsyncIterator[tuple[InProcessServer, FaultyModule]]:
    ours = homeserver_yaml(tmp_path)["modules"][0]
    srv = await start_in_process(tmp_path, modules=[ours, {"module": FAULTY_MODULE, "config": {}}])
    try:
        module = srv.hs.modules[1]
        assert isinstance(module, FaultyModule)
        yield srv, module
    finally:
        await srv.stop()


async def raw_get(server: InProcessServer, path: str) -> tuple[bytes, bool]:
    """GET over a persistent HTTP/1.1 connection: every byte the server sent, and whether
    it closed the connection."""
    request = f"GET {path} HTTP/1.1\r\nHost: test.local\r\n\r\n".encode()
    result: tuple[bytes, bool] = await threads.deferToThread(
        _blocking_exchange, server.client.base_url, request
    )
    return result


def split_response(received: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """(status line, headers by lower-case name, body as sent)."""
    head, _, body = received.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.decode("ascii").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _warnings(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, str]]:
    """The module's log records at WARNING or above, as (logger, level, message)."""
    return [
        (r.name, r.levelno, r.getMessage())
        for r in caplog.records
        if r.name.startswith("login_token") and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize(
    ("fault", "logged", "cause"),
    [
        ("unencodable", "Could not encode a 200 answer; answering 500 instead", UnicodeEncodeError),
        ("write_fails_once", "Failed to answer a request; answering 500", OSError),
    ],
    ids=["cannot_be_encoded", "its_writing_fails"],
)
@pytest_twisted.ensureDeferred
async def test_an_answer_that_cannot_go_out_becomes_the_fixed_500_and_a_closed_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str, logged: str, cause: type[Exception]
) -> None:
    """A body that cannot be encoded (a bug), or a write that fails: one error line with
    its cause, then the fixed 500, written without anything that could fail."""
    caplog.set_level(logging.INFO, logger="login_token_module")
    async with faulty(tmp_path) as (srv, module):
        received, closed = await raw_get(srv, f"/_test/fault/{fault}")
        (request,) = module.requests
        assert request.finished
    status, headers, body = split_response(received)
    assert status == b"HTTP/1.1 500 Internal Server Error"
    assert body == INTERNAL_ERROR
    assert json.loads(body) == {"errcode": "M_UNKNOWN", "error": "Internal server error"}
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(INTERNAL_ERROR))
    assert headers["connection"] == "close"
    assert closed, "the connection was left open after the 500"
    assert _warnings(caplog) == [("login_token_module.http", logging.ERROR, logged)]
    (record,) = [r for r in caplog.records if r.name == "login_token_module.http"]
    assert record.exc_info is not None and isinstance(record.exc_info[1], cause)


@pytest_twisted.ensureDeferred
async def test_a_failure_after_the_response_has_begun_ends_it_and_closes_the_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Too late for a 500: what was written stays the whole response, properly ended, and
    the connection is closed even though the client asked to keep it."""
    caplog.set_level(logging.INFO, logger="login_token_module")
    async with faulty(tmp_path) as (srv, module):
        received, closed = await raw_get(srv, "/_test/fault/after_a_partial_write")
        (request,) = module.requests
        assert request.finished
    status, headers, body = split_response(received)
    assert status == b"HTTP/1.1 200 OK"
    assert headers["transfer-encoding"] == "chunked"
    assert "connection" not in headers
    assert body == b"7\r\npartial\r\n0\r\n\r\n"  # the partial chunk, then the last (empty) one
    assert closed, "the connection was left open after the failure"
    errors = _warnings(caplog)
    assert errors == [
        ("login_token_module.http", logging.ERROR, "Could not encode a 200 answer; answering 500 instead")
    ]


@pytest_twisted.ensureDeferred
async def test_a_500_that_cannot_be_written_is_logged_and_the_connection_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="login_token_module")
    async with faulty(tmp_path) as (srv, _):
        received, closed = await raw_get(srv, "/_test/fault/unwritable")
    assert (received, closed) == (b"", True)
    errors = _warnings(caplog)
    assert errors == [
        ("login_token_module.http", logging.ERROR, "Could not encode a 200 answer; answering 500 instead"),
        ("login_token_module.http", logging.ERROR, "Could not write a 500 answer"),
    ]
    last = [r for r in caplog.records if r.name == "login_token_module.http"][-1]
    assert last.exc_info is not None and isinstance(last.exc_info[1], OSError)


def _latency(route: str, code: int) -> tuple[float, float]:
    """The request-latency histogram's (count, sum) for ``route`` answered ``code`` to GET,
    from this process's registry."""
    labels = {"endpoint": route, "method": "GET", "code": str(code)}
    name = "login_token_module_http_request_duration_seconds"
    count = REGISTRY.get_sample_value(f"{name}_count", labels) or 0.0
    total = REGISTRY.get_sample_value(f"{name}_sum", labels) or 0.0
    return count, total


@pytest_twisted.ensureDeferred
async def test_a_handler_whose_store_is_away_gets_503_with_retry_after_and_no_log_line_here(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store logs its outage where it noticed it (throttled); the answer only says
    to come back."""
    caplog.set_level(logging.INFO, logger="login_token_module")
    async with faulty(tmp_path) as (srv, _):
        answer = await srv.client.get("/_test/fault/store_away")
    assert answer.code == 503, answer
    assert answer.json == {
        "errcode": "M_UNKNOWN",
        "error": "The server's database is unavailable; try again shortly",
    }
    assert answer.headers["retry-after"] == "5"
    assert answer.headers["cache-control"] == "no-cache, no-store, must-revalidate"
    assert "connection" not in answer.headers
    assert _warnings(caplog) == []


@pytest_twisted.ensureDeferred
async def test_a_handler_refused_for_a_full_queue_gets_429_and_its_time_is_measured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="login_token_module")
    route = "/_test/fault/busy"
    count_before, sum_before = _latency(route, 429)
    async with faulty(tmp_path) as (srv, _):
        answer = await srv.client.get(route)
    assert answer.code == 429, answer
    assert answer.json == {
        "errcode": "M_LIMIT_EXCEEDED",
        "error": "The server is busy; try again shortly",
        "retry_after_ms": 2500,
    }
    assert answer.headers["retry-after"] == "3"
    assert _warnings(caplog) == []
    count_after, sum_after = _latency(route, 429)
    assert count_after - count_before == 1
    # The time from routing to answering: well under a second here, and never negative.
    assert 0 <= sum_after - sum_before < 5, (sum_before, sum_after)


@pytest_twisted.ensureDeferred
async def test_a_handlers_bug_is_a_500_and_one_error_line_naming_the_method_and_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The request's body never reaches the line (it may hold a password); the
    connection stays usable, as for any other answer."""
    caplog.set_level(logging.INFO, logger="login_token_module")
    async with faulty(tmp_path) as (srv, _):
        answer = await srv.client.get("/_test/fault/raises")
    assert answer.code == 500, answer
    assert answer.json == {"errcode": "M_UNKNOWN", "error": "Internal server error"}
    assert "connection" not in answer.headers
    assert _warnings(caplog) == [
        ("login_token_module.http", logging.ERROR, "Unhandled error in GET /_test/fault/raises")
    ]
    (record,) = [r for r in caplog.records if r.name == "login_token_module.http"]
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


@pytest_twisted.ensureDeferred
async def test_a_json_resource_served_outside_the_hosts_tree_is_measured_under_other() -> None:
    """A JsonResource in any Twisted tree that did not name its route (a module's own
    site, say) is still answered and measured, under the fixed label "other"; a path
    beyond it is 404."""
    before, _ = _latency(OTHER, 429)
    root = Resource()
    root.putChild(b"busy", FaultyResource("busy", []))
    listening = REACTOR.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        port = listening.getHost().port
        client = HttpClient(f"http://127.0.0.1:{port}")
        answer = await client.get("/busy")
        # A leaf reached with segments left over (Synapse's tree does this) is not ours.
        beyond = await client.get("/busy/beyond")
    finally:
        await listening.stopListening()
    assert (answer.code, answer.json["errcode"]) == (429, "M_LIMIT_EXCEEDED"), answer
    after, _ = _latency(OTHER, 429)
    assert after - before == 1
    assert beyond.code == 404, beyond
    assert beyond.json == {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}


@pytest_twisted.ensureDeferred
async def test_refusals_carry_their_reason_phrases_even_where_twisted_has_none(tmp_path: Path) -> None:
    """Twisted knows no phrase for 429, and an older one for 413."""
    async with faulty(tmp_path) as (srv, _):
        for path, status in (
            ("/_test/fault/busy", b"HTTP/1.1 429 Too Many Requests"),
            ("/_test/fault/store_away", b"HTTP/1.1 503 Service Unavailable"),
        ):
            received = await exchange(srv, closing_request(b"GET", path))
            assert split_response(received)[0] == status, received
        body = b"{" + b" " * (70 * 1024) + b"}"  # over the 64 KiB default
        head = closing_request(b"POST", LOGIN, f"Content-Length: {len(body)}\r\n")
        received = await exchange(srv, head + body)
        assert split_response(received)[0] == b"HTTP/1.1 413 Payload Too Large", received


@pytest_twisted.ensureDeferred
async def test_an_answer_for_a_client_that_has_gone_is_dropped_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="login_token_module")
    route = "/_test/fault/waits_for_disconnect"
    before, _ = _latency(route, 200)
    async with faulty(tmp_path) as (srv, module):
        parts = urlsplit(srv.client.base_url)
        assert parts.port is not None

        def ask_and_leave() -> None:
            with socket.create_connection(("127.0.0.1", parts.port), timeout=5) as sock:
                sock.sendall(f"GET {route} HTTP/1.1\r\nHost: x\r\n\r\n".encode())

        await threads.deferToThread(ask_and_leave)
        for _ in range(100):  # the handler answers once it sees the client gone
            if _latency(route, 200)[0] > before:
                break
            await sleep(0.05)
        (request,) = module.requests
    assert _latency(route, 200)[0] == before + 1
    assert not request.finished  # nothing was written to, or finished on, the lost connection
    assert _warnings(caplog) == []


@pytest_twisted.ensureDeferred
async def test_a_handler_that_finished_the_response_itself_gets_nothing_more_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="login_token_module")
    async with faulty(tmp_path) as (srv, _):
        received = await exchange(srv, closing_request(b"GET", "/_test/fault/finishes_itself"))
    status, _, body = split_response(received)
    assert status == b"HTTP/1.1 200 OK", received
    assert body == b"4\r\ndone\r\n0\r\n\r\n", received
    assert _warnings(caplog) == []
