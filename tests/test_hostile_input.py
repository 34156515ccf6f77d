"""Hostile input, one finding at a time (the project's hostile-input issue, items 1-8):
each test sends what an attacker sent, over HTTP to a listening host
(``login-token-module serve``, as an operator runs it), and checks the answer the
issue asks for. The property-based hunt for the same kinds of input is
tests/test_hostile_property.py.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from login_token_module.errors import MatrixError
from login_token_module.host.passwords import check_password_sync, hash_password_sync
from login_token_module.http import check_strings, client_address
from login_token_module.tokens import generate_token
from tests.helpers import (
    GET_TOKEN,
    LOGIN,
    PASSWORD,
    REACTOR,
    ChildServer,
    Launcher,
    cli,
    homeserver_yaml,
    register,
    start_child,
    write_config,
)
from tests.pgcluster import Database
from tests.test_hostile_property import Answer, send

LOGOUT = "/_matrix/client/v3/logout"
VERSIONS = "/_matrix/client/versions"
# A login that succeeds as it is: a refusal then comes from the hostile field added to it.
PASSWORD_LOGIN = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}}
PASSWORD_LOGIN["password"] = PASSWORD
BOUNDARY_CODES = {"M_BAD_JSON", "M_INVALID_PARAM"}
GENEROUS = {"per_second": 100_000, "burst_count": 100_000}
SERVER_NAME = "test.local"
# What the attacker put in a device id: a second, forged audit record.
# A device id that would forge a record if written raw, without a control character.
SPOOFING = f'PHONE event=spend outcome=spent user_id=@admin:{SERVER_NAME} new_device_id="x y"'
FORGED = (
    "PHONE\n2026-01-01 00:00:00,000 INFO login_token_module.audit: login token event=spend"
    f' outcome=spent user_id=@admin:{SERVER_NAME} new_device_id="x y"'
)


# -- a listening host and a client for it ------------------------------------------------------


class Host:
    """A host child process, its config, and JSON requests to it (each must be answered in 5 s)."""

    def __init__(self, server: ChildServer, config: Path) -> None:
        self.server = server
        self.config = config

    @property
    def port(self) -> int:
        return self.server.port

    def request(
        self, method: str, path: str, body: Any = None, access: str | None = None, within: float = 5.0
    ) -> Answer:
        headers = {"Authorization": f"Bearer {access}".encode()} if access else {}
        # json.dumps writes ASCII: a lone surrogate goes out as \ud800, as clients send it.
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        return send(self.port, method, path, data, headers, within)

    def login(
        self, user: str = "alice", password: str = PASSWORD, within: float = 5.0, **extra: Any
    ) -> Answer:
        identifier = {"type": "m.id.user", "user": user}
        body = {"type": "m.login.password", "identifier": identifier, "password": password, **extra}
        return self.request("POST", LOGIN, body, within=within)

    def access(self, user: str = "alice", **extra: Any) -> str:
        answer = self.login(user, **extra)
        assert answer.status == 200, answer
        return str(answer.body["access_token"])

    def session(self, access: str) -> str:
        answer = self.request("POST", GET_TOKEN, {}, access)
        assert answer.status == 401, answer
        return str(answer.body["session"])

    def confirm(self, access: str, password: str = PASSWORD) -> Answer:
        """get_token with its UIA: a challenge, then the password in that session."""
        auth = {"type": "m.login.password", "password": password, "session": self.session(access)}
        return self.request("POST", GET_TOKEN, {"auth": auth}, access)

    def mint(self, access: str) -> str:
        answer = self.confirm(access)
        assert answer.status == 200, answer
        return str(answer.body["login_token"])

    def token_login(self, token: str, **extra: Any) -> Answer:
        return self.request("POST", LOGIN, {"type": "m.login.token", "token": token, **extra})

    def still_serving(self) -> None:
        answer = self.request("GET", VERSIONS)
        assert answer.status == 200, answer


def start_host(
    tmp_path: Path,
    launch: Launcher,
    *,
    module: dict[str, Any] | None = None,
    store: str = "sqlite",
    pg: Database | None = None,
    users: tuple[str, ...] = ("alice",),
    **extra: Any,
) -> Host:
    """A host with the module (``store``: memory, sqlite, sqlite-shared or postgres) and users."""
    store_config: dict[str, Any] = {"type": "sqlite", "path": "tokens.db"}
    if store == "memory":
        store_config = {"type": "memory"}
    elif store == "sqlite-shared":
        store_config["shared_state"] = True
    elif store == "postgres":
        assert pg is not None
        store_config = {"type": "postgres", "dsn": pg.dsn}
        extra.setdefault("database", {"name": "psycopg2", "args": pg.args})
    config = homeserver_yaml(
        tmp_path,
        {"store": store_config, "ratelimit": GENEROUS, "failed_auth_ratelimit": GENEROUS, **(module or {})},
    )
    config.update(extra)
    path = write_config(tmp_path, config)
    for user in users:
        register(path, user)
    return Host(launch(path), path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """One SQLite host for the tests that only send requests it refuses (each starting its
    own would add a second or two apiece)."""
    started: list[ChildServer] = []

    def launch(config: Path) -> ChildServer:
        started.append(start_child(config))
        return started[-1]

    try:
        yield start_host(tmp_path_factory.mktemp("shared"), launch)
    finally:
        for server in started:
            server.kill_all()


STORES = ["sqlite", "postgres"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest) -> tuple[str, Database | None]:
    if request.param == "postgres":
        return "postgres", request.getfixturevalue("pg_database")
    return request.param, None


def assert_boundary_refusal(answer: Answer, field: str | None = None) -> None:
    """400 M_BAD_JSON or M_INVALID_PARAM, naming the field (when it has a name to give)."""
    assert answer.status == 400, answer
    assert answer.body["errcode"] in BOUNDARY_CODES, answer.body
    assert isinstance(answer.body["error"], str), answer.body
    if field is not None:
        assert field in answer.body["error"], answer.body


def concurrently(count: int, job: Callable[[], Answer]) -> list[Answer]:
    """``count`` calls of ``job`` at once, each on its own connection."""
    start = threading.Barrier(count)

    def run() -> Answer:
        start.wait()
        return job()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _: run(), range(count)))


def kinds(answers: list[Answer]) -> Counter[tuple[int, str]]:
    """How many answers of each (status, errcode or error text)."""
    found: Counter[tuple[int, str]] = Counter()
    for answer in answers:
        body = answer.body if isinstance(answer.body, dict) else {}
        found[(answer.status, str(body.get("error") if answer.status == 401 else body.get("errcode")))] += 1
    return found


# -- 1. a request is always answered; a client string holding a lone surrogate or NUL is refused


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"type": "\x00"}, "'type' holds"),
        ({"auth": {"session": "\ud800"}}, "'auth.session' holds"),
        ({"deep": {"a": [{"b": "\ud800"}]}}, "'deep.a[0].b' holds"),
        ({"x": [1, ["ok", "\x00"]]}, "'x[1][1]' holds"),
        ({"two words": "\x00"}, "'<key>' holds"),
        ({"x": {"K" * 64: "\x00"}}, f"'x.{'K' * 64}' holds"),
        ({"x": {"K" * 65: "\x00"}}, "'x.<key>' holds"),
        ({"x": {"caf\u00e9": {"y": "\x00"}}}, "'x.<key>.y' holds"),
        ({"a-b_c.d": "\udfff"}, "'a-b_c.d' holds"),
        ({"\ud800": 1}, "A key in 'the body' holds"),
        ({"auth": {"ok": 1, "\x00": 1}}, "A key in 'auth' holds"),
        (["\x00"], "'[0]' holds"),
        ("\ud800", "'the body' holds"),
    ],
)
def test_the_refusal_names_the_field_by_its_path_and_never_echoes_an_odd_key(body: Any, error: str) -> None:
    """Plain keys (at most 64 of A-Z a-z 0-9 _ . -) are named, others are ``<key>``."""
    with pytest.raises(MatrixError) as refused:
        check_strings(body)
    assert (refused.value.code, refused.value.errcode) == (400, "M_BAD_JSON")
    assert refused.value.msg.startswith(error + " a character not allowed here"), refused.value.msg


def test_a_lone_surrogate_as_the_login_type_gets_400_at_once(shared: Host) -> None:
    host = shared
    started = time.monotonic()
    answer = host.request("POST", LOGIN, b'{"type":"\\ud800"}')
    assert time.monotonic() - started < 2, answer
    assert_boundary_refusal(answer, "type")
    host.still_serving()


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (LOGIN, {"type": "m.login.\ud800password"}, "type"),
        (
            LOGIN,
            {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "ali\ud800"}},
            "identifier",
        ),
        (
            LOGIN,
            {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "al\x00ice"}},
            "identifier",
        ),
        (LOGIN, {"type": "m.login.password", "user": "alice", "password": "\udfff"}, "password"),
        (
            LOGIN,
            {"type": "m.login.password", "user": "alice", "password": PASSWORD, "device_id": "A\x00"},
            "device_id",
        ),
        (LOGIN, {"type": "m.login.token", "token": "\ud800"}, "token"),
        (LOGIN, {**PASSWORD_LOGIN, "deep": {"a": [{"b": "\ud800"}]}}, "deep"),
        (LOGIN, {**PASSWORD_LOGIN, "\ud800": 1}, None),
        (GET_TOKEN, {"auth": {"type": "m.login.\udc00"}}, "auth"),
        (GET_TOKEN, {"auth": {"type": "m.login.password", "password": "x\x00y"}}, "auth"),
    ],
    ids=[
        "login-type",
        "identifier-user",
        "identifier-user-nul",
        "password",
        "device-id-nul",
        "token",
        "nested-unread",
        "key",
        "auth-type",
        "auth-password-nul",
    ],
)
def test_a_lone_surrogate_or_nul_anywhere_in_a_body_gets_400(
    shared: Host, path: str, body: dict[str, Any], field: str | None
) -> None:
    host = shared
    access = host.access()
    answer = host.request("POST", path, body, access if path == GET_TOKEN else None)
    assert_boundary_refusal(answer, field)
    host.still_serving()


def test_an_error_never_echoes_a_long_client_string(shared: Host) -> None:
    host = shared
    answer = host.request("POST", LOGIN, {"type": "m.login." + "x" * 10_000})
    assert answer.status == 400, answer
    assert len(answer.body["error"]) < 1_000, len(answer.body["error"])


def test_an_access_token_query_parameter_holding_nul_gets_400(shared: Host) -> None:
    host = shared
    answer = host.request("GET", "/_matrix/client/v3/account/whoami?access_token=mat_%00")
    assert_boundary_refusal(answer, "access_token")


def test_an_authorization_header_holding_nul_is_refused_before_any_resource(shared: Host) -> None:
    """Twisted itself answers a bare 400 to a header holding NUL: no resource (and no token
    lookup) ever sees it, on any endpoint."""
    host = shared
    for method, path in (("GET", "/_matrix/client/v3/account/whoami"), ("POST", GET_TOKEN)):
        body = b"{}" if method == "POST" else None
        for header in (b"Bearer mat_\x00", b"Bearer \x00mat_abc"):
            answer = send(host.port, method, path, body, {"Authorization": header}, 5.0)
            assert (answer.status, answer.raw) == (400, b""), answer
    host.still_serving()


# -- 2. metrics labels come from routes, not from what a request spelled -------------------------


def _series(port: int) -> tuple[list[dict[str, str]], int]:
    """The request-latency histogram's label sets in a scrape, and the scrape's size in bytes."""
    answer = send(port, "GET", "/_synapse/metrics")
    assert answer.status == 200
    text = answer.raw.decode()
    labels = [
        dict(sample.labels)
        for family in text_string_to_metric_families(text)
        if family.name == "login_token_module_http_request_duration_seconds"
        for sample in family.samples
        if sample.name.endswith("_count")
    ]
    return labels, len(answer.raw)


def start_with_metrics(tmp_path: Path, launch: Launcher) -> tuple[Host, int]:
    """A host with a metrics listener too; returns it and the metrics port."""
    listeners = [
        {"port": 0, "bind_addresses": ["127.0.0.1"]},
        {"type": "metrics", "port": 0, "bind_addresses": ["127.0.0.1"]},
    ]
    host = start_host(tmp_path, launch, listeners=listeners)
    return host, host.server.metrics_port()


def test_metrics_label_the_route_and_the_method_served_never_the_spelling(
    tmp_path: Path, launch: Launcher
) -> None:
    host, metrics_port = start_with_metrics(tmp_path, launch)
    assert send(host.port, "GET", VERSIONS).status == 200
    before, _ = _series(metrics_port)

    spellings = ["/_matrix/client/%76ersions", "/_matrix/%63lient/versions", "/_matrix/client/versio%6E%73"]
    for path in spellings:
        assert send(host.port, "GET", path).status == 200, path
    # Methods are case-sensitive: gEt is not GET (refused, and counted as "other").
    assert send(host.port, "gEt", VERSIONS).status == 405
    for n in range(200):  # the attack, small: every spelling a new series today
        assert send(host.port, "GET", f"/_matrix/client/versions%{n % 16:X}{n // 16:X}x").status == 404
        spelled = "".join(f"%{ord(c):02x}" if (n >> i) & 1 else c for i, c in enumerate("versions"))
        send(host.port, "GET", "/_matrix/client/" + spelled)
    after, _ = _series(metrics_port)

    served = {"GET", "POST", "HEAD", "OPTIONS", "other"}
    for labels in after:
        assert labels["method"] in served, labels
        assert "%" not in labels["endpoint"] and "gEt" not in labels["method"], labels
        assert labels["endpoint"].startswith("/_matrix/") or labels["endpoint"] == "other", labels
    # Every spelling of /versions counted as the route itself; a handful of new series at most.
    assert len(after) - len(before) <= 4, [labels for labels in after if labels not in before]
    host.still_serving()


# -- 3. admit, then work: allowances are taken before bcrypt runs ----------------------------------

BCRYPT_ROUNDS = 10
# How long a request of a burst may wait: long enough for today's queue of bcrypt checks
# (each burst below is judged by what it was answered, not by how long it waited).
QUEUED = 60.0


def bcrypt_seconds() -> float:
    """CPU seconds one bcrypt check takes here, at the rounds these tests use (best of three)."""
    password_hash = hash_password_sync("x", BCRYPT_ROUNDS)
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        check_password_sync("x", password_hash)
        best = min(best, time.process_time() - started)
    return best


def server_cpu(host: Host) -> float:
    times = psutil.Process(host.server.process.pid).cpu_times()
    return float(times.user + times.system)


def test_concurrent_wrong_passwords_on_get_token_get_no_more_bcrypt_checks_than_the_burst(
    tmp_path: Path, launch: Launcher
) -> None:
    host = start_host(
        tmp_path,
        launch,
        module={"failed_auth_ratelimit": {"per_second": 0.01, "burst_count": 3}},
        bcrypt_rounds=BCRYPT_ROUNDS,
    )
    access = host.access()
    wrong = {"auth": {"type": "m.login.password", "password": "not the password"}}
    answers = concurrently(40, lambda: host.request("POST", GET_TOKEN, wrong, access, within=QUEUED))
    found = kinds(answers)
    # Each "Invalid password" is one bcrypt check that ran; the rest were refused before it.
    assert found[(401, "Invalid password")] <= 3, found
    assert found[(429, "M_LIMIT_EXCEEDED")] >= 37, found
    assert sum(found.values()) == 40


def test_concurrent_wrong_passwords_on_login_get_no_more_bcrypt_checks_than_the_burst(
    tmp_path: Path, launch: Launcher
) -> None:
    host = start_host(
        tmp_path,
        launch,
        bcrypt_rounds=BCRYPT_ROUNDS,
        rc_login={
            "address": GENEROUS,
            "account": GENEROUS,
            "failed_attempts": {"per_second": 0.01, "burst_count": 3},
        },
    )
    answers = concurrently(40, lambda: host.login(password="not the password", within=QUEUED))
    found = kinds(answers)
    assert found[(403, "M_FORBIDDEN")] <= 3, found
    assert found[(429, "M_LIMIT_EXCEEDED")] >= 37, found
    assert sum(found.values()) == 40


def test_concurrent_right_passwords_on_get_token_mint_one_token_and_run_bcrypt_a_few_times(
    tmp_path: Path, launch: Launcher
) -> None:
    host = start_host(
        tmp_path,
        launch,
        module={"ratelimit": {"per_second": 0.0167, "burst_count": 1}},
        bcrypt_rounds=BCRYPT_ROUNDS,
    )
    access = host.access()
    right = {"auth": {"type": "m.login.password", "password": PASSWORD}}
    one_check = bcrypt_seconds()
    cpu_before = server_cpu(host)
    answers = concurrently(100, lambda: host.request("POST", GET_TOKEN, right, access, within=QUEUED))
    cpu = server_cpu(host) - cpu_before
    found = kinds(answers)
    assert found[(200, "None")] == 1, found
    assert found[(429, "M_LIMIT_EXCEEDED")] == 99, found
    # The server's own CPU time over the burst: 100 bcrypt checks' worth is the attack
    # (one per request, each then refused); a few, plus answering 100 requests, is not.
    assert cpu < 20 * one_check, (
        f"{cpu:.2f} s of CPU = {cpu / one_check:.0f} bcrypt checks of {one_check:.3f} s"
    )


# -- 4. device fields are checked before the token is spent -----------------------------------------


@pytest.mark.parametrize("field", ["device_id", "initial_device_display_name"])
@pytest.mark.parametrize("value", ["\ud800", "PH\x00NE"], ids=["surrogate", "nul"])
def test_a_bad_device_field_on_token_login_gets_400_and_leaves_the_token_usable(
    tmp_path: Path, launch: Launcher, store: tuple[str, Database | None], field: str, value: str
) -> None:
    kind, pg = store
    host = start_host(tmp_path, launch, store=kind, pg=pg)
    token = host.mint(host.access())
    assert_boundary_refusal(host.token_login(token, **{field: value}), field)
    assert host.token_login(token, device_id="NEWPHONE").status == 200
    assert host.token_login(token).status == 403  # spent now, once


@pytest.mark.parametrize("value", ["\ud800", "PH\x00NE"], ids=["surrogate", "nul"])
def test_a_bad_device_id_on_password_login_gets_400(
    tmp_path: Path, launch: Launcher, store: tuple[str, Database | None], value: str
) -> None:
    kind, pg = store
    host = start_host(tmp_path, launch, store=kind, pg=pg)
    assert_boundary_refusal(host.login(device_id=value), "device_id")
    assert_boundary_refusal(host.login(initial_device_display_name=value), "initial_device_display_name")


# -- 5. audit records are one line each, whatever a device id holds -----------------------------------

_LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')


def unquote(value: str) -> str:
    """A logfmt value: bare, or double-quoted with backslash escapes (\\n, \\", \\\\, \\xHH, \\uHHHH)."""
    if not value.startswith('"'):
        return value
    inner, out, i = value[1:-1], [], 0
    simple = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "0": "\x00"}
    while i < len(inner):
        char = inner[i]
        if char != "\\":
            out.append(char)
            i += 1
            continue
        code = inner[i + 1]
        if code in simple:
            out.append(simple[code])
            i += 2
        elif code == "x":
            out.append(chr(int(inner[i + 2 : i + 4], 16)))
            i += 4
        elif code == "u":
            out.append(chr(int(inner[i + 2 : i + 6], 16)))
            i += 6
        else:
            raise AssertionError(f"unknown escape \\{code} in {value!r}")
    return "".join(out)


def audit_lines(log: str) -> list[dict[str, str]]:
    """The audit records in a server log, each line parsed as logfmt (key, unquoted value)."""
    records = []
    for line in log.splitlines():
        if "login token event=" not in line:
            continue
        text = line.split("login token ", 1)[1]
        pairs = [(key, unquote(value)) for key, value in _LOGFMT.findall(text)]
        keys = [key for key, _ in pairs]
        assert keys.count("event") == 1, line
        records.append(dict(pairs))
    return records


def test_a_device_id_holding_a_line_break_cannot_forge_an_audit_record(
    tmp_path: Path, launch: Launcher
) -> None:
    host = start_host(tmp_path, launch)
    # A line break (any control character) in a device id is refused at the door...
    refused = host.login(device_id=FORGED)
    assert (refused.status, refused.body["errcode"]) == (400, "M_INVALID_PARAM"), refused
    # ... and what a device id may hold (spaces, quotes, '=') is quoted in the record.
    minting = host.login(device_id=SPOOFING)
    assert minting.status == 200, minting
    token = host.mint(minting.body["access_token"])
    refused = host.token_login(token, device_id=FORGED)
    assert (refused.status, refused.body["errcode"]) == (400, "M_INVALID_PARAM"), refused
    spent = host.token_login(token, device_id=SPOOFING + " new")
    assert spent.status == 200, spent
    host.server.terminate()

    log = host.server.log()
    records = audit_lines(log)
    assert [(r["event"], r["outcome"]) for r in records] == [("issue", "issued"), ("spend", "spent")], log
    assert records[0]["minted_by_device"] == SPOOFING
    assert records[1]["minted_by_device"] == SPOOFING
    assert records[1]["new_device_id"] == SPOOFING + " new"
    assert all(r["user_id"] == f"@alice:{SERVER_NAME}" for r in records)
    assert not any(line.startswith("2026-01-01") for line in log.splitlines()), log

    # The operator's view of the same history: one line per token, the line break shown escaped.
    history = cli("tokens", "history", "-c", str(host.config), "--user", "alice")
    assert history.returncode == 0, history.stderr
    assert not any(line.startswith("2026-01-01") for line in history.stdout.splitlines()), history.stdout
    assert "\x1b" not in history.stdout


# -- 6. other inputs that gave 500 ---------------------------------------------------------------------


def test_a_token_of_the_right_shape_with_a_non_ascii_checksum_gets_403(shared: Host) -> None:
    host = shared
    token = generate_token()
    for checksum in ("\u00e9" * 6, "abcde\u00e9", "\uff10" * 6):
        answer = host.token_login(token[:-6] + checksum)
        assert (answer.status, answer.body["errcode"]) == (403, "M_FORBIDDEN"), answer
    host.still_serving()


@pytest.mark.parametrize("value", ["\ud800", "abc\x00"], ids=["surrogate", "nul"])
@pytest.mark.parametrize("kind", ["sqlite-shared", "postgres"])
def test_a_uia_session_holding_a_lone_surrogate_or_nul_gets_400(
    tmp_path: Path, launch: Launcher, request: pytest.FixtureRequest, kind: str, value: str
) -> None:
    pg = request.getfixturevalue("pg_database") if kind == "postgres" else None
    host = start_host(tmp_path, launch, store=kind, pg=pg)
    access = host.access()
    auth = {"type": "m.login.password", "password": PASSWORD, "session": value}
    assert_boundary_refusal(host.request("POST", GET_TOKEN, {"auth": auth}, access), "session")
    assert host.mint(access)  # the endpoint still works for alice


# -- 7. a token minted while its device logs out never signs a device in ------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_token_confirmed_just_before_its_device_logs_out_signs_nothing_in(
    tmp_path: Path, launch: Launcher, kind: str
) -> None:
    # bcrypt at 12 rounds (the sample config's) takes long enough for the logout to land during it.
    host = start_host(tmp_path, launch, store=kind, bcrypt_rounds=12)
    access = host.access()
    auth = {"type": "m.login.password", "password": PASSWORD, "session": host.session(access)}
    answers: dict[str, Answer] = {}
    finished: list[str] = []

    def confirm() -> None:
        answers["confirm"] = host.request("POST", GET_TOKEN, {"auth": auth}, access)
        finished.append("confirm")

    confirming = threading.Thread(target=confirm)
    confirming.start()
    time.sleep(0.05)
    assert not finished, "the password check ended within 50 ms: no race to test"
    answers["logout"] = host.request("POST", LOGOUT, {}, access)
    confirming.join(30)
    assert answers["logout"].status == 200, answers

    confirmed = answers["confirm"]
    if confirmed.status == 200:
        late = host.token_login(confirmed.body["login_token"])
        assert late.status == 403, f"the token minted for a logged-out device signed in: {late}"
        assert late.body["errcode"] == "M_FORBIDDEN", late
    else:
        assert confirmed.status in (401, 403), confirmed
        assert "login_token" not in confirmed.body


# -- 8. the metrics listener does not buffer request bodies -----------------------------------------


def test_the_metrics_listener_refuses_a_huge_body_before_it_arrives(tmp_path: Path, launch: Launcher) -> None:
    _, metrics_port = start_with_metrics(tmp_path, launch)
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=5) as sock:
        size = 200 * 1024 * 1024
        head = f"POST /_synapse/metrics HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
        sock.sendall(head.encode() + b"x" * 65536)  # 64 KB of the 200 MB it announces
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            raise AssertionError("the metrics listener waited for the 200 MB body") from None
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", reply), reply[:200]


@pytest_twisted.ensureDeferred
async def test_a_peer_on_a_unix_socket_has_no_client_address(tmp_path: Path) -> None:
    """Synapse can listen on a UNIX socket: its peers have no IP address. The module's
    limits and audit then get no address (an unknown peer) rather than a crash."""
    seen: list[str | None] = []

    class Echo(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> bytes:
            seen.append(client_address(request))
            return b"answered"

    path = str(tmp_path / "http.sock")
    listening = REACTOR.listenUNIX(path, Site(Echo()))  # type: ignore[no-untyped-call]

    def get() -> bytes:
        with socket.socket(socket.AF_UNIX) as peer:
            peer.settimeout(5)
            peer.connect(path)
            peer.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return b"".join(iter(lambda: peer.recv(4096), b""))

    try:
        answer = await threads.deferToThread(get)
    finally:
        await listening.stopListening()
    assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"answered"), answer
    assert seen == [None]
