"""What operators see and control: metrics, the audit trail and lineage, revocation,
the tokens command, and rc_login on the reference host. All over HTTP to real servers."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import re
import sqlite3
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads

from login_token_module import audit, tokens
from login_token_module.config import StoreConfig
from login_token_module.stores import TokenInfo, make_state
from login_token_module.stores.sql import STATE_SCHEMA
from login_token_module.stores.timed import TimedBackend
from tests.helpers import (
    GET_TOKEN,
    LOGIN,
    PASSWORD,
    REACTOR,
    AuditRecords,
    HttpClient,
    InProcessServer,
    Launcher,
    access_token,
    call,
    cli,
    count_password_checks,
    flip_last,
    homeserver_yaml,
    mint_login_token,
    register,
    rename_table,
    start_in_process,
    token_login,
    warnings_logged,
    write_config,
)
from tests.pgcluster import Database

GENEROUS = {"per_second": 1000, "burst_count": 1000}
SQLITE_STORE = {"store": {"type": "sqlite", "path": "tokens.db"}}


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of a scrape (from outside the reactor): (name, sorted labels) -> value."""
    reply = call(f"http://127.0.0.1:{port}", "GET", "/_synapse/metrics")
    assert reply.code == 200 and reply.headers["content-type"].startswith("text/plain")
    assert isinstance(reply.body, bytes)
    return parse(reply.body.decode())


async def scrape_in_process(port: int) -> Samples:
    reply = await HttpClient(f"http://127.0.0.1:{port}").get("/metrics")
    assert reply.code == 200 and reply.headers["content-type"].startswith("text/plain")
    assert isinstance(reply.body, bytes)
    return parse(reply.body.decode())


def parse(text: str) -> Samples:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def start(tmp_path: Path, module: dict[str, Any] | None = None, **extra: Any) -> InProcessServer:
    config = {**SQLITE_STORE, "ratelimit": GENEROUS, **(module or {})}
    srv = await start_in_process(tmp_path, config, **extra)
    await srv.register("alice")
    return srv


async def login_device(srv: InProcessServer, device_id: str) -> str:
    response = await srv.client.password_login("alice", device_id=device_id)
    assert response.code == 200, response
    return str(response.json["access_token"])


async def mint(srv: InProcessServer, access: str) -> str:
    issued = await srv.client.get_login_token(access)
    assert issued.code == 200, issued
    return str(issued.json["login_token"])


# -- metrics ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_scrape_after_the_flow_counts_what_happened(tmp_path: Path) -> None:
    listeners = [
        {"port": 0, "bind_addresses": ["127.0.0.1"]},
        {"type": "metrics", "port": 0, "bind_addresses": ["127.0.0.1"]},
    ]
    srv = await start(tmp_path, {"sweep_interval_ms": 50}, listeners=listeners)
    try:
        metrics_port = srv.hs.ports[1].getHost().port  # type: ignore[attr-defined]
        before = await scrape_in_process(metrics_port)
        access = await srv.client.access_token("alice")
        session = (await srv.client.post(GET_TOKEN, {}, access)).json["session"]
        wrong = await srv.client.post(
            GET_TOKEN, {"auth": {"type": "m.login.password", "session": session, "password": "wrong"}}, access
        )
        assert wrong.code == 401
        token = await mint(srv, access)
        outstanding_token = await mint(srv, access)
        assert (await srv.client.token_login(token)).code == 200
        assert (await srv.client.token_login(token)).code == 403  # reused
        assert (await srv.client.token_login("mlt_not_a_token")).code == 403  # malformed
        assert (await srv.client.token_login(flip_last(outstanding_token))).code == 403  # malformed checksum
        from tests.helpers import sleep

        await sleep(0.3)  # a sweep counts the outstanding tokens
        after = await scrape_in_process(metrics_port)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta("login_token_module_tokens_issued_total") == 2
        assert delta("login_token_module_tokens_spent_total") == 1
        assert delta("login_token_module_tokens_refused_total", reason="reused") == 1
        assert delta("login_token_module_tokens_refused_total", reason="malformed") == 2
        assert delta("login_token_module_tokens_refused_total", reason="unknown") == 0
        assert delta("login_token_module_uia_prompts_total") == 4  # 3 challenges + the wrong password's
        assert delta("login_token_module_uia_failures_total", reason="password") == 1
        assert value(after, "login_token_module_outstanding_tokens") == 1
        assert delta("login_token_module_store_duration_seconds_count", operation="add_token") == 2
        assert (
            delta("login_token_module_store_duration_seconds_count", operation="spend_token") == 2
        )  # malformed ones never reach the store
        assert (
            delta(
                "login_token_module_http_request_duration_seconds_count",
                endpoint=GET_TOKEN,
                method="POST",
                code="200",
            )
            == 2
        )
        assert (
            delta(
                "login_token_module_http_request_duration_seconds_count",
                endpoint=LOGIN,
                method="POST",
                code="403",
            )
            == 3
        )
        # The process's own collectors come with the single-process registry.
        assert any(name.startswith("process_") for name, _ in after)
    finally:
        await srv.stop()


def test_two_workers_answer_a_scrape_with_both_workers_counts(tmp_path: Path, launch: Launcher) -> None:
    config = homeserver_yaml(tmp_path, {**SQLITE_STORE, "ratelimit": GENEROUS})
    config["listeners"].append({"type": "metrics", "port": 0, "bind_addresses": ["127.0.0.1"]})
    path = write_config(tmp_path, config)
    register(path)
    server = launch(path, "server.log", "--workers", "2")
    match = re.search(r"Metrics of all 2 workers on http://127.0.0.1:(\d+)", server.log())
    assert match, server.log()
    metrics_port = int(match.group(1))
    base = server.base_url
    minted = [mint_login_token(base, access_token(base)) for _ in range(6)]
    for token in minted:
        assert token_login(base, token)[0] == 200
    served_by = set()
    for _ in range(8):  # each scrape is a new connection: the kernel picks a worker
        samples = scrape(metrics_port)
        assert value(samples, "login_token_module_tokens_issued_total") == 6
        assert value(samples, "login_token_module_tokens_spent_total") == 6
        served_by.add(
            value(
                samples,
                "login_token_module_http_request_duration_seconds_count",
                endpoint=GET_TOKEN,
                method="POST",
                code="200",
            )
        )
    assert served_by == {6}
    # Both workers served requests (each writes its own file; the scrape adds them up).
    assert "[worker 1]" in server.log() and "[worker 2]" in server.log()


# -- audit trail and lineage -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_audit_record_per_issue_and_spend_with_lineage(
    tmp_path: Path, audit_log: AuditRecords
) -> None:
    srv = await start(tmp_path)
    try:
        old = await login_device(srv, "OLDPHONE")
        token = await mint(srv, old)
        new = await srv.client.token_login(token, device_id="NEWLAPTOP")
        assert new.code == 200
        assert (await srv.client.token_login(token)).code == 403
        history = await srv.module.store.lineage("@alice:test.local")
    finally:
        await srv.stop()

    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:8]
    assert fingerprint not in token
    (issued,) = audit_log.of("issue")
    spends = audit_log.of("spend")
    assert issued == {
        "event": "issue",
        "outcome": "issued",
        "user_id": "@alice:test.local",
        "minted_by_device": "OLDPHONE",
        "new_device_id": None,
        "client_address": "127.0.0.1",
        "token_fingerprint": fingerprint,
    }
    assert spends == [
        {
            "event": "spend",
            "outcome": "reused",
            "user_id": "@alice:test.local",
            "minted_by_device": "OLDPHONE",
            "new_device_id": None,
            "client_address": "127.0.0.1",
            "token_fingerprint": fingerprint,
        },
        {
            "event": "spend",
            "outcome": "spent",
            "user_id": "@alice:test.local",
            "minted_by_device": "OLDPHONE",
            "new_device_id": "NEWLAPTOP",
            "client_address": "127.0.0.1",
            "token_fingerprint": fingerprint,
        },
    ] or spends == [
        {
            "event": "spend",
            "outcome": "spent",
            "user_id": "@alice:test.local",
            "minted_by_device": "OLDPHONE",
            "new_device_id": "NEWLAPTOP",
            "client_address": "127.0.0.1",
            "token_fingerprint": fingerprint,
        },
        {
            "event": "spend",
            "outcome": "reused",
            "user_id": "@alice:test.local",
            "minted_by_device": "OLDPHONE",
            "new_device_id": None,
            "client_address": "127.0.0.1",
            "token_fingerprint": fingerprint,
        },
    ]
    # Every record, as text and as JSON, has every field and no secret.
    formatter = audit.JsonFormatter()
    for record in audit_log.records:
        assert set(audit.FIELDS) <= set(record.audit)  # type: ignore[attr-defined]
        for text in (record.getMessage(), formatter.format(record)):
            assert token not in text and PASSWORD not in text and old not in text
        assert json.loads(formatter.format(record))["token_fingerprint"] == fingerprint
    (entry,) = history
    assert (entry.minted_by_device, entry.outcome, entry.new_device_id) == ("OLDPHONE", "spent", "NEWLAPTOP")
    assert entry.token_hash.hex().startswith(fingerprint)


@pytest_twisted.ensureDeferred
async def test_a_malformed_token_is_audited_with_its_address_and_no_fingerprint(
    tmp_path: Path, audit_log: AuditRecords
) -> None:
    srv = await start(tmp_path)
    try:
        assert (await srv.client.token_login("mlt_not_a_token")).code == 403
    finally:
        await srv.stop()
    (record,) = audit_log.of("spend")
    fields = ("outcome", "user_id", "minted_by_device", "client_address", "token_fingerprint")
    assert {k: record[k] for k in fields} == {
        "outcome": "malformed",
        "user_id": None,
        "minted_by_device": None,
        "client_address": "127.0.0.1",
        "token_fingerprint": None,
    }


@pytest_twisted.ensureDeferred
async def test_the_json_formatter_writes_each_audit_record_as_one_line_of_named_fields(
    tmp_path: Path, audit_log: AuditRecords
) -> None:
    # What a log shipper reads: the formatter on the audit logger, records from a real flow.
    lines = io.StringIO()
    shipper = logging.StreamHandler(lines)
    shipper.setFormatter(audit.JsonFormatter())
    logging.getLogger(audit.AUDIT_LOGGER).addHandler(shipper)
    before = datetime.datetime.now(datetime.UTC)
    srv = await start(tmp_path)
    try:
        old = await login_device(srv, "OLDPHONE")
        token = await mint(srv, old)
        assert (await srv.client.token_login(token, device_id="NEWLAPTOP")).code == 200
    finally:
        await srv.stop()
        logging.getLogger(audit.AUDIT_LOGGER).removeHandler(shipper)
    after = datetime.datetime.now(datetime.UTC)

    text = lines.getvalue()
    assert token not in text and PASSWORD not in text and old not in text
    entries = [json.loads(line) for line in text.splitlines()]
    assert [(e["event"], e["outcome"]) for e in entries] == [("issue", "issued"), ("spend", "spent")]
    for entry, record in zip(entries, audit_log.records, strict=True):
        # Exactly these keys: no "process" outside a worker, no "exception" without one.
        assert set(entry) == {"time", "level", "logger", "message", *audit.FIELDS}
        assert entry["level"] == "INFO" and entry["logger"] == "login_token_module.audit"
        assert entry["message"] == record.getMessage()
        assert entry["message"].startswith(f"login token event={entry['event']} ")
        # UTC, to the millisecond, with its offset.
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"]), entry["time"]
        when = datetime.datetime.fromisoformat(entry["time"])
        assert before - datetime.timedelta(milliseconds=1) <= when <= after
        assert abs(when.timestamp() - record.created) < 0.001
    # A field with no value is JSON null, and "-" in the text line (docs/operating.md's example).
    assert entries[0]["new_device_id"] is None and " new_device_id=- " in entries[0]["message"]
    assert entries[1]["new_device_id"] == "NEWLAPTOP"
    assert entries[1]["token_fingerprint"] == audit.fingerprint(token)


def test_the_json_formatter_names_the_worker_and_writes_any_record(
    audit_log: AuditRecords, monkeypatch: pytest.MonkeyPatch
) -> None:
    formatter = audit.JsonFormatter()
    # A worker of `serve --workers N` says which one wrote the record.
    monkeypatch.setattr(audit, "PROCESS_NAME", "worker 1")
    audit.record("revoke", "revoked", user_id='@bob "the\nbuilder" \u00e9:hs', reason="operator")
    line = formatter.format(audit_log.records[-1])
    assert "\n" not in line  # one record, one line, whatever a field holds
    entry = json.loads(line)
    assert entry["process"] == "worker 1" and entry["reason"] == "operator"
    assert entry["user_id"] == '@bob "the\nbuilder" \u00e9:hs'
    # A field that is not JSON is written as its text, not dropped with the record.
    audit.record("revoke", "revoked", user_id="@bob:hs", reason=Path("/x"))
    assert json.loads(formatter.format(audit_log.records[-1]))["reason"] == "/x"
    monkeypatch.setattr(audit, "PROCESS_NAME", None)
    # The formatter may sit on the root logger: records that are not audit records,
    # and records with a traceback, come out too.
    plain = logging.LogRecord("twisted", logging.WARNING, __file__, 1, "plain %s", ("text",), None)
    assert set(json.loads(formatter.format(plain))) == {"time", "level", "logger", "message"}
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        failed = logging.LogRecord("twisted", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    entry = json.loads(formatter.format(failed))
    assert (entry["level"], entry["logger"], entry["message"]) == ("ERROR", "twisted", "boom")
    assert entry["exception"].startswith("Traceback") and "ZeroDivisionError" in entry["exception"]


@pytest_twisted.ensureDeferred
async def test_each_part_of_the_sweep_is_timed_under_its_own_name(tmp_path: Path) -> None:
    operations = ("sweep_tokens", "sweep_history", "sweep_uia", "count_outstanding")

    def counts() -> dict[str, float]:
        name = "login_token_module_store_duration_seconds_count"
        return {
            op: REGISTRY.get_sample_value(name, {"operation": op}) or 0.0
            for op in (*operations, "sweep_ratelimits")
        }

    srv = await start(tmp_path, {"sweep_interval_ms": 3_600_000})
    try:
        before = counts()
        await srv.module.sweep()
        after = counts()
    finally:
        await srv.stop()
    # Two rate limiters (get_token, failed passwords): two timings under one name.
    expected = {**dict.fromkeys(operations, 1.0), "sweep_ratelimits": 2.0}
    assert {op: after[op] - before[op] for op in after} == expected


@pytest_twisted.ensureDeferred
async def test_the_timed_stores_pass_calls_through_and_time_a_revocation_by_fingerprint(
    tmp_path: Path,
) -> None:
    """Revoking one token (a device that logged out while its token was minted) is timed as
    ``revoke``; the operators' listing and a login counted after the fact pass through, untimed."""
    config = StoreConfig(type="sqlite", path=str(tmp_path / "tokens.db"))
    backend = TimedBackend(make_state(config, REACTOR, str(tmp_path)))
    name = "login_token_module_store_duration_seconds_count"

    def timings() -> dict[str, float]:
        return {
            op: REGISTRY.get_sample_value(name, {"operation": op}) or 0.0
            for op in ("revoke", "ratelimit_acquire")
        }

    try:
        store = backend.tokens
        phone, laptop = hashlib.sha256(b"phone").digest(), hashlib.sha256(b"laptop").digest()
        await store.add_token(phone, "@alice:test", 10_000, device_id="PHONE", issued_at_ms=1_000)
        await store.add_token(laptop, "@bob:test", 20_000, device_id="LAPTOP", issued_at_ms=2_000)
        at_phone = TokenInfo(phone, "@alice:test", "PHONE", 1_000, 10_000)
        at_laptop = TokenInfo(laptop, "@bob:test", "LAPTOP", 2_000, 20_000)
        before = timings()

        # The listing: the user's live tokens at the time given.
        assert await store.list_tokens(5_000, "@bob:test") == [at_laptop]
        assert await store.list_tokens(5_000) == [at_phone, at_laptop]
        assert await store.list_tokens(15_000) == [at_laptop]
        assert timings() == before

        # Revoking by fingerprint: the live token it names, at the time given; each call timed.
        assert (
            await store.revoke_fingerprint(audit.fingerprint_of_hash(laptop), 25_000) == []
        )  # expired by then
        assert await store.revoke_fingerprint(audit.fingerprint_of_hash(phone), 5_000) == [at_phone]
        assert await store.list_tokens(5_000) == [at_laptop]
        assert timings() == {**before, "revoke": before["revoke"] + 2}

        # A login counted after the fact: counted against its key at its time, untimed.
        limiter = backend.rate_limiter("get_token", per_second=1, burst_count=2)
        await limiter.record("@alice:test", 100.0)
        await limiter.record("@alice:test", 100.0)
        assert timings() == {**before, "revoke": before["revoke"] + 2}
        assert await limiter.acquire("@alice:test", 100.0) == 1000
        assert await limiter.acquire("@bob:test", 100.0) is None
        assert await limiter.acquire("@alice:test", 101.0) is None
        assert timings() == {
            "revoke": before["revoke"] + 2,
            "ratelimit_acquire": before["ratelimit_acquire"] + 3,
        }
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_token_login_times_its_spend_and_the_record_of_the_new_device(tmp_path: Path) -> None:
    def counts() -> dict[str, float]:
        name = "login_token_module_store_duration_seconds_count"
        ops = ("spend_token", "record_new_device")
        return {op: REGISTRY.get_sample_value(name, {"operation": op}) or 0.0 for op in ops}

    srv = await start(tmp_path)
    try:
        token = await mint(srv, await login_device(srv, "PHONE"))
        before = counts()
        assert (await srv.client.token_login(token)).code == 200
        after = counts()
    finally:
        await srv.stop()
    assert {op: after[op] - before[op] for op in after} == {"spend_token": 1.0, "record_new_device": 1.0}


@pytest_twisted.ensureDeferred
async def test_each_uia_step_is_counted_and_timed_under_its_own_name(tmp_path: Path) -> None:
    """The names operators alert on: a failure's reason, and each state call's timing."""
    failures = ("password", "session", "user")
    timings = (
        "uia_get",
        "uia_spend",
        "ratelimit_acquire",
        "ratelimit_refund",
        "failed_auth_acquire",
        "failed_auth_refund",
    )

    def samples() -> dict[str, float]:
        found = {
            reason: REGISTRY.get_sample_value("login_token_module_uia_failures_total", {"reason": reason})
            for reason in failures
        }
        for op in timings:
            name = "login_token_module_store_duration_seconds_count"
            found[op] = REGISTRY.get_sample_value(name, {"operation": op})
        return {key: value or 0.0 for key, value in found.items()}

    srv = await start(tmp_path)
    try:
        access = await login_device(srv, "PHONE")
        before = samples()
        session = (await srv.client.post(GET_TOKEN, {}, access)).json["session"]
        wrong = {"type": "m.login.password", "password": "wrong", "session": session}
        assert (await srv.client.post(GET_TOKEN, {"auth": wrong}, access)).code == 401
        unknown = {"type": "m.login.password", "password": PASSWORD, "session": "no-such-session"}
        assert (await srv.client.post(GET_TOKEN, {"auth": unknown}, access)).code == 401
        other = {**wrong, "password": PASSWORD, "identifier": {"type": "m.id.user", "user": "bob"}}
        assert (await srv.client.post(GET_TOKEN, {"auth": other}, access)).code == 401
        right = {**wrong, "password": PASSWORD}
        assert (await srv.client.post(GET_TOKEN, {"auth": right}, access)).code == 200
        after = samples()
    finally:
        await srv.stop()
    assert {key: after[key] - before[key] for key in after} == {
        "password": 1.0,
        "session": 1.0,
        "user": 1.0,
        "uia_get": 4.0,  # every request that named a session
        "uia_spend": 1.0,
        # Admitted before its password is checked: every request that offered one.
        "ratelimit_acquire": 2.0,
        "failed_auth_acquire": 2.0,
        "ratelimit_refund": 1.0,  # the wrong password gives back its get_token allowance
        "failed_auth_refund": 1.0,  # the right one gives back its failed-attempt allowance
    }


@pytest_twisted.ensureDeferred
async def test_each_limiter_counts_its_refusals_under_its_own_name(tmp_path: Path) -> None:
    def refused(limiter: str) -> float:
        name = "login_token_module_ratelimited_total"
        return REGISTRY.get_sample_value(name, {"limiter": limiter}) or 0.0

    before = {limiter: refused(limiter) for limiter in ("get_token", "get_token_failed_auth")}
    srv = await start(tmp_path, {"ratelimit": {"per_second": 0.001, "burst_count": 1}})
    try:
        access = await login_device(srv, "PHONE")
        await mint(srv, access)
        assert (await srv.client.get_login_token(access)).code == 429
        assert refused("get_token") == before["get_token"] + 1
        # Once the allowance is used, even a wrong password is refused before it is checked.
        assert (await srv.client.get_login_token(access, password="wrong")).code == 429
        assert refused("get_token") == before["get_token"] + 2
        assert refused("get_token_failed_auth") == before["get_token_failed_auth"]
    finally:
        await srv.stop()
    (tmp_path / "failed").mkdir()
    srv = await start(tmp_path / "failed", {"ratelimit": {"per_second": 100, "burst_count": 100}})
    try:
        access = await login_device(srv, "PHONE")
        # Three wrong passwords fill the failed-attempts bucket (burst 3); the fourth try is refused.
        codes = [(await srv.client.get_login_token(access, password="wrong")).code for _ in range(4)]
        assert codes == [401, 401, 401, 429]
        assert refused("get_token_failed_auth") == before["get_token_failed_auth"] + 1
        # A failed attempt is counted whether the password is right or not: the right
        # one is refused too until the bucket drains, and gives back its get_token allowance.
        assert (await srv.client.get_login_token(access)).code == 429
        assert refused("get_token") == before["get_token"] + 2
    finally:
        await srv.stop()


# -- revocation ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_logout_revokes_only_the_logged_out_devices_tokens(
    tmp_path: Path, audit_log: AuditRecords
) -> None:
    srv = await start(tmp_path)
    try:
        first, second = await login_device(srv, "FIRST"), await login_device(srv, "SECOND")
        from_first, from_second = await mint(srv, first), await mint(srv, second)
        assert (await srv.client.post("/_matrix/client/v3/logout", {}, first)).code == 200
        refused = await srv.client.token_login(from_first)
        assert (refused.code, refused.json["errcode"]) == (403, "M_FORBIDDEN")
        assert (await srv.client.token_login(from_second)).code == 200
        # /logout/all: every device's tokens go.
        third = await login_device(srv, "THIRD")
        from_third, again_second = await mint(srv, third), await mint(srv, second)
        assert (await srv.client.post("/_matrix/client/v3/logout/all", {}, third)).code == 200
        assert (await srv.client.token_login(from_third)).code == 403
        assert (await srv.client.token_login(again_second)).code == 403
    finally:
        await srv.stop()
    revoked = audit_log.of("revoke")
    assert [(r["minted_by_device"], r["reason"]) for r in revoked] == [
        ("FIRST", "logout"),
        ("SECOND", "logout"),
        ("THIRD", "logout"),
    ] or sorted((r["minted_by_device"], r["reason"]) for r in revoked) == [
        ("FIRST", "logout"),
        ("SECOND", "logout"),
        ("THIRD", "logout"),
    ]
    assert [r["outcome"] for r in audit_log.of("spend")].count("revoked") == 3


@pytest_twisted.ensureDeferred
async def test_logout_counts_and_records_each_revocation_and_leaves_expired_tokens(
    tmp_path: Path, audit_log: AuditRecords, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One audit record and one count per token revoked; a token already expired (not yet
    swept) at logout is not revoked, since it can no longer sign anyone in."""

    def sample(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    srv = await start(tmp_path)
    try:
        module = srv.module
        access = await login_device(srv, "PHONE")
        stale = await mint(srv, access)
        later = module._now() + module._config.token_lifetime_ms / 1000 + 1
        monkeypatch.setattr(module, "_now", lambda: later)
        live = await mint(srv, access)
        counted = sample("login_token_module_tokens_revoked_total", {"reason": "logout"})
        timed = sample("login_token_module_store_duration_seconds_count", {"operation": "revoke"})
        assert (await srv.client.post("/_matrix/client/v3/logout", {}, access)).code == 200
        assert sample("login_token_module_tokens_revoked_total", {"reason": "logout"}) == counted + 1
        assert sample("login_token_module_store_duration_seconds_count", {"operation": "revoke"}) == timed + 1
        outcomes = {e.token_hash: e.outcome for e in await module.store.lineage("@alice:test.local")}
        assert outcomes == {tokens.hash_token(stale): None, tokens.hash_token(live): "revoked"}
    finally:
        await srv.stop()
    (record,) = audit_log.of("revoke")
    fields = ("outcome", "user_id", "minted_by_device", "reason", "token_fingerprint")
    assert {k: record[k] for k in fields} == {
        "outcome": "revoked",
        "user_id": "@alice:test.local",
        "minted_by_device": "PHONE",
        "reason": "logout",
        "token_fingerprint": audit.fingerprint(live),
    }


@pytest_twisted.ensureDeferred
async def test_revoke_on_logout_false_keeps_the_token(tmp_path: Path) -> None:
    srv = await start(tmp_path, {"revoke_on_logout": False})
    try:
        access = await login_device(srv, "PHONE")
        token = await mint(srv, access)
        assert (await srv.client.post("/_matrix/client/v3/logout", {}, access)).code == 200
        assert (await srv.client.token_login(token)).code == 200
    finally:
        await srv.stop()


def test_the_tokens_command_lists_revokes_and_traces_while_the_server_runs(
    tmp_path: Path, launch: Launcher
) -> None:
    path = write_config(tmp_path, homeserver_yaml(tmp_path, {**SQLITE_STORE, "ratelimit": GENEROUS}))
    register(path)
    register(path, "bob")
    server = launch(path)
    base = server.base_url
    alice = access_token(base)
    kept, revoked_one = mint_login_token(base, alice), mint_login_token(base, alice)
    bobs = mint_login_token(base, access_token(base, "bob"))
    spent = mint_login_token(base, alice)
    code, body = token_login(base, spent)
    assert code == 200
    new_device = body["device_id"]

    listing = cli("tokens", "list", "-c", str(path), "--user", "alice")
    assert listing.returncode == 0, listing.stderr
    fingerprints = {t: audit.fingerprint(t) for t in (kept, revoked_one, bobs, spent)}
    assert fingerprints[kept] in listing.stdout and fingerprints[revoked_one] in listing.stdout
    assert fingerprints[bobs] not in listing.stdout and fingerprints[spent] not in listing.stdout
    assert all(t not in listing.stdout for t in fingerprints)
    assert "minted_by_device" in listing.stdout
    everyone = cli("tokens", "list", "-c", str(path))
    assert fingerprints[bobs] in everyone.stdout

    revoke = cli("tokens", "revoke", "-c", str(path), "--fingerprint", fingerprints[revoked_one])
    assert revoke.returncode == 0, revoke.stderr
    assert "Revoked 1 login token(s)" in revoke.stdout
    assert "outcome=revoked" in revoke.stderr and "reason=operator" in revoke.stderr
    assert revoked_one not in revoke.stdout + revoke.stderr
    assert token_login(base, revoked_one)[0] == 403  # the running server sees it at once
    assert token_login(base, kept)[0] == 200

    by_user = cli("tokens", "revoke", "-c", str(path), "--user", "@bob:test.local")
    assert "Revoked 1 login token(s)" in by_user.stdout
    assert token_login(base, bobs)[0] == 403

    history = cli("tokens", "history", "-c", str(path), "--user", "alice")
    assert history.returncode == 0, history.stderr
    spent_line = next(line for line in history.stdout.splitlines() if fingerprints[spent] in line)
    assert " spent " in spent_line and spent_line.rstrip().endswith(new_device)
    revoked_line = next(line for line in history.stdout.splitlines() if fingerprints[revoked_one] in line)
    assert " revoked " in revoked_line
    assert "refused" not in server.log() or True
    assert "outcome=revoked" in server.log()  # the login presenting it is refused as revoked

    bad = cli("tokens", "revoke", "-c", str(path), "--fingerprint", "xyz")
    assert bad.returncode == 1 and "fingerprint" in bad.stderr


def test_the_tokens_command_explains_a_memory_store(tmp_path: Path) -> None:
    path = write_config(tmp_path, homeserver_yaml(tmp_path, {"store": {"type": "memory"}}))
    result = cli("tokens", "list", "-c", str(path))
    assert result.returncode == 1
    assert "'memory'" in result.stderr and len(result.stderr.splitlines()) == 1


# -- schema migration ----------------------------------------------------------------


def _old_sqlite(path: Path, token_hash: bytes) -> None:
    with sqlite3.connect(path) as conn:
        for migration in STATE_SCHEMA.migrations[:2]:
            for statement in migration.sqlite:
                conn.execute(statement)
        conn.execute("CREATE TABLE schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_versions VALUES ('login_token_module', 2)")
        conn.execute("INSERT INTO login_tokens VALUES (?, '@alice:test', 9999999999999)", (token_hash,))
    conn.close()


@pytest_twisted.ensureDeferred
async def test_a_version_2_sqlite_store_upgrades_and_keeps_its_tokens(tmp_path: Path) -> None:
    token_hash = hashlib.sha256(b"old").digest()
    _old_sqlite(tmp_path / "tokens.db", token_hash)
    backend = make_state(StoreConfig(type="sqlite", path=str(tmp_path / "tokens.db")), REACTOR, str(tmp_path))
    try:
        (info,) = await backend.tokens.list_tokens(0)
        assert (info.user_id, info.minted_by_device, info.issued_at_ms) == ("@alice:test", None, None)
        spend = await backend.tokens.spend_token(token_hash, 0)
        assert (spend.outcome, spend.user_id) == ("spent", "@alice:test")
        assert (await backend.tokens.spend_token(token_hash, 0)).outcome == "unknown"  # no history before v3
    finally:
        await backend.close()
    with sqlite3.connect(tmp_path / "tokens.db") as conn:
        assert conn.execute("SELECT version FROM schema_versions").fetchall() == [(4,)]
    conn.close()


@pytest_twisted.ensureDeferred
async def test_a_version_2_postgres_store_upgrades_and_keeps_its_tokens(
    tmp_path: Path, pg_database: Database
) -> None:
    import psycopg2

    token_hash = hashlib.sha256(b"old").digest()
    conn = psycopg2.connect(pg_database.dsn)
    conn.autocommit = True
    with conn.cursor() as cursor:
        for migration in STATE_SCHEMA.migrations[:2]:
            for statement in migration.postgres:
                cursor.execute(statement)
        cursor.execute("CREATE TABLE schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        cursor.execute("INSERT INTO schema_versions VALUES ('login_token_module', 2)")
        cursor.execute("INSERT INTO login_tokens VALUES (%s, '@alice:test', 9999999999999)", (token_hash,))
    backend = make_state(StoreConfig(type="postgres", dsn=pg_database.dsn), REACTOR, str(tmp_path))
    try:
        await backend.tokens.add_token(b"n" * 32, "@bob:test", 9999999999999, device_id="D", issued_at_ms=1)
        assert (await backend.tokens.spend_token(token_hash, 0)).outcome == "spent"
        assert (await backend.tokens.spend_token(b"n" * 32, 0)).minted_by_device == "D"
        assert (await backend.tokens.spend_token(b"n" * 32, 0)).outcome == "reused"
    finally:
        await backend.close()
    with conn.cursor() as cursor:
        cursor.execute("SELECT version FROM schema_versions")
        assert cursor.fetchall() == [(4,)]
    conn.close()


# -- rc_login ----------------------------------------------------------------------


def _rc(**limits: Any) -> dict[str, Any]:
    return {"address": GENEROUS, "account": GENEROUS, "failed_attempts": GENEROUS, **limits}


def rc_login_refusals() -> dict[str, float]:
    name = "login_token_module_ratelimited_total"
    return {
        bucket: REGISTRY.get_sample_value(name, {"limiter": f"rc_login_{bucket}"}) or 0.0
        for bucket in ("address", "account", "failed_attempts")
    }


@pytest_twisted.ensureDeferred
async def test_wrong_passwords_get_429_after_three_by_default(tmp_path: Path) -> None:
    # Synapse's shape, this host's defaults (0.17/s, burst 3), for every bucket.
    srv = await start(tmp_path, rc_login={})
    try:
        codes = [(await srv.client.password_login("alice", "wrong")).code for _ in range(12)]
        assert codes[:3] == [403, 403, 403] and set(codes[3:]) == {429}, codes
        limited = await srv.client.password_login("alice", "wrong")
        assert limited.json["errcode"] == "M_LIMIT_EXCEEDED"
        assert limited.json["retry_after_ms"] > 0
        assert int(limited.headers["retry-after"]) >= 1
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_failed_attempts_counts_only_failures(tmp_path: Path) -> None:
    srv = await start(tmp_path, rc_login=_rc(failed_attempts={"per_second": 0.001, "burst_count": 2}))
    try:
        for _ in range(5):
            assert (await srv.client.password_login("alice")).code == 200
        assert (await srv.client.password_login("alice", "wrong")).code == 403
        assert (await srv.client.password_login("alice", "wrong")).code == 403
        before = rc_login_refusals()
        assert (await srv.client.password_login("alice", "wrong")).code == 429
        assert (await srv.client.password_login("alice")).code == 429  # the account is locked for now
        # Each refusal is counted under the bucket that refused it, for operators' alerts.
        after = rc_login_refusals()
        assert {name: after[name] - before[name] for name in after} == {
            "address": 0,
            "account": 0,
            "failed_attempts": 2,
        }
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_a_password_check_that_could_not_run_gives_the_failed_attempt_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed attempt reserved before bcrypt is the account's again when the check itself
    fails: an outage is not a wrong guess."""
    srv = await start(tmp_path, rc_login=_rc(failed_attempts={"per_second": 0.001, "burst_count": 1}))
    try:
        hasher = srv.hs.hasher
        real = hasher.check

        async def broken(password: str, password_hash: str | None) -> bool:
            raise RuntimeError("the password check could not run")

        monkeypatch.setattr(hasher, "check", broken)
        failed = await srv.client.password_login("alice")
        assert (failed.code, failed.json["errcode"]) == (500, "M_UNKNOWN"), failed
        monkeypatch.setattr(hasher, "check", real)
        assert (await srv.client.password_login("alice")).code == 200
        assert (await srv.client.password_login("alice", "wrong")).code == 403  # the one allowance
        assert (await srv.client.password_login("alice", "wrong")).code == 429
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_an_rc_login_allowance_that_cannot_be_given_back_still_logs_in_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With workers the rc_login buckets live in the homeserver's database; if it fails just as
    the right password gives its failed attempt back, the login still succeeds and the operator
    is told which allowance and why, once."""
    shared = {"store": {"type": "sqlite", "path": "tokens.db", "shared_state": True}, "ratelimit": GENEROUS}
    srv = await start(tmp_path, shared, workers=2)
    try:
        checks = count_password_checks(srv, monkeypatch)
        db = tmp_path / "homeserver.db"
        checks.during_next = partial(
            threads.deferToThread, rename_table, db, "homeserver_ratelimits", "ratelimits_away"
        )
        with caplog.at_level(logging.WARNING):
            login = await srv.client.password_login("alice")
        await threads.deferToThread(rename_table, db, "ratelimits_away", "homeserver_ratelimits")
        assert login.code == 200 and login.json["access_token"], login
        assert warnings_logged(caplog) == [
            "Could not give back an rc_login failed_attempts allowance: no such table: homeserver_ratelimits"
        ]
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_account_bucket_counts_logins_of_one_account(tmp_path: Path) -> None:
    srv = await start(tmp_path, rc_login=_rc(account={"per_second": 0.001, "burst_count": 2}))
    try:
        await srv.register("bob")
        assert (await srv.client.password_login("alice")).code == 200
        assert (await srv.client.password_login("alice")).code == 200
        assert (await srv.client.password_login("alice")).code == 429
        assert (await srv.client.password_login("bob")).code == 200
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_token_logins_count_against_the_account_they_sign_in(tmp_path: Path) -> None:
    """A token login names no user (or names one malformed, which a module login ignores);
    once the token says whose it is, the login is counted against that account like a
    password login."""
    srv = await start(tmp_path, rc_login=_rc(account={"per_second": 0.001, "burst_count": 4}))
    try:
        await srv.register("bob")
        access = await srv.client.access_token("alice")  # alice's first login
        first, second = await mint(srv, access), await mint(srv, access)
        assert (await srv.client.token_login(first)).code == 200  # her second
        malformed = {"type": "m.id.phone", "number": "123"}
        assert (await srv.client.token_login(second, identifier=malformed)).code == 200  # her third
        assert (await srv.client.password_login("alice")).code == 200  # her fourth
        limited = await srv.client.password_login("alice")
        assert (limited.code, limited.json["errcode"]) == (429, "M_LIMIT_EXCEEDED"), limited
        assert (await srv.client.password_login("bob")).code == 200  # bob's count is his own
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_a_failed_login_gives_the_account_its_allowance_back(tmp_path: Path) -> None:
    """The account a request names is admitted before its password is checked; a login that
    fails does not count against it (failed_attempts counts those)."""
    srv = await start(tmp_path, rc_login=_rc(account={"per_second": 0.001, "burst_count": 2}))
    try:
        for _ in range(4):
            assert (await srv.client.password_login("alice", "wrong")).code == 403
        assert (await srv.client.password_login("alice")).code == 200
        assert (await srv.client.password_login("alice")).code == 200
        assert (await srv.client.password_login("alice")).code == 429
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_a_login_keeps_the_devices_display_name(tmp_path: Path) -> None:
    srv = await start(tmp_path)
    try:
        named = await srv.client.password_login(
            "alice", device_id="LAPTOP", initial_device_display_name="Alice's laptop"
        )
        assert named.code == 200, named
        unnamed = await srv.client.password_login("alice", device_id="PHONE")
        assert unnamed.code == 200, unnamed
        with sqlite3.connect(tmp_path / "homeserver.db") as db:
            rows = db.execute("SELECT device_id, display_name FROM devices ORDER BY device_id").fetchall()
        assert rows == [("LAPTOP", "Alice's laptop"), ("PHONE", None)]
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_a_token_whose_user_is_gone_is_given_back_not_spent(tmp_path: Path) -> None:
    """The account was removed between minting and spending: the login is refused (403), and
    the token is given back, so it still works if the account comes back before it expires."""
    srv = await start(tmp_path)
    try:
        token = await mint(srv, await srv.client.access_token("alice"))
        db_path = tmp_path / "homeserver.db"
        with sqlite3.connect(db_path) as db:
            (row,) = db.execute("SELECT * FROM users WHERE user_id = '@alice:test.local'").fetchall()
            db.execute("DELETE FROM users WHERE user_id = '@alice:test.local'")
        refused = await srv.client.token_login(token)
        assert (refused.code, refused.json["errcode"]) == (403, "M_FORBIDDEN"), refused
        assert await srv.module.store.count_tokens() == 1
        with sqlite3.connect(db_path) as db:
            db.execute(f"INSERT INTO users VALUES ({', '.join('?' * len(row))})", row)
        login = await srv.client.token_login(token)
        assert (login.code, login.json["user_id"]) == (200, "@alice:test.local"), login
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_a_token_that_cannot_be_given_back_is_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The device could not be made and the module could not give the token back either: the
    login is still the client's clear 403, and the operator gets one error with the trace."""
    srv = await start(tmp_path)
    try:
        token = await mint(srv, await srv.client.access_token("alice"))
        with sqlite3.connect(tmp_path / "homeserver.db") as db:
            db.execute("DELETE FROM users WHERE user_id = '@alice:test.local'")

        async def broken(*args: Any) -> bool:
            raise RuntimeError("the store could not take the token back")

        monkeypatch.setattr(srv.module.store, "unspend_token", broken)
        with caplog.at_level(logging.ERROR):
            refused = await srv.client.token_login(token)
        assert (refused.code, refused.json["errcode"]) == (403, "M_FORBIDDEN"), refused
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert [r.getMessage() for r in errors] == [
            "A module could not undo a login whose device was not created"
        ]
        assert errors[0].exc_info is not None
        assert "the store could not take the token back" in caplog.text
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_a_failed_post_login_callback_still_signs_in_and_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The device exists once the host created it: if the module's bookkeeping after a token
    login fails, the client still gets its device, and the operator one error with the trace."""
    srv = await start(tmp_path)
    try:
        token = await mint(srv, await srv.client.access_token("alice"))

        async def broken(token_hash: bytes, device_id: str) -> None:
            raise RuntimeError("the token's history could not be written")

        monkeypatch.setattr(srv.module.store, "record_new_device", broken)
        with caplog.at_level(logging.ERROR):
            login = await srv.client.token_login(token, device_id="TV")
        assert (login.code, login.json["device_id"]) == (200, "TV"), login
        assert (
            await srv.client.get("/_matrix/client/v3/account/whoami", login.json["access_token"])
        ).code == 200
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert [r.getMessage() for r in errors] == ["A module's post-login callback failed"]
        assert errors[0].exc_info is not None
        assert "the token's history could not be written" in caplog.text
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_token_logins_are_throttled_per_address_without_spending_the_token(tmp_path: Path) -> None:
    srv = await start(tmp_path, rc_login=_rc(address={"per_second": 0.001, "burst_count": 2}))
    try:
        access = await srv.client.access_token("alice")  # attempt 1 from 127.0.0.1
        token = await mint(srv, access)
        assert (await srv.client.token_login("mlt_wrong")).code == 403  # attempt 2
        limited = await srv.client.token_login(token)
        assert (limited.code, limited.json["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        assert "retry-after" in limited.headers
        assert await srv.module.store.count_tokens() == 1  # not spent
    finally:
        await srv.stop()


@pytest.mark.parametrize("trusted", [False, True], ids=["x_forwarded-off", "x_forwarded-on"])
@pytest_twisted.ensureDeferred
async def test_x_forwarded_for_is_used_only_when_the_listener_says_so(
    tmp_path: Path, trusted: bool, audit_log: AuditRecords
) -> None:
    listeners = [{"port": 0, "bind_addresses": ["127.0.0.1"], "x_forwarded": trusted}]
    srv = await start(
        tmp_path, rc_login=_rc(address={"per_second": 0.001, "burst_count": 2}), listeners=listeners
    )
    try:
        codes = []
        for n in range(4):
            # A client-written entry first, then the address the proxy saw.
            forwarded = {"X-Forwarded-For": f"10.9.9.9, 192.0.2.{n}"}
            body = {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": "alice"},
                "password": PASSWORD,
            }
            codes.append((await srv.client.request("POST", LOGIN, json_body=body, headers=forwarded)).code)
        access = await srv.client.access_token("alice") if trusted else None
        if access is not None:
            issued = await srv.client.request(
                "POST",
                GET_TOKEN,
                json_body={"auth": {"type": "m.login.password", "password": PASSWORD}},
                access_token=access,
                headers={"X-Forwarded-For": "198.51.100.7"},
            )
            assert issued.code == 200
    finally:
        await srv.stop()
    if trusted:
        assert codes == [200, 200, 200, 200]  # four addresses, each within its own bucket
        assert audit_log.of("issue")[0]["client_address"] == "198.51.100.7"
    else:
        assert codes == [200, 200, 429, 429]  # one peer, whatever the header says


def test_log_config_with_the_json_formatter(tmp_path: Path, launch: Launcher) -> None:
    log_file = tmp_path / "audit.jsonl"
    (tmp_path / "logging.yaml").write_text(
        "version: 1\n"
        "formatters:\n  json: {(): login_token_module.audit.JsonFormatter}\n"
        "handlers:\n"
        f"  file: {{class: logging.FileHandler, filename: {log_file}, formatter: json}}\n"
        "  console: {class: logging.StreamHandler, stream: ext://sys.stderr}\n"
        "root: {level: INFO, handlers: [console]}\n"
        "loggers:\n  login_token_module.audit: {level: INFO, handlers: [file]}\n"
    )
    path = write_config(
        tmp_path,
        homeserver_yaml(tmp_path, {**SQLITE_STORE, "ratelimit": GENEROUS}, log_config="logging.yaml"),
    )
    register(path)
    server = launch(path)
    token = mint_login_token(server.base_url, access_token(server.base_url))
    assert token_login(server.base_url, token)[0] == 200
    assert server.terminate() == 0
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(r["event"], r["outcome"]) for r in records] == [("issue", "issued"), ("spend", "spent")]
    for record in records:
        assert set(audit.FIELDS) <= set(record) and record["level"] == "INFO"
        assert record["token_fingerprint"] == audit.fingerprint(token)
    assert token not in log_file.read_text() and PASSWORD not in log_file.read_text()


def test_forwarded_for_parsing() -> None:
    from login_token_module.host.server import forwarded_for

    assert forwarded_for(None) is None
    assert forwarded_for([b"1.2.3.4"]) == "1.2.3.4"
    assert forwarded_for([b"10.0.0.1, 1.2.3.4"]) == "1.2.3.4"
    assert forwarded_for([b"9.9.9.9", b"10.0.0.1,  2001:db8::1 "]) == "2001:db8::1"
    assert forwarded_for([b"1.2.3.4, not-an-address"]) is None


def test_a_fingerprint_is_a_short_hash_prefix() -> None:
    token = "mlt_" + "a" * 43 + "_abcdef"
    assert audit.fingerprint(token) == hashlib.sha256(token.encode()).hexdigest()[:8]
    assert len(audit.fingerprint(token)) == 8 and audit.fingerprint(token) not in token
    assert audit.fingerprint_prefix("ABCDEF12") == bytes.fromhex("abcdef12")
    assert audit.fingerprint_prefix(" 0123456789abcdef\n") == bytes.fromhex("0123456789abcdef")
    assert audit.fingerprint_prefix("f" * 64) == b"\xff" * 32
    # "\ufb00" (the ff ligature) is not a hex digit, though its upper case is "FF".
    bad_ones = ("abc", "abcdef1", "abcdef1g", "zzzzzzzz", "a" * 65, "a" * 66, "\ufb00abcdef", "\ufb00abcdef0")
    for bad in bad_ones:
        with pytest.raises(ValueError, match="hex digits"):  # the refusal says what a fingerprint is
            audit.fingerprint_prefix(bad)
