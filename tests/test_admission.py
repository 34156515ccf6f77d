"""Admit, then work; check before spending: the host's side of hostile input.

- A login whose new device cannot be created after its token was spent gives the
  token back (every state backend can make a spent token live again, once).
- bcrypt runs behind a bounded queue: past it, a password check is refused at once
  with 429 instead of waiting behind everyone else's.
- A request must arrive whole within ``request_timeout_ms``: a client that dribbles
  its headers or body is dropped, not kept for ever.
- Methods are case-sensitive: ``gEt`` is not GET.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from login_token_module.admission import BoundedQueue
from login_token_module.errors import ServerBusyError
from login_token_module.safe_text import escaped, logfmt_value, printable
from login_token_module.stores import StateBackend, TokenSpend
from tests.helpers import (
    GET_TOKEN,
    LOGIN,
    AuditRecords,
    InProcessServer,
    rename_table,
    running,
    start_in_process,
)
from tests.test_host_minting import store_timings

HASH = b"\x01" * 32


@pytest_twisted.ensureDeferred
async def test_a_spent_token_can_be_given_back_once(backend: StateBackend) -> None:
    store = backend.tokens
    await store.add_token(HASH, "@alice:test", 10_000, device_id="PHONE", issued_at_ms=1_000)
    spend = await store.spend_token(HASH, 2_000)
    assert spend == TokenSpend("spent", "@alice:test", "PHONE")
    assert (spend.expires_at_ms, spend.issued_at_ms) == (10_000, 1_000)
    assert await store.unspend_token(HASH, spend) is True
    # Live again, as it was: listed, and spent by the next login.
    listed = await store.list_tokens(2_000, "@alice:test")
    assert [
        (info.user_id, info.minted_by_device, info.issued_at_ms, info.expires_at_ms) for info in listed
    ] == [("@alice:test", "PHONE", 1_000, 10_000)]
    [entry] = await store.lineage("@alice:test")
    assert (entry.outcome, entry.finished_at_ms, entry.new_device_id) == (None, None, None)
    assert await store.spend_token(HASH, 3_000) == TokenSpend("spent", "@alice:test", "PHONE")
    [entry] = await store.lineage("@alice:test")
    assert (entry.outcome, entry.finished_at_ms) == ("spent", 3_000)


@pytest_twisted.ensureDeferred
async def test_only_a_spend_can_be_given_back(backend: StateBackend) -> None:
    store = backend.tokens
    await store.add_token(HASH, "@alice:test", 10_000, device_id="PHONE", issued_at_ms=1_000)
    # A refusal spent nothing: nothing to give back.
    for refused in (TokenSpend("unknown"), TokenSpend("reused", "@alice:test", "PHONE")):
        assert await store.unspend_token(HASH, refused) is False
    # A token still live is not given back twice.
    spent = TokenSpend("spent", "@alice:test", "PHONE", 10_000, 1_000)
    assert await store.unspend_token(HASH, spent) is False
    spend = await store.spend_token(HASH, 2_000)
    # Only a spend that says whose token it was and until when can be given back; a
    # refusal that names them (a reuse does) is still a refusal.
    for not_a_spend in (
        TokenSpend("reused", "@alice:test", "PHONE", 10_000, 1_000),
        TokenSpend("spent", None, "PHONE", 10_000, 1_000),
        TokenSpend("spent", "@alice:test", "PHONE", None, 1_000),
    ):
        assert await store.unspend_token(HASH, not_a_spend) is False, not_a_spend
    assert await store.count_tokens() == 0
    assert await store.unspend_token(HASH, spend) is True
    assert await store.unspend_token(HASH, spend) is False
    assert await store.count_tokens() == 1


@pytest_twisted.ensureDeferred
async def test_a_token_given_back_after_a_sweep_passed_it_is_swept_when_it_expires(
    backend: StateBackend,
) -> None:
    """A sweep between the spend and the give-back may already have passed the spent
    token; given back, it is outstanding until its expiry and swept after it all the same."""
    store = backend.tokens
    await store.add_token(HASH, "@alice:test", 10_000, device_id="PHONE", issued_at_ms=1_000)
    spend = await store.spend_token(HASH, 2_000)
    assert await store.delete_expired(2_000) == 0
    assert await store.unspend_token(HASH, spend) is True
    assert await store.count_outstanding(2_000) == 1
    assert await store.count_outstanding(10_000) == 0
    assert await store.delete_expired(10_000) == 1
    assert await store.count_tokens() == 0


def _rename_devices(db_path: Path, old: str, new: str) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"ALTER TABLE {old} RENAME TO {new}")


@pytest_twisted.ensureDeferred
async def test_a_login_whose_device_cannot_be_created_gives_its_token_back(
    tmp_path: Path, audit_log: object
) -> None:
    async with running(tmp_path, {}) as srv:
        token = await _login_token(srv)
        # The host's database refuses to create the device (a real failure: its table is gone).
        await threads.deferToThread(rename_table, tmp_path / "homeserver.db", "devices", "devices_away")
        given_back = store_timings("unspend_token")
        failed = await srv.client.token_login(token)
        assert failed.code == 500, failed
        assert failed.json["errcode"] == "M_UNKNOWN"
        assert store_timings("unspend_token") == given_back + 1
        await threads.deferToThread(rename_table, tmp_path / "homeserver.db", "devices_away", "devices")
        # The token was given back: it still signs one device in, and only one.
        signed_in = await srv.client.token_login(token, device_id="NEWDEVICE")
        assert signed_in.code == 200, signed_in
        assert signed_in.json["device_id"] == "NEWDEVICE"
        assert (await srv.client.token_login(token)).code == 403
        [entry] = await srv.module.store.lineage("@alice:test.local")
        assert (entry.outcome, entry.new_device_id) == ("spent", "NEWDEVICE")
    outcomes = [record.audit["outcome"] for record in audit_log.records]  # type: ignore[attr-defined]
    assert outcomes == ["issued", "given_back", "spent", "reused"], outcomes
    assert_spend_record(audit_log, "given_back")  # type: ignore[arg-type]


def assert_spend_record(audit_log: AuditRecords, outcome: str) -> None:
    """The failed login's spend record names the token's user, the device that minted it,
    the new device's address and the token's fingerprint, as the issue record does."""
    [issued] = audit_log.of("issue")
    spends = [record for record in audit_log.of("spend") if record["outcome"] == outcome]
    assert len(spends) == 1, audit_log.of("spend")
    fields = ("user_id", "minted_by_device", "token_fingerprint")
    assert {key: spends[0][key] for key in fields} == {key: issued[key] for key in fields}, spends
    assert spends[0]["user_id"] == "@alice:test.local"
    assert spends[0]["minted_by_device"] and spends[0]["token_fingerprint"], spends
    assert spends[0]["client_address"] == "127.0.0.1", spends


@pytest_twisted.ensureDeferred
async def test_a_token_that_cannot_be_given_back_is_audited_as_lost(
    tmp_path: Path, audit_log: AuditRecords
) -> None:
    """The device cannot be created and the token store silently refuses to put the token
    back: a clean 500, the token stays spent, and the audit trail says it was lost."""
    config = {"store": {"type": "sqlite", "path": "tokens.db", "shared_state": True}}
    async with running(tmp_path, config) as srv:
        token = await _login_token(srv)

        def break_both() -> None:
            rename_table(tmp_path / "homeserver.db", "devices", "devices_away")
            with sqlite3.connect(tmp_path / "tokens.db") as conn:
                conn.execute(
                    "CREATE TRIGGER no_return BEFORE INSERT ON login_tokens BEGIN SELECT RAISE(IGNORE); END"
                )

        await threads.deferToThread(break_both)
        failed = await srv.client.token_login(token)
        assert (failed.code, failed.json["errcode"]) == (500, "M_UNKNOWN"), failed
        await threads.deferToThread(rename_table, tmp_path / "homeserver.db", "devices_away", "devices")
        assert (await srv.client.token_login(token)).code == 403
    outcomes = [record.audit["outcome"] for record in audit_log.records]  # type: ignore[attr-defined]
    assert outcomes == ["issued", "lost", "reused"], outcomes
    assert_spend_record(audit_log, "lost")


async def _login_token(srv: InProcessServer, user: str = "alice") -> str:
    access = await srv.client.access_token(user)
    issued = await srv.client.get_login_token(access)
    assert issued.code == 200, issued
    return str(issued.json["login_token"])


@pytest_twisted.ensureDeferred
async def test_password_checks_past_the_bcrypt_queue_are_refused_at_once(tmp_path: Path) -> None:
    # One bcrypt thread, nobody may wait: of three logins at once, one is checked
    # and the others are told at once to come back (12 rounds: a check takes long
    # enough that the three arrive while the first runs).
    srv = await start_in_process(tmp_path, bcrypt_rounds=12, bcrypt_threads=1, bcrypt_max_queued=0)
    try:
        for user in ("ann", "bob", "cat"):
            await srv.register(user)
        started = time.monotonic()
        answers = await defer.gatherResults(
            [defer.ensureDeferred(srv.client.password_login(user)) for user in ("ann", "bob", "cat")]
        )
        took = time.monotonic() - started
        codes = sorted(answer.code for answer in answers)
        assert codes[0] == 200 and 429 in codes, codes
        for busy in (answer for answer in answers if answer.code == 429):
            assert busy.json["errcode"] == "M_LIMIT_EXCEEDED"
            assert busy.json["retry_after_ms"] == 1000
            assert busy.headers["retry-after"] == "1"
        # The refused ones did not wait for the others' bcrypt.
        assert srv.hs.hasher.queue.in_flight == 0
        assert took < 5
        # A refused login cost its user nothing: it works once the queue is free.
        for user in ("ann", "bob", "cat"):
            assert (await srv.client.password_login(user)).code == 200
    finally:
        await srv.stop()


def _port(srv: InProcessServer) -> int:
    return int(srv.client.base_url.rsplit(":", 1)[1])


def _dribble(port: int, head: bytes, drip: bytes, seconds: float) -> tuple[float, bytes]:
    """Send ``head``, then ``drip`` a byte every 0.2 s; how long until the server hung up."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(head)
        received = b""
        for byte in drip:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.2)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
            if time.monotonic() - started > seconds:
                break
        return time.monotonic() - started, received


@pytest_twisted.ensureDeferred
async def test_a_request_that_arrives_too_slowly_is_dropped(tmp_path: Path) -> None:
    srv = await start_in_process(tmp_path, request_timeout_ms=1_000)
    try:
        port = _port(srv)
        # Headers one byte at a time: every byte would restart an idle timeout.
        took, _ = await threads.deferToThread(
            _dribble, port, b"GET /_matrix/client/versions HTTP/1.1\r\n", b"X-Slow: " + b"a" * 100, 8.0
        )
        assert 0.9 < took < 3, took
        # A body one byte at a time, after complete headers.
        head = f"POST {LOGIN} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode()
        took, received = await threads.deferToThread(_dribble, port, head, b"{" * 99, 8.0)
        assert 0.9 < took < 3, took
        assert received == b""
        # Whoever sends a whole request in time is served as ever.
        versions = await srv.client.get("/_matrix/client/versions")
        assert versions.code == 200
    finally:
        await srv.stop()


def _raw_status(port: int, method: str, path: str) -> int:
    """The status of one request sent as written (HTTP clients upper-case the method)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


@pytest_twisted.ensureDeferred
async def test_methods_are_case_sensitive(server: InProcessServer) -> None:
    port = _port(server)
    for method in ("gEt", "get", "Post"):
        status = await threads.deferToThread(_raw_status, port, method, "/_matrix/client/versions")
        assert status == 405, method
    assert await threads.deferToThread(_raw_status, port, "GET", "/_matrix/client/versions") == 200


def test_logfmt_values_keep_one_event_on_one_line() -> None:
    assert logfmt_value(None) == "-"
    assert logfmt_value("PHONE") == "PHONE"
    assert logfmt_value("@alice:test") == "@alice:test"
    assert logfmt_value("-") == '"-"'
    assert logfmt_value("") == '""'
    assert logfmt_value("two words") == '"two words"'
    assert logfmt_value('a"b') == '"a\\"b"'
    assert logfmt_value("a=b") == '"a=b"'
    assert logfmt_value("a\\b") == '"a\\\\b"'
    forged = "X\n2026-01-01 INFO login_token_module.audit: login token event=spend user_id=@admin:x"
    assert "\n" not in logfmt_value(forged)
    assert logfmt_value(forged).startswith('"X\\n2026')
    assert logfmt_value("\x1b[31mred\u202e") == '"\\x1b[31mred\\u202e"'
    assert logfmt_value("caf\u00e9") == "caf\u00e9"


def test_printable_escapes_and_cuts_client_text() -> None:
    assert printable(b"/_matrix/client/versions") == "/_matrix/client/versions"
    assert printable(b"/a\x00b\x1b\n") == "/a\\x00b\\x1b\\n"
    assert printable(b"\xff") == "\\xff"
    assert printable("x" * 300, 10) == "x" * 10 + "..."
    assert printable("x" * 10, 10) == "x" * 10
    # The default cut: 200 characters are kept whole, 201 are cut to 200.
    assert printable("x" * 200) == "x" * 200
    assert printable("x" * 201) == "x" * 200 + "..."


def test_each_kind_of_unprintable_character_has_its_own_escape() -> None:
    # The short escapes of C and of Python, for the characters that have one.
    assert escaped('\\ " \n \r \t') == '\\\\ \\" \\n \\r \\t'
    # A byte that was not UTF-8 (decoded with surrogateescape) is shown as that byte,
    # at both ends of the range; a lone surrogate outside it is shown as itself.
    assert printable(b"\x80 \xff") == "\\x80 \\xff"
    assert escaped("\udc7f \udd00") == "\\udc7f \\udd00"
    # Other characters by their code point: one byte, the basic plane, the rest.
    assert escaped("\x7f \u0085 \u2028 \U000e0001") == "\\x7f \\x85 \\u2028 \\U000e0001"


@pytest_twisted.ensureDeferred
async def test_when_the_give_back_fails_too_the_answer_is_500_and_one_warning_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The token cannot be stored and the allowance cannot be given back: a clean 500, and
    one warning naming the reason (the allowance then drains as any other)."""
    config = {
        "require_ui_auth": False,
        "store": {"type": "sqlite", "path": "tokens.db", "shared_state": True},
    }
    async with running(tmp_path, config) as srv:
        access = await srv.client.access_token("alice")
        assert await srv.module.store.count_tokens() == 0  # the store's connection is open

        def break_the_store() -> None:
            with sqlite3.connect(tmp_path / "tokens.db") as conn:
                conn.execute("DROP TABLE login_tokens")
                # The allowance is taken (an INSERT) but cannot be given back (an UPDATE).
                conn.execute(
                    "CREATE TRIGGER no_refunds BEFORE UPDATE ON login_token_ratelimits"
                    " BEGIN SELECT RAISE(ABORT, 'refunds are refused here'); END"
                )

        await threads.deferToThread(break_the_store)
        caplog.set_level(logging.WARNING, logger="login_token_module")
        failed = await srv.client.post(GET_TOKEN, {}, access)
        assert (failed.code, failed.json["errcode"]) == (500, "M_UNKNOWN"), failed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "Could not give back a failed get_token's allowance or session: refunds are refused here"
    ], warnings


@pytest_twisted.ensureDeferred
async def test_a_bounded_queue_admits_exactly_its_limit_at_once_and_frees_each_place() -> None:
    """Three places: three jobs run at once, the fourth is refused at once (and waits for
    nothing), a finished job frees exactly one place, and an empty queue counts zero."""
    queue = BoundedQueue(3)
    held: list[defer.Deferred[str]] = [defer.Deferred() for _ in range(4)]
    running = [defer.ensureDeferred(queue.run(lambda d=d: d)) for d in held[:3]]  # type: ignore[misc]
    assert queue.in_flight == 3
    with pytest.raises(ServerBusyError) as refused:
        await queue.run(lambda: defer.succeed("admitted past the limit"))
    assert refused.value.retry_after_ms == 1000
    held[0].callback("first")
    assert await running[0] == "first"
    assert queue.in_flight == 2
    running.append(defer.ensureDeferred(queue.run(lambda: held[3])))
    assert queue.in_flight == 3
    with pytest.raises(ServerBusyError):
        await queue.run(lambda: defer.succeed("no place"))
    for index, deferred in enumerate(held[1:], start=1):
        deferred.callback(str(index))
    assert [await job for job in running[1:]] == ["1", "2", "3"]
    assert queue.in_flight == 0
