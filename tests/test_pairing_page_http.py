"""The pairing approval page over real HTTP, in-process: what a browser (or an attacker
posting forms by hand) sees of every branch of its POST, byte for byte.

tests/test_pairing_page.py drives the same page in a real Chromium against a child
process; this module posts the forms itself to a server on the test's own reactor,
with the module's clock held still, so that every status, message, header and audit
record is exact. Where the story needs something to happen *while* a password is
being checked (another device denies the code, the device logs out, the database
fails, another form arrives), the host's password check is wrapped to do it while
bcrypt runs: the check itself, the module and its stores are untouched.
"""

from __future__ import annotations

import html
import http.client
import io
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest
import pytest_twisted
from markupsafe import escape
from twisted.internet import defer, threads
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from login_token_module import audit
from login_token_module.errors import MatrixError
from login_token_module.pairing import APPROVE_PATH, DENY_PATH, PAGE_PATH, START_PATH
from login_token_module.pairing_page import MAX_FORM_BYTES, PairPageResource, _ago
from tests.helpers import (
    GET_TOKEN,
    PASSWORD,
    AuditRecords,
    Clock,
    HttpClient,
    InProcessServer,
    PasswordChecks,
    Response,
    count_password_checks,
    hold_clock,
    rename_table,
    running,
    start_in_process,
)
from tests.pgcluster import PostgresCluster
from tests.test_host_minting import (  # noqa: F401 (host_api, lending_host_api: fixtures, used by name)
    LendingHostApi,
    MintingHostApi,
    host_api,
    lending_host_api,
)
from tests.test_host_minting import start as start_minting_host
from tests.test_pairing import config, poll, start, start_behind_proxy

USER = "@alice:test.local"
FORM_UNREADABLE = "The form could not be read; start again."
FORGED = "This form has expired or did not come from this page; start again."
WRONG_USER_OR_PASSWORD = "Wrong user id or password."
NO_SUCH_CODE = "No device is waiting with this code. Check the code, or start again on the new device."
SERVER_FAILED = "Something went wrong on the server."
# Every answer of the page: nothing may run in it or frame it, nothing of it is kept.
PAGE_HEADERS = {
    "content-type": "text/html; charset=utf-8",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self';"
    " frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}
MESSAGE_RE = re.compile(r'<p id="message" class="(\w+)">(.*?)</p>', re.S)
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]*)"')
# The cookie a Page sends unless told otherwise: its own.
OWN_COOKIE = "(this browser's own)"
COOKIE_RE = re.compile(r"^login_token_pair_csrf=([A-Za-z0-9_-]{43}); ")


@dataclass
class Page:
    """A browser's view of the page on one server: its CSRF cookie, and forms it posts."""

    srv: InProcessServer
    clock: Clock
    cookie: str = ""
    token: str = ""
    # Sent as X-Forwarded-For (heeded only on a listener with ``x_forwarded``).
    address: str | None = None

    def __post_init__(self) -> None:
        # Cookies go out only as this browser says (``cookie``), never from a jar.
        self.client = HttpClient(self.srv.client.base_url, keep_cookies=False)

    async def get(self, code: str | None = None, *, cookie: bool = True) -> Response:
        path = PAGE_PATH if code is None else f"{PAGE_PATH}?code={quote(code)}"
        headers = {"Cookie": f"login_token_pair_csrf={self.cookie}"} if cookie and self.cookie else {}
        return await self.client.request("GET", path, headers=self._from(headers))

    def _from(self, headers: dict[str, str]) -> dict[str, str]:
        return headers if self.address is None else {**headers, "X-Forwarded-For": self.address}

    async def open(self, code: str) -> Response:
        """GET the page for ``code``: the decide step, whose form token (and cookie) this browser keeps."""
        answer = await self.get(code)
        assert answer.code == 200, answer
        if "set-cookie" in answer.headers:
            match = COOKIE_RE.match(answer.headers["set-cookie"])
            assert match, answer.headers["set-cookie"]
            self.cookie = match.group(1)
        self.token = form_token(answer)
        assert self.token == self.cookie
        return answer

    async def post_raw(self, body: bytes, cookie: str | None = OWN_COOKIE) -> Response:
        """POST ``body`` with this browser's cookie, another value, or (None) no cookie."""
        cookie = self.cookie if cookie is OWN_COOKIE else cookie
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if cookie is not None:
            headers["Cookie"] = f"login_token_pair_csrf={cookie}"
        return await self.client.request("POST", PAGE_PATH, raw_body=body, headers=self._from(headers))

    def fields(self, code: str, action: str = "approve", **more: str) -> dict[str, str]:
        """A form as the page's own: the token, the code, alice and her password."""
        return {
            "csrf_token": self.token,
            "code": code,
            "user": "alice",
            "password": PASSWORD,
            "action": action,
            **more,
        }

    async def post(self, fields: dict[str, str], cookie: str | None = OWN_COOKIE) -> Response:
        return await self.post_raw(urlencode(fields).encode(), cookie)

    async def submit(self, code: str, action: str = "approve", **more: str) -> Response:
        return await self.post(self.fields(code, action, **more))


def text(response: Response) -> str:
    assert isinstance(response.body, bytes), response
    return response.body.decode("utf-8")


def form_token(response: Response) -> str:
    match = CSRF_RE.search(text(response))
    assert match, text(response)
    return match.group(1)


def message(response: Response) -> tuple[str, str]:
    """The page's message: (its class, its text as the browser shows it)."""
    match = MESSAGE_RE.search(text(response))
    assert match, text(response)
    return match.group(1), html.unescape(match.group(2))


def assert_page(response: Response, status: int, said: str | None, kind: str = "error") -> str:
    """An answer of the page: ``status``, its headers, and the message ``said`` (None: no message)."""
    assert response.code == status, (response.code, text(response))
    for name, value in PAGE_HEADERS.items():
        assert response.headers[name] == value, name
    body = text(response)
    assert body.startswith("<!DOCTYPE html>") and body.rstrip().endswith("</html>")
    if said is None:
        assert 'id="message"' not in body
    else:
        assert message(response) == (kind, said)
    return body


def step(response: Response) -> str:
    """Which step the page shows: the code entry form, the decide form, or a result."""
    body = text(response)
    if '<form method="get"' in body:
        return "enter"
    if '<form method="post"' in body:
        return "decide"
    return "result"


def assert_refused(response: Response, status: int, said: str) -> None:
    assert_page(response, status, said)
    assert step(response) == "enter"
    assert "set-cookie" not in response.headers


# -- fixtures --------------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def srv(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    async with running(tmp_path, config(), users=("alice", "bob")) as server:
        yield server


@pytest.fixture
def clock(srv: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> Clock:
    return hold_clock(srv, monkeypatch)


@pytest.fixture
def page(srv: InProcessServer, clock: Clock) -> Page:
    return Page(srv, clock)


@pytest.fixture
def checks(srv: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> PasswordChecks:
    return count_password_checks(srv, monkeypatch)


async def started_pairing(page: Page, name: str | None = "Living-room TV") -> dict[str, Any]:
    started = await start(page.srv.client, name)
    await page.open(started["user_code"])
    return started


async def still_pending(page: Page, started: dict[str, Any]) -> None:
    page.clock.advance(1)  # past interval_ms: a poll is never refused for speed here
    answer = await poll(page.srv.client, started["pairing_id"])
    assert answer.json == {"status": "pending"}, answer


def logging_out(client: HttpClient, access: str) -> Callable[[], Awaitable[None]]:
    """The device that ``access`` belongs to, logging out (through ``/logout``)."""

    async def log_out() -> None:
        assert (await client.post("/_matrix/client/v3/logout", {}, access)).code == 200

    return log_out


async def denied_by_bob(srv: InProcessServer, code: str) -> Callable[[], Awaitable[None]]:
    """Bob, signed in on another device, denying ``code`` (through ``pair/deny``)."""
    bob = await srv.client.access_token("bob")

    async def deny() -> None:
        denied = await srv.client.post(DENY_PATH, {"user_code": code}, bob)
        assert denied.code == 200, denied

    return deny


def events(audit_log: AuditRecords) -> list[tuple[str, str]]:
    return [(record.audit["event"], record.audit["outcome"]) for record in audit_log.records]  # type: ignore[attr-defined]


# -- GET: the form and its token -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_form_sets_one_strict_cookie_and_repeats_it_in_the_form(page: Page) -> None:
    started = await start(page.srv.client)
    first = await page.get(started["user_code"])
    assert_page(first, 200, None)
    assert step(first) == "decide"
    cookie = first.headers["set-cookie"]
    token = COOKIE_RE.match(cookie)
    assert token, cookie
    assert cookie == (
        f"login_token_pair_csrf={token.group(1)}; Path={PAGE_PATH}; Max-Age=3600; HttpOnly; SameSite=strict"
    )
    assert form_token(first) == token.group(1)
    # The browser sends it back: the same token, and no new cookie.
    page.cookie = token.group(1)
    again = await page.get(started["user_code"])
    assert "set-cookie" not in again.headers
    assert form_token(again) == page.cookie
    # A cookie that is not one of ours (wrong length) is replaced.
    page.cookie = "x" * 42
    replaced = await page.get(started["user_code"])
    assert COOKIE_RE.match(replaced.headers["set-cookie"])
    assert form_token(replaced) not in (page.cookie, token.group(1))


# -- POST: the double-submit token -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_form_without_its_cookie_and_token_is_refused_and_decides_nothing(
    page: Page, checks: PasswordChecks, audit_log: AuditRecords
) -> None:
    started = await started_pairing(page)
    fields = page.fields(started["user_code"])
    other = "A" * 43
    for form, cookie in (
        ({k: v for k, v in fields.items() if k != "csrf_token"}, page.cookie),  # no field
        ({**fields, "csrf_token": ""}, page.cookie),  # an empty field
        (fields, None),  # no cookie (the form of another site)
        ({**fields, "csrf_token": ""}, ""),  # an empty field and an empty cookie
        ({**fields, "csrf_token": other}, page.cookie),  # another token
        ({**fields, "csrf_token": page.token[:-1]}, page.cookie),  # nearly the token
        ({**fields, "csrf_token": other}, other[:-1]),  # neither ours, of different lengths
    ):
        answer = await page.post(form, cookie)
        assert_refused(answer, 403, FORGED)
    assert checks.count == 0
    assert events(audit_log) == [("pair_start", "started")]
    await still_pending(page, started)
    # The same browser's own form goes through.
    assert (await page.submit(started["user_code"])).code == 200


# -- POST: bad, oversized and hostile forms ---------------------------------------------------


def _body(fields: list[tuple[str, str]]) -> bytes:
    return urlencode(fields).encode()


@pytest_twisted.ensureDeferred
async def test_unreadable_forms_are_refused_before_any_work(
    page: Page, checks: PasswordChecks, audit_log: AuditRecords
) -> None:
    started = await started_pairing(page)
    code = started["user_code"]
    good = list(page.fields(code).items())
    marker = "<script>alert(1)</script>"
    bodies = {
        "over 8 KiB": _body([*good, ("pad", "x" * 8192)]),
        "raw non-ASCII byte": _body(good) + b"&x=\xff",
        "percent-encoded non-UTF-8": _body(good) + b"&x=%FF",
        "UTF-8 of a lone surrogate": _body(good) + b"&x=%ED%A0%80",
        "eleven fields": _body([*good, *((f"f{i}", "1") for i in range(6))]),
        "a repeated field": _body([*good, ("user", "alice")]),
        "a repeated field, one blank": _body([*good, ("user", "")]),
        "a repeated csrf token": _body([*good, ("csrf_token", page.token)]),
        "NUL in a value": _body([*good, ("x", "a\x00b")]),
        "NUL in a name": _body([*good, ("a\x00b", "x")]),
        "no action": _body([(k, v) for k, v in good if k != "action"]),
        "another action": _body([(k, v if k != "action" else marker) for k, v in good]),
        "an action in capitals": _body([(k, v if k != "action" else "APPROVE") for k, v in good]),
        "a password over 1024 characters": _body(
            [(k, v if k != "password" else "p" * 1025) for k, v in good]
        ),
    }
    for name, body in bodies.items():
        answer = await page.post_raw(body)
        assert_refused(answer, 400, FORM_UNREADABLE)
        assert "alert" not in text(answer), name
    assert checks.count == 0
    assert events(audit_log) == [("pair_start", "started")]
    await still_pending(page, started)


@pytest_twisted.ensureDeferred
async def test_the_largest_readable_form_is_read_whole(page: Page, checks: PasswordChecks) -> None:
    """8 KiB exactly, ten fields, a 1024-character password: read, and read to its last byte."""
    started = await started_pairing(page)
    fields = page.fields(started["user_code"], password="p" * 1024)
    order = ["pad", "csrf_token", "code", "user", "password", "f1", "f2", "f3", "f4", "action"]
    extra = {"f1": "", "f2": "", "f3": "", "f4": ""}
    head = urlencode([(name, {**fields, **extra}.get(name, "")) for name in order[1:]])
    pad = "x" * (8192 - len(head) - len("pad=&"))
    body = f"pad={pad}&{head}".encode()
    assert len(body) == 8192 and body.endswith(b"action=approve")
    wrong = await page.post_raw(body)
    # Read whole: the password (1024 characters, allowed) was checked, and was wrong.
    assert_page(wrong, 403, WRONG_USER_OR_PASSWORD)
    assert checks.count == 1
    right = body.replace(
        urlencode({"password": "p" * 1024}).encode(), urlencode({"password": PASSWORD}).encode()
    )
    right = right.replace(b"pad=", b"pad=" + b"x" * (8192 - len(right)), 1)
    assert len(right) == 8192
    assert_page(
        await page.post_raw(right), 200, f"Approved. Living-room TV signs in as {USER} in a moment.", "done"
    )


# -- POST: who signs in ---------------------------------------------------------------------------


@pytest.mark.parametrize("typed", ["alice", "  ALICE  ", "@alice:test.local", " @Alice:test.local "])
@pytest_twisted.ensureDeferred
async def test_the_user_id_may_be_typed_as_a_localpart_or_in_full(page: Page, typed: str) -> None:
    started = await started_pairing(page)
    answer = await page.submit(started["user_code"], user=typed)
    assert_page(answer, 200, f"Approved. Living-room TV signs in as {USER} in a moment.", "done")
    assert step(answer) == "result"
    page.clock.advance(1)
    delivered = await poll(page.srv.client, started["pairing_id"])
    assert delivered.json["user_id"] == USER


@pytest_twisted.ensureDeferred
async def test_a_user_id_that_cannot_be_ours_checks_no_password_and_says_only_wrong(
    page: Page, checks: PasswordChecks, audit_log: AuditRecords
) -> None:
    started = await started_pairing(page)
    code = started["user_code"]
    marker = '<b>"x"</b>'
    for typed in (
        "",
        "   ",
        "@",
        "@:test.local",
        "@alice",
        "@alice:elsewhere",
        "@alice:TEST.LOCAL",
        "@alice:test.local:8448",
        "ali:ce",
        "ali\tce",
        "ali\u202ece",
        "a" * 256,
        "@" + "a" * 256 + ":test.local",
        "@" + marker + ":elsewhere",
    ):
        answer = await page.submit(code, user=typed)
        body = assert_page(answer, 403, WRONG_USER_OR_PASSWORD)
        # The form comes back for another try: the same code, what was typed (escaped, cut to 255).
        assert step(answer) == "decide"
        assert form_token(answer) == page.token
        assert f'<dd class="code">{code}</dd>' in body
        assert f'value="{escape(typed[:255])}"' in body, typed
        assert "<b>" not in body
    assert checks.count == 0
    assert events(audit_log) == [("pair_start", "started")]
    # As long a localpart as may be (255) is a user id: checked, unknown, refused the same way.
    # As long a localpart as may be (255), or any printable one, is a user id: checked
    # (unknown here), and refused in the same words; so is bob with a wrong password.
    for typed, password in (("a" * 255, PASSWORD), (marker, PASSWORD), ("@bob:test.local", "wrong")):
        answer = await page.submit(code, user=typed, password=password)
        body = assert_page(answer, 403, WRONG_USER_OR_PASSWORD)
        assert f'value="{escape(typed)}"' in body and "<b>" not in body
    assert checks.count == 3
    await still_pending(page, started)


# -- POST: the password, approving and denying ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_shows_the_form_again_and_then_the_right_one_approves(
    page: Page, checks: PasswordChecks, audit_log: AuditRecords
) -> None:
    started = await started_pairing(page)
    code, asked_at = started["user_code"], page.clock.now
    for password in ("wrong", "", PASSWORD + " ", "p" * 1024):
        answer = await page.submit(code, password=password, user="@alice:test.local")
        body = assert_page(answer, 403, WRONG_USER_OR_PASSWORD)
        assert step(answer) == "decide"
        assert f'<dd class="code">{code}</dd>' in body and "<dd>Living-room TV</dd>" in body
        assert "<dd>127.0.0.1</dd>" in body
        assert f"<dd>{int(page.clock.now - asked_at)} seconds ago</dd>" in body
        assert 'value="@alice:test.local"' in body
        # The password is never sent back: its field comes back empty.
        assert '<input type="password" id="password" name="password" autocomplete="current-password"' in body
        assert body.count("value=") == 5 and (not password.strip() or password not in body), password
        if password == "p" * 1024:
            break
        page.clock.advance(10)  # the failed-password limit (3, then one per 6 s) is not what this tests
        await still_pending(page, started)
    assert checks.count == 4
    assert [event for event in events(audit_log) if event[0] != "pair_start"] == []
    page.clock.advance(10)
    approved = await page.submit(code)
    assert_page(approved, 200, f"Approved. Living-room TV signs in as {USER} in a moment.", "done")
    assert step(approved) == "result"
    assert "set-cookie" not in approved.headers


@pytest_twisted.ensureDeferred
async def test_approving_on_the_page_delivers_a_token_to_the_waiting_device(
    page: Page, audit_log: AuditRecords
) -> None:
    started = await started_pairing(page, name=None)
    await still_pending(page, started)
    page.clock.advance(61)  # "1 minute ago" on the page
    shown = await page.get(started["user_code"])
    assert "<dd>1 minute ago</dd>" in text(shown) and "<dd>(no name given)</dd>" in text(shown)
    approved = await page.submit(started["user_code"].lower().replace("-", ""))
    assert_page(approved, 200, f"Approved. The new device signs in as {USER} in a moment.", "done")
    page.clock.advance(1)
    delivered = await poll(page.srv.client, started["pairing_id"])
    assert delivered.code == 200, delivered
    token = delivered.json["login_token"]
    assert delivered.json == {
        "status": "approved",
        "login_token": token,
        "expires_in_ms": 120_000 - 1000,
        "user_id": USER,
    }
    login = await page.srv.client.token_login(token)
    assert login.code == 200 and login.json["user_id"] == USER, login
    # Approved once: the same form again finds no waiting device.
    again = await page.submit(started["user_code"])
    assert_refused(again, 404, NO_SUCH_CODE)
    assert events(audit_log) == [
        ("pair_start", "started"),
        ("issue", "issued"),
        ("pair_approve", "approved"),
        ("pair_deliver", "delivered"),
        ("spend", "spent"),
    ]
    (issued,) = audit_log.of("issue")
    (approval,) = audit_log.of("pair_approve")
    fingerprint = audit.fingerprint(token)
    assert (issued["user_id"], issued["minted_by_device"], issued["client_address"]) == (
        USER,
        None,
        "127.0.0.1",
    )
    assert issued["token_fingerprint"] == fingerprint
    assert approval["user_id"] == USER and approval["minted_by_device"] is None
    assert (approval["client_address"], approval["new_device_address"]) == ("127.0.0.1", "127.0.0.1")
    assert approval["token_fingerprint"] == fingerprint
    [entry] = await page.srv.module.store.lineage(USER)
    assert (entry.paired, entry.outcome, entry.minted_by_device) == (True, "spent", None)
    assert entry.issued_at_ms == page.clock.ms - 1000
    assert all(token not in record.getMessage() for record in audit_log.records)
    assert all(PASSWORD not in record.getMessage() for record in audit_log.records)


@pytest_twisted.ensureDeferred
async def test_denying_on_the_page_mints_nothing_and_tells_the_device(
    page: Page, checks: PasswordChecks, audit_log: AuditRecords
) -> None:
    started = await started_pairing(page)
    code = started["user_code"]
    # Denying asks for the password too: without it, nothing changes.
    wrong = await page.submit(code, "deny", password="wrong")
    assert_page(wrong, 403, WRONG_USER_OR_PASSWORD)
    assert step(wrong) == "decide"
    await still_pending(page, started)
    denied = await page.submit(code, "deny")
    assert_page(denied, 200, "Denied. The device was not signed in.", "done")
    assert step(denied) == "result"
    assert checks.count == 2
    page.clock.advance(1)
    assert (await poll(page.srv.client, started["pairing_id"])).json == {"status": "denied"}
    assert await page.srv.module.store.count_tokens() == 0
    assert_refused(await page.submit(code, "deny"), 404, NO_SUCH_CODE)
    assert_refused(await page.submit(code), 404, NO_SUCH_CODE)
    assert events(audit_log) == [
        ("pair_start", "started"),
        ("pair_deny", "denied"),
        ("pair_deliver", "denied"),
    ]
    (denial,) = audit_log.of("pair_deny")
    assert (denial["user_id"], denial["minted_by_device"]) == (USER, None)
    assert (denial["client_address"], denial["new_device_address"]) == ("127.0.0.1", "127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_without_ui_auth_the_page_still_checks_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, audit_log: AuditRecords
) -> None:
    """``require_ui_auth: false`` lets get_token skip the password; the page never does."""
    async with running(tmp_path, {**config(), "require_ui_auth": False}) as srv:
        clock = hold_clock(srv, monkeypatch)
        checks = count_password_checks(srv, monkeypatch)
        page = Page(srv, clock)
        started = await started_pairing(page)
        for action in ("approve", "deny"):
            wrong = await page.submit(started["user_code"], action, password="wrong")
            assert_page(wrong, 403, WRONG_USER_OR_PASSWORD)
        assert checks.count == 2
        await still_pending(page, started)
        approved = await page.submit(started["user_code"])
        assert_page(approved, 200, f"Approved. Living-room TV signs in as {USER} in a moment.", "done")
        assert checks.count == 3
    assert [event for event, _ in events(audit_log)] == ["pair_start", "issue", "pair_approve"]


# -- POST: wrong, expired and unknown codes, and their limit ------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_wrong_or_expired_code_is_said_plainly_without_echo(
    page: Page, checks: PasswordChecks
) -> None:
    started = await started_pairing(page)
    marker = "<i>BCDF-GHJK</i>"
    for code, user in (
        ("BBBB-BBBB", "alice"),
        (marker, "alice"),
        ("", "alice"),
        ("BBBB-BBBB", "@alice:elsewhere"),
    ):
        answer = await page.submit(code, user=user)
        body = assert_page(answer, 404, NO_SUCH_CODE)
        assert step(answer) == "enter" and "<i>" not in body and "BBBB" not in body
    # A wrong code costs no password check (the code is looked at first).
    assert checks.count == 0
    page.clock.advance(600)  # the pairing's lifetime: gone
    for action in ("approve", "deny"):
        assert_refused(await page.submit(started["user_code"], action), 404, NO_SUCH_CODE)
    assert checks.count == 0


@pytest_twisted.ensureDeferred
async def test_wrong_codes_on_the_page_hit_the_limit_and_say_how_long_to_wait(
    page: Page, checks: PasswordChecks
) -> None:
    started = await started_pairing(page)
    code = started["user_code"]
    for _ in range(5):
        assert_refused(await page.submit("BBBB-BBBB"), 404, NO_SUCH_CODE)
    # Over the limit (5, then one per 20 s): even the right code waits, on every step of the page.
    limited = "Too many attempts. Wait 20 seconds, then try again."
    assert_refused(await page.submit(code), 429, limited)
    assert_refused(await page.submit(code, user="@alice:elsewhere"), 429, limited)
    assert_page(await page.get(code), 429, limited)
    page.clock.advance(19.5)
    assert_refused(await page.submit(code), 429, "Too many attempts. Wait 1 second, then try again.")
    page.clock.advance(0.5)
    assert checks.count == 0
    await still_pending(page, started)
    assert_page(
        await page.submit(code), 200, f"Approved. Living-room TV signs in as {USER} in a moment.", "done"
    )


@pytest_twisted.ensureDeferred
async def test_wrong_codes_count_against_the_user_from_any_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, audit_log: AuditRecords
) -> None:
    srv = await start_behind_proxy(tmp_path)
    try:
        for user in ("alice", "bob"):
            await srv.register(user)
        clock = hold_clock(srv, monkeypatch)
        device = await srv.client.request(
            "POST", START_PATH, json_body={}, headers={"X-Forwarded-For": "10.0.0.1"}
        )
        code = device.json["user_code"]
        page = Page(srv, clock, address="10.0.0.2")
        assert "<dd>10.0.0.1</dd>" in text(await page.open(code))
        # Before anyone signs in (the page's GET), a wrong code counts against the address
        # alone: five, each from another address, and a sixth address still finds the code.
        for n in range(1, 6):
            page.address = f"10.0.1.{n}"
            assert_refused(await page.get("BBBB-BBBB"), 404, NO_SUCH_CODE)
        page.address = "10.0.1.6"
        await page.open(code)
        for n in range(2, 7):
            page.address = f"10.0.0.{n}"
            assert_refused(await page.submit("BBBB-BBBB"), 404, NO_SUCH_CODE)
        # Five wrong codes, each from another address: alice waits wherever she is ...
        page.address = "10.0.0.7"
        limited = "Too many attempts. Wait 20 seconds, then try again."
        assert_refused(await page.submit(code), 429, limited)
        # ... and bob, from an address that typed no wrong code, does not.
        approved = await page.submit(code, user="bob")
        assert_page(
            approved, 200, "Approved. The new device signs in as @bob:test.local in a moment.", "done"
        )
    finally:
        await srv.stop()
    (approval,) = audit_log.of("pair_approve")
    assert (approval["user_id"], approval["client_address"]) == ("@bob:test.local", "10.0.0.7")
    assert approval["new_device_address"] == "10.0.0.1"
    (issued,) = audit_log.of("issue")
    assert issued["client_address"] == "10.0.0.7"


@pytest_twisted.ensureDeferred
async def test_a_second_approval_waits_for_the_get_token_allowance(page: Page) -> None:
    first, second = await started_pairing(page, "One"), await started_pairing(page, "Two")
    assert_page(
        await page.submit(first["user_code"]), 200, f"Approved. One signs in as {USER} in a moment.", "done"
    )
    limited = await page.submit(second["user_code"])
    assert_refused(limited, 429, "Too many attempts. Wait 60 seconds, then try again.")
    await still_pending(page, second)
    assert await page.srv.module.store.count_tokens() == 1
    page.clock.advance(59)
    assert_page(
        await page.submit(second["user_code"]), 200, f"Approved. Two signs in as {USER} in a moment.", "done"
    )


@pytest_twisted.ensureDeferred
async def test_wrong_passwords_on_the_page_hit_the_failed_password_limit(page: Page) -> None:
    started = await started_pairing(page)
    for _ in range(3):
        assert_page(await page.submit(started["user_code"], password="wrong"), 403, WRONG_USER_OR_PASSWORD)
    limited = await page.submit(started["user_code"])
    assert_refused(limited, 429, "Too many attempts. Wait 5 seconds, then try again.")
    await still_pending(page, started)


# -- a token minted for a pairing that cannot take it is revoked (Revocation.revoke_one) -------


async def assert_revoked(
    srv: InProcessServer, audit_log: AuditRecords, device: str | None, at_ms: int
) -> None:
    """The one token minted was revoked at ``at_ms``, and audited so (reason ``logout``)."""
    [entry] = await srv.module.store.lineage(USER)
    assert (entry.outcome, entry.finished_at_ms, entry.minted_by_device) == ("revoked", at_ms, device)
    assert entry.paired is False
    assert await srv.module.store.list_tokens(at_ms, USER) == []
    (revoked,) = audit_log.of("revoke")
    assert (revoked["user_id"], revoked["minted_by_device"], revoked["reason"]) == (USER, device, "logout")
    assert revoked["token_fingerprint"] == audit.fingerprint_of_hash(entry.token_hash)


@pytest_twisted.ensureDeferred
async def test_a_code_denied_elsewhere_while_the_password_is_checked_gets_no_token(
    page: Page, checks: PasswordChecks, audit_log: AuditRecords
) -> None:
    started = await started_pairing(page)
    checks.during_next = await denied_by_bob(page.srv, started["user_code"])
    page.clock.advance(3)
    answer = await page.submit(started["user_code"])
    # Minted under the password, then withdrawn: the pairing was no longer pending.
    assert_refused(answer, 404, NO_SUCH_CODE)
    assert [event for event, _ in events(audit_log)] == ["pair_start", "pair_deny", "issue", "revoke"]
    await assert_revoked(page.srv, audit_log, None, page.clock.ms)
    assert audit_log.of("issue")[0]["token_fingerprint"] == audit_log.of("revoke")[0]["token_fingerprint"]
    page.clock.advance(1)
    assert (await poll(page.srv.client, started["pairing_id"])).json == {"status": "denied"}


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_for_a_code_denied_meanwhile_says_the_code_is_gone(
    page: Page, checks: PasswordChecks, audit_log: AuditRecords
) -> None:
    started = await started_pairing(page)
    checks.during_next = await denied_by_bob(page.srv, started["user_code"])
    # The form cannot come back for another try: its code no longer waits.
    assert_refused(await page.submit(started["user_code"], password="wrong"), 404, NO_SUCH_CODE)
    assert [event for event, _ in events(audit_log)] == ["pair_start", "pair_deny"]


@pytest_twisted.ensureDeferred
async def test_a_token_whose_pairing_cannot_be_stored_is_revoked(
    tmp_path: Path,
    page: Page,
    checks: PasswordChecks,
    audit_log: AuditRecords,
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = await started_pairing(page)
    db = tmp_path / "tokens.db"

    checks.during_next = partial(
        threads.deferToThread, rename_table, db, "login_token_pairings", "pairings_away"
    )
    with caplog.at_level(logging.ERROR, logger="login_token_module.module"):
        answer = await page.submit(started["user_code"])
    assert_refused(answer, 500, SERVER_FAILED)
    # The operator is told, once, with the failure's traceback; the browser is not.
    failed = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [(record.levelno, record.getMessage()) for record in failed] == [
        (logging.ERROR, "Failed to answer the pairing page")
    ]
    assert failed[0].exc_info is not None and "pairings" in str(failed[0].exc_info[1])
    assert "Traceback" not in text(answer)
    await threads.deferToThread(rename_table, db, "pairings_away", "login_token_pairings")
    await assert_revoked(page.srv, audit_log, None, page.clock.ms)
    # Nothing was decided: the pairing still waits, and approves with the next form.
    await still_pending(page, started)
    page.clock.advance(60)  # the get_token allowance the failed approval took
    assert_page(
        await page.submit(started["user_code"]),
        200,
        f"Approved. Living-room TV signs in as {USER} in a moment.",
        "done",
    )


@pytest.mark.parametrize("path", [GET_TOKEN, APPROVE_PATH])
@pytest_twisted.ensureDeferred
async def test_a_token_minted_while_its_device_logs_out_is_revoked(
    page: Page, checks: PasswordChecks, audit_log: AuditRecords, path: str
) -> None:
    started = await started_pairing(page)
    login = await page.srv.client.password_login("alice", device_id="PHONE")
    access = login.json["access_token"]
    challenge = await page.srv.client.post(path, {"user_code": started["user_code"]}, access)
    assert challenge.code == 401, challenge

    checks.during_next = logging_out(page.srv.client, access)
    auth = {"type": "m.login.password", "password": PASSWORD, "session": challenge.json["session"]}
    answer = await page.srv.client.post(path, {"user_code": started["user_code"], "auth": auth}, access)
    assert answer.code == 401, answer
    assert answer.json == {
        "errcode": "M_UNKNOWN_TOKEN",
        "error": "This device logged out; no token was issued",
        "soft_logout": False,
    }
    await assert_revoked(page.srv, audit_log, "PHONE", page.clock.ms)
    assert audit_log.of("issue") == []
    await still_pending(page, started)


@pytest.mark.parametrize("path", [GET_TOKEN, APPROVE_PATH])
@pytest_twisted.ensureDeferred
async def test_without_revoke_on_logout_a_token_minted_while_its_device_logs_out_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, audit_log: AuditRecords, path: str
) -> None:
    """``revoke_on_logout: false``: the device is not asked after about, so its logout
    while the password is checked takes nothing back."""
    async with running(tmp_path, {**config(), "revoke_on_logout": False}) as srv:
        page = Page(srv, hold_clock(srv, monkeypatch))
        checks = count_password_checks(srv, monkeypatch)
        started = await started_pairing(page)
        login = await srv.client.password_login("alice", device_id="PHONE")
        access = login.json["access_token"]
        challenge = await srv.client.post(path, {"user_code": started["user_code"]}, access)
        assert challenge.code == 401, challenge

        checks.during_next = logging_out(page.srv.client, access)
        auth = {"type": "m.login.password", "password": PASSWORD, "session": challenge.json["session"]}
        answer = await srv.client.post(path, {"user_code": started["user_code"], "auth": auth}, access)
        assert answer.code == 200, answer
        assert len(audit_log.of("issue")) == 1 and audit_log.of("revoke") == []


@pytest_twisted.ensureDeferred
async def test_a_token_is_revoked_when_its_device_cannot_be_looked_up(
    tmp_path: Path, page: Page, checks: PasswordChecks, audit_log: AuditRecords
) -> None:
    login = await page.srv.client.password_login("alice", device_id="PHONE")
    access = login.json["access_token"]
    challenge = await page.srv.client.post(GET_TOKEN, {}, access)
    db = tmp_path / "homeserver.db"

    checks.during_next = partial(
        threads.deferToThread, rename_table, db, "access_tokens", "access_tokens_away"
    )
    auth = {"type": "m.login.password", "password": PASSWORD, "session": challenge.json["session"]}
    answer = await page.srv.client.post(GET_TOKEN, {"auth": auth}, access)
    await threads.deferToThread(rename_table, db, "access_tokens_away", "access_tokens")
    assert answer.code == 500 and answer.json["errcode"] == "M_UNKNOWN", answer
    await assert_revoked(page.srv, audit_log, "PHONE", page.clock.ms)
    assert audit_log.of("issue") == []


@pytest_twisted.ensureDeferred
async def test_where_the_host_mints_a_withdrawn_token_is_invalidated_at_the_host(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, audit_log: AuditRecords
) -> None:
    made: list[MintingHostApi] = request.getfixturevalue("host_api")  # every ModuleApi the host makes
    srv = await start_minting_host(tmp_path, **config())
    try:
        (api,) = made
        await srv.register("bob")
        clock = hold_clock(srv, monkeypatch)
        checks = count_password_checks(srv, monkeypatch)
        page = Page(srv, clock)
        started = await started_pairing(page)
        checks.during_next = await denied_by_bob(srv, started["user_code"])
        assert_refused(await page.submit(started["user_code"]), 404, NO_SUCH_CODE)
        [entry] = await srv.module.minted.lineage(USER)
        # The host was asked to invalidate exactly that token of alice's, and did.
        assert api.invalidations == [(USER, frozenset({entry.token_hash}))]
        assert api.tokens == {}
        assert (entry.outcome, entry.finished_at_ms) == ("revoked", clock.ms)
        (revoked,) = audit_log.of("revoke")
        assert (revoked["user_id"], revoked["reason"]) == (USER, "logout")
        assert revoked["token_fingerprint"] == audit.fingerprint_of_hash(entry.token_hash)
    finally:
        await srv.stop()


@pytest.mark.parametrize("device", ["logs_out", "cannot_be_looked_up"])
@pytest_twisted.ensureDeferred
async def test_where_the_host_mints_a_token_withdrawn_by_its_device_check_is_invalidated_there(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    made: list[MintingHostApi] = request.getfixturevalue("host_api")  # every ModuleApi the host makes
    srv = await start_minting_host(tmp_path, **config())
    try:
        (api,) = made
        checks = count_password_checks(srv, monkeypatch)
        login = await srv.client.password_login("alice", device_id="PHONE")
        access = login.json["access_token"]
        challenge = await srv.client.post(GET_TOKEN, {}, access)

        db = tmp_path / "homeserver.db"

        checks.during_next = (
            logging_out(srv.client, access)
            if device == "logs_out"
            else partial(threads.deferToThread, rename_table, db, "access_tokens", "access_tokens_away")
        )
        auth = {"type": "m.login.password", "password": PASSWORD, "session": challenge.json["session"]}
        answer = await srv.client.post(GET_TOKEN, {"auth": auth}, access)
        if device == "logs_out":
            assert answer.code == 401 and answer.json["errcode"] == "M_UNKNOWN_TOKEN", answer
        else:
            await threads.deferToThread(rename_table, db, "access_tokens_away", "access_tokens")
            assert answer.code == 500 and answer.json["errcode"] == "M_UNKNOWN", answer
        [entry] = await srv.module.minted.lineage(USER)
        # The host was asked to invalidate that token, as alice's.
        assert (USER, frozenset({entry.token_hash})) in api.invalidations
        assert api.tokens == {}
    finally:
        await srv.stop()


# -- the password checks' queue ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_form_past_the_password_queue_is_told_to_come_back_not_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One bcrypt thread and nobody may wait: a second form while a first is checked is
    refused at once with 429, as the JSON endpoints refuse it, not a 500 and a traceback."""
    srv = await start_in_process(
        tmp_path,
        {"store": {"type": "sqlite", "path": "tokens.db"}, **config()},
        bcrypt_threads=1,
        bcrypt_max_queued=0,
    )
    try:
        for user in ("alice", "bob"):
            await srv.register(user)
        clock = hold_clock(srv, monkeypatch)
        checks = count_password_checks(srv, monkeypatch)
        alice, bob = Page(srv, clock), Page(srv, clock)
        first, second = await started_pairing(alice, "One"), await started_pairing(bob, "Two")
        # Alice's check holds the one place in the queue until bob's form has been answered.
        queue, answered = srv.hs.hasher.queue, defer.Deferred[None]()
        admit = queue.run

        async def run_when_answered(job: Callable[[], Awaitable[Any]]) -> Any:
            async def held() -> Any:
                await answered
                return await job()

            return await admit(held)

        monkeypatch.setattr(queue, "run", run_when_answered)
        busy: list[Response] = []

        async def bob_submits() -> None:
            assert queue.in_flight == 1
            busy.append(await bob.submit(second["user_code"], user="bob"))
            answered.callback(None)

        checks.during_next = bob_submits
        approved = await alice.submit(first["user_code"])
        assert_page(approved, 200, f"Approved. One signs in as {USER} in a moment.", "done")
        assert_refused(busy[0], 429, "The server is busy; wait a moment, then try again.")
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
        # Refused before any work: bob's code still waits, and his next form approves it.
        await still_pending(bob, second)
        retried = await bob.submit(second["user_code"], user="bob")
        assert_page(retried, 200, "Approved. Two signs in as @bob:test.local in a moment.", "done")
    finally:
        await srv.stop()


@pytest.mark.parametrize(
    ("milliseconds", "shown"),
    [
        (-5_000, "0 seconds ago"),  # a clock that went back
        (999, "0 seconds ago"),
        (1_000, "1 second ago"),
        (1_999, "1 second ago"),
        (2_000, "2 seconds ago"),
        (59_999, "59 seconds ago"),
        (60_000, "1 minute ago"),
        (119_999, "1 minute ago"),
        (120_000, "2 minutes ago"),
        (3_599_000, "59 minutes ago"),
        (7_260_000, "121 minutes ago"),
    ],
)
def test_the_page_says_how_long_ago_a_device_asked_in_whole_units(milliseconds: int, shown: str) -> None:
    assert _ago(milliseconds) == shown


# -- GET and HEAD: the bare page, the form's fields, the answer's length -------------------------


def raw_answer(
    srv: InProcessServer, method: str, path: str, cookie: str = ""
) -> Awaitable[tuple[int, dict[str, str], bytes]]:
    """``method`` on ``path`` by Python's own HTTP/1.1 client (in a thread): the status,
    every header as sent (treq's agent keeps Content-Length to itself) and the body."""

    def ask() -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(urlsplit(srv.client.base_url).netloc, timeout=10)
        try:
            connection.request(
                method, path, headers={"Cookie": f"login_token_pair_csrf={cookie}"} if cookie else {}
            )
            answer = connection.getresponse()
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        finally:
            connection.close()

    return threads.deferToThread(ask)


async def assert_sized(page: Page, path: str, cookie: str = "") -> bytes:
    """GET and HEAD of ``path``: both say the GET body's length (no chunked encoding),
    and HEAD sends the page's headers without the body."""
    status, headers, body = await raw_answer(page.srv, "GET", path, cookie)
    assert status == 200 and headers["content-length"] == str(len(body)), headers
    assert "transfer-encoding" not in headers
    status, head, nothing = await raw_answer(page.srv, "HEAD", path, cookie)
    assert (status, nothing, head["content-length"]) == (200, b"", str(len(body))), head
    assert "transfer-encoding" not in head
    for name, value in PAGE_HEADERS.items():
        assert head[name] == value, name
    return body


@pytest_twisted.ensureDeferred
async def test_the_bare_page_asks_for_a_code_and_sets_no_cookie(page: Page) -> None:
    bare = await page.get()
    body = assert_page(bare, 200, None)
    assert step(bare) == "enter"
    assert f'<form method="get" action="{PAGE_PATH}">' in body
    assert "set-cookie" not in bare.headers
    assert await assert_sized(page, PAGE_PATH) == bare.body


@pytest_twisted.ensureDeferred
async def test_the_decide_form_posts_to_the_page_and_starts_with_no_user(page: Page) -> None:
    started = await start(page.srv.client)
    await page.open(started["user_code"])
    shown = await page.get(started["user_code"])
    body = assert_page(shown, 200, None)
    assert step(shown) == "decide"
    assert f'<form method="post" action="{PAGE_PATH}">' in body
    assert 'placeholder="@you:test.local" value="" required>' in body
    path = f"{PAGE_PATH}?code={quote(started['user_code'])}"
    assert await assert_sized(page, path, page.cookie) == shown.body


@pytest_twisted.ensureDeferred
async def test_a_repeated_or_undecodable_code_in_the_url_is_a_wrong_code(page: Page) -> None:
    started = await start(page.srv.client)
    code = quote(started["user_code"])
    for query in (f"code={code}&code={code}", "code=%FF", f"code={code}%FF"):
        answer = await page.client.request("GET", f"{PAGE_PATH}?{query}")
        assert_refused(answer, 404, NO_SUCH_CODE)
    # Each was counted as a wrong code (5, then one per 20 s): two more, and the page waits.
    for _ in range(2):
        assert_refused(await page.get("BBBB-BBBB"), 404, NO_SUCH_CODE)
    limited = "Too many attempts. Wait 20 seconds, then try again."
    assert_page(await page.get(started["user_code"]), 429, limited)


@pytest_twisted.ensureDeferred
async def test_an_oversized_form_is_read_no_further_than_one_byte_past_the_limit(
    srv: InProcessServer,
) -> None:
    """Not visible over HTTP (Twisted has the whole body by then, in memory or a file):
    of a large body, the page reads 8 KiB and one byte, enough to refuse it, no more."""
    resource = PairPageResource(srv.module.pairings, "test.local", lambda: 0.0)
    request = Request(DummyChannel())
    request.method = b"POST"
    request.content = io.BytesIO(b"pad=" + b"x" * (4 * MAX_FORM_BYTES))
    assert resource._form(request) is None
    assert request.content.tell() == MAX_FORM_BYTES + 1


# -- POST: a form without some of its fields --------------------------------------------------


def without(fields: dict[str, str], left_out: str) -> dict[str, str]:
    """``fields`` with one of them left out, as a client that never sent it."""
    return {name: value for name, value in fields.items() if name != left_out}


@pytest_twisted.ensureDeferred
async def test_a_form_without_its_user_or_password_is_a_wrong_user_or_password(
    page: Page, checks: PasswordChecks
) -> None:
    started = await started_pairing(page)
    fields = page.fields(started["user_code"])
    no_user = without(fields, "user")
    answer = await page.post(no_user)
    body = assert_page(answer, 403, WRONG_USER_OR_PASSWORD)
    assert step(answer) == "decide" and 'value="" required>' in body
    assert checks.count == 0  # no user named: no password checked
    no_password = without(fields, "password")
    assert_page(await page.post(no_password), 403, WRONG_USER_OR_PASSWORD)
    assert checks.count == 1
    # Nor is a missing password taken for any value: not even that of a user whose password it is.
    await page.srv.register("carol", "XXXX")
    assert_page(await page.post({**no_password, "user": "carol"}), 403, WRONG_USER_OR_PASSWORD)
    await still_pending(page, started)


@pytest_twisted.ensureDeferred
async def test_a_form_without_its_token_is_refused_whatever_the_cookie(
    page: Page, checks: PasswordChecks
) -> None:
    started = await started_pairing(page)
    fields = page.fields(started["user_code"])
    no_token = without(fields, "csrf_token")
    for cookie in ("XXXX", "None", "A" * 43):
        assert_refused(await page.post(no_token, cookie), 403, FORGED)
    assert checks.count == 0
    await still_pending(page, started)


# -- POST: who signs in, on a server whose name has a port -------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_full_user_id_is_read_on_a_server_whose_name_has_a_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = await start_in_process(
        tmp_path,
        {"store": {"type": "sqlite", "path": "tokens.db"}, **config()},
        server_name="test.local:8448",
    )
    try:
        await srv.register("alice")
        page = Page(srv, hold_clock(srv, monkeypatch))
        first, second = await started_pairing(page, "One"), await started_pairing(page, "Two")
        user = "@alice:test.local:8448"
        wrong = await page.submit(first["user_code"], user="@alice:test.local")
        assert_page(wrong, 403, WRONG_USER_OR_PASSWORD)
        approved = await page.submit(first["user_code"], user=user)
        assert_page(approved, 200, f"Approved. One signs in as {user} in a moment.", "done")
        denied = await page.submit(second["user_code"], "deny", user=f" {user} ")
        assert_page(denied, 200, "Denied. The device was not signed in.", "done")
    finally:
        await srv.stop()


# -- POST: a wrong password where UIA sessions are shared between workers ------------------------


@pytest.mark.parametrize("require_ui_auth", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_wrong_password_on_the_page_with_shared_state_shows_the_form_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, require_ui_auth: bool
) -> None:
    """A wrong password opens a UIA session (as a wrong password in UIA does), kept in the
    database when workers share state: the page's, named as such, never a failure."""
    store = {"type": "sqlite", "path": "tokens.db", "shared_state": True}
    async with running(tmp_path, {"store": store, **config(), "require_ui_auth": require_ui_auth}) as srv:
        page = Page(srv, hold_clock(srv, monkeypatch))
        started = await started_pairing(page)
        for action in ("approve", "deny"):
            wrong = await page.submit(started["user_code"], action, password="wrong")
            assert_page(wrong, 403, WRONG_USER_OR_PASSWORD)
            assert step(wrong) == "decide"
        await still_pending(page, started)
        assert_page(
            await page.submit(started["user_code"]),
            200,
            f"Approved. Living-room TV signs in as {USER} in a moment.",
            "done",
        )


# -- wrong codes met after a wrong password count against the address ---------------------------


@pytest_twisted.ensureDeferred
async def test_a_code_denied_while_a_wrong_password_is_checked_counts_against_the_address(
    page: Page, checks: PasswordChecks
) -> None:
    """The form comes back after a wrong password only if its code still waits; looking
    again and finding it gone is a wrong code of the browser's address, as any other."""
    for user in ("alice", "alice", "alice", "bob", "bob"):  # three failed passwords each at most
        started = await started_pairing(page)
        checks.during_next = await denied_by_bob(page.srv, started["user_code"])
        assert_refused(
            await page.submit(started["user_code"], user=user, password="wrong"), 404, NO_SUCH_CODE
        )
    waiting = await start(page.srv.client)
    limited = await page.get(waiting["user_code"])
    assert_page(limited, 429, "Too many attempts. Wait 20 seconds, then try again.")


# -- a token whose pairing cannot be stored is invalidated where the host mints ---------------------


@pytest_twisted.ensureDeferred
async def test_where_the_host_mints_a_token_whose_pairing_cannot_be_stored_is_invalidated_at_the_host(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that mints the tokens and lends the module its database (as Synapse does):
    the pairing's table goes missing while the password is checked."""
    made: list[LendingHostApi] = request.getfixturevalue("lending_host_api")
    srv = await start_minting_host(tmp_path, **config())
    try:
        (api,) = made
        page = Page(srv, hold_clock(srv, monkeypatch))
        checks = count_password_checks(srv, monkeypatch)
        started = await started_pairing(page)
        db = tmp_path / "lent.db"

        checks.during_next = partial(
            threads.deferToThread, rename_table, db, "login_token_pairings", "pairings_away"
        )
        assert_refused(await page.submit(started["user_code"]), 500, SERVER_FAILED)
        await threads.deferToThread(rename_table, db, "pairings_away", "login_token_pairings")
        [entry] = await srv.module.minted.lineage(USER)
        # The host was asked to invalidate exactly that token of alice's, and did.
        assert api.invalidations == [(USER, frozenset({entry.token_hash}))]
        assert api.tokens == {}
        assert (entry.outcome, entry.finished_at_ms) == ("revoked", page.clock.ms)
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_a_page_whose_database_is_away_says_so_and_works_when_it_is_back(
    tmp_path: Path, own_pg_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's server stopped: the page is a 503 saying so (not a 500 and a traceback),
    on the way in (GET with a code) and on a posted form; started again, it serves."""
    database = own_pg_cluster.create_database()
    async with running(tmp_path, {"store": {"type": "postgres", "dsn": database.dsn}, **config()}) as srv:
        page = Page(srv, hold_clock(srv, monkeypatch))
        started = await started_pairing(page)
        await threads.deferToThread(own_pg_cluster.stop, "fast")
        away = "The server cannot reach its database; try again shortly."
        assert_refused(await page.get(started["user_code"]), 503, away)
        assert_refused(await page.submit(started["user_code"]), 503, away)
        await threads.deferToThread(own_pg_cluster.start)
        assert step(await page.open(started["user_code"])) == "decide"
        approved = await page.submit(started["user_code"])
        assert_page(approved, 200, f"Approved. Living-room TV signs in as {USER} in a moment.", "done")


@pytest_twisted.ensureDeferred
async def test_a_refusal_the_page_has_no_words_for_is_said_generically_with_its_status(
    page: Page, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host may refuse a password check outright (Synapse does, for a deactivated
    account): the page passes the status on, says only to start again, and decides nothing."""
    started = await started_pairing(page)

    async def refuse(password: str, password_hash: str | None) -> bool:
        raise MatrixError(403, "M_USER_DEACTIVATED", "This account has been deactivated")

    monkeypatch.setattr(page.srv.hs.hasher, "check", refuse)
    answer = await page.submit(started["user_code"])
    assert_refused(answer, 403, "This could not be done; start again.")
    assert "deactivated" not in text(answer)
    await still_pending(page, started)
