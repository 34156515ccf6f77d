"""The module in a host that mints, spends and advertises login tokens itself, as Synapse does.

Synapse runs the module in its own process (``test_synapse.py``), out of reach of
in-process checks. Here the reference homeserver is given a ModuleApi whose
``abilities`` say the host mints the tokens: ``create_login_token`` keeps them
in a table of the host's own, and ``invalidate_login_tokens`` deletes from it
the unused ones whose hashes it is given. Everything else (HTTP, accounts,
passwords, logout) is the reference host as it is, so the module's side of
that contract is exercised over HTTP: it asks the host for the token, keeps
only its hash with the device that asked, revokes through the host at logout,
sweeps what it keeps, and neither advertises nor spends tokens itself.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import REGISTRY

from login_token_module.api import HostAbilities
from login_token_module.config import ConfigError
from login_token_module.host import server as host_server
from login_token_module.host.module_api import HostModuleApi
from login_token_module.stores.engines.connection import Database
from login_token_module.stores.engines.sqlite import SqliteDatabase
from login_token_module.stores.sql import STATE_SCHEMA
from tests.helpers import REACTOR, AuditRecords, InProcessServer, start_in_process
from tests.test_operators import login_device, mint

USER = "@alice:test.local"
LIFETIME_MS = 90_000
LOGOUT = "/_matrix/client/v3/logout"


@dataclass
class HostToken:
    user_id: str
    expires_at_ms: int
    used: bool = False


class MintingHostApi(HostModuleApi):
    """The reference host's ModuleApi, but the host keeps the login tokens (as Synapse does)."""

    tokens: dict[str, HostToken]
    lifetimes: list[int]
    invalidations: list[tuple[str, frozenset[bytes]]]

    @property
    def abilities(self) -> HostAbilities:
        return HostAbilities(mints_login_tokens=True, advertises_get_login_token=True)

    async def create_login_token(self, user_id: str, duration_in_ms: int) -> str:
        token = "syl_" + secrets.token_urlsafe(15)
        self.lifetimes.append(duration_in_ms)
        self.tokens[token] = HostToken(user_id, int(REACTOR.seconds() * 1000) + duration_in_ms)
        return token

    async def invalidate_login_tokens(self, user_id: str, token_hashes: Collection[bytes]) -> list[bytes]:
        self.invalidations.append((user_id, frozenset(token_hashes)))
        found = []
        for token, held in list(self.tokens.items()):
            token_hash = hashlib.sha256(token.encode()).digest()
            if held.user_id == user_id and not held.used and token_hash in token_hashes:
                del self.tokens[token]
                found.append(token_hash)
        return found


@pytest.fixture
def host_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MintingHostApi]]:
    """Every ModuleApi the host makes is a MintingHostApi; the list holds them."""
    made: list[MintingHostApi] = []

    def make(hs: Any, name: str) -> MintingHostApi:
        api = MintingHostApi(hs, name)
        api.tokens, api.lifetimes, api.invalidations = {}, [], []
        made.append(api)
        return api

    monkeypatch.setattr(host_server, "HostModuleApi", make)
    yield made


async def start(tmp_path: Path, **module_config: Any) -> InProcessServer:
    srv = await start_in_process(
        tmp_path,
        {
            "token_lifetime_ms": LIFETIME_MS,
            "ratelimit": {"per_second": 100, "burst_count": 100},
            **module_config,
        },
    )
    await srv.register("alice")
    return srv


def store_timings(operation: str) -> float:
    """How many times the module has timed ``operation`` (its store-duration histogram's count)."""
    name = "login_token_module_store_duration_seconds_count"
    return REGISTRY.get_sample_value(name, {"operation": operation}) or 0.0


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:8]


@pytest_twisted.ensureDeferred
async def test_the_token_is_the_hosts_and_the_module_keeps_only_its_hash(
    tmp_path: Path, host_api: list[MintingHostApi], audit_log: AuditRecords
) -> None:
    srv = await start(tmp_path)
    try:
        (api,) = host_api
        phone = await login_device(srv, "PHONE")
        minted = store_timings("mint")
        issued = await srv.client.get_login_token(phone)
        assert issued.code == 200, issued
        assert store_timings("mint") == minted + 1  # the host's minting is timed as the store's calls are
        token = issued.json["login_token"]
        assert issued.json["expires_in_ms"] == LIFETIME_MS
        assert list(api.tokens) == [token]
        assert api.tokens[token].user_id == USER
        assert api.lifetimes == [LIFETIME_MS]
        module = srv.module
        (entry,) = await module.minted.lineage(USER)
        assert entry.token_hash == hashlib.sha256(token.encode()).digest()
        assert entry.minted_by_device == "PHONE"
        assert entry.expires_at_ms - entry.issued_at_ms == LIFETIME_MS
        assert await module.minted.count_outstanding(entry.issued_at_ms) == 1
        # The module has no token store of its own in this host.
        assert not hasattr(module, "store")
    finally:
        await srv.stop()
    (record,) = audit_log.of("issue")
    assert (record["user_id"], record["minted_by_device"]) == (USER, "PHONE")
    assert record["token_fingerprint"] == fingerprint(token)


@pytest_twisted.ensureDeferred
async def test_logout_asks_the_host_to_revoke_only_that_devices_unused_tokens(
    tmp_path: Path, host_api: list[MintingHostApi], audit_log: AuditRecords
) -> None:
    srv = await start(tmp_path)
    try:
        (api,) = host_api
        phone, laptop = await login_device(srv, "PHONE"), await login_device(srv, "LAPTOP")
        first, spent = await mint(srv, phone), await mint(srv, phone)
        kept = await mint(srv, laptop)
        api.tokens[spent].used = True  # the host's own login spent this one

        revocations = store_timings("revoke")
        assert (await srv.client.post(LOGOUT, {}, phone)).code == 200
        assert store_timings("revoke") == revocations + 1

        (asked,) = api.invalidations
        hashes = {hashlib.sha256(t.encode()).digest() for t in (first, spent)}
        assert asked == (USER, frozenset(hashes))
        assert set(api.tokens) == {spent, kept}
        # The laptop's token is still the module's to revoke later.
        (left,) = await srv.module.minted.list_tokens(0, USER)
        assert left.minted_by_device == "LAPTOP"
    finally:
        await srv.stop()
    # Only the token the host still had is recorded as revoked.
    (revoked,) = audit_log.of("revoke")
    assert (revoked["minted_by_device"], revoked["reason"]) == ("PHONE", "logout")
    assert revoked["token_fingerprint"] == fingerprint(first)


@pytest_twisted.ensureDeferred
async def test_a_logout_with_nothing_minted_does_not_ask_the_host(
    tmp_path: Path, host_api: list[MintingHostApi], audit_log: AuditRecords
) -> None:
    srv = await start(tmp_path)
    try:
        (api,) = host_api
        phone, laptop = await login_device(srv, "PHONE"), await login_device(srv, "LAPTOP")
        await mint(srv, laptop)
        assert (await srv.client.post(LOGOUT, {}, phone)).code == 200
        assert api.invalidations == []
        assert len(api.tokens) == 1
    finally:
        await srv.stop()
    assert audit_log.of("revoke") == []


@pytest_twisted.ensureDeferred
async def test_revoke_on_logout_false_leaves_the_hosts_tokens(
    tmp_path: Path, host_api: list[MintingHostApi]
) -> None:
    srv = await start(tmp_path, revoke_on_logout=False)
    try:
        (api,) = host_api
        phone = await login_device(srv, "PHONE")
        token = await mint(srv, phone)
        assert (await srv.client.post(LOGOUT, {}, phone)).code == 200
        assert api.invalidations == []
        assert list(api.tokens) == [token]
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_the_sweep_forgets_the_hashes_of_expired_host_tokens(
    tmp_path: Path, host_api: list[MintingHostApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = await start(tmp_path, sweep_interval_ms=3_600_000)
    try:
        module = srv.module
        await mint(srv, await login_device(srv, "PHONE"))
        (entry,) = await module.minted.list_tokens(0, USER)
        monkeypatch.setattr(module, "_now", lambda: (entry.expires_at_ms - 0.5) / 1000)
        await module.sweep()
        assert await module.minted.count_tokens() == 1
        monkeypatch.setattr(module, "_now", lambda: (entry.expires_at_ms + 0.5) / 1000)
        await module.sweep()
        assert await module.minted.count_tokens() == 0
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_the_module_leaves_advertising_and_token_login_to_the_host(
    tmp_path: Path, host_api: list[MintingHostApi]
) -> None:
    srv = await start(tmp_path)
    try:
        access = await login_device(srv, "PHONE")
        flows = (await srv.client.get("/_matrix/client/v3/login")).json["flows"]
        assert all("get_login_token" not in flow for flow in flows), flows
        assert "m.login.token" not in [flow["type"] for flow in flows]
        capabilities = (await srv.client.get("/_matrix/client/v3/capabilities", access)).json["capabilities"]
        assert "m.get_login_token" not in capabilities
        assert "org.matrix.msc3882.get_login_token" not in capabilities
        features = (await srv.client.get("/_matrix/client/versions")).json.get("unstable_features", {})
        assert "org.matrix.msc3882" not in features and "org.matrix.msc3882.r1" not in features
        # No m.login.token checker of the module's: this host's login does not know the type.
        token = await mint(srv, access)
        refused = await srv.client.token_login(token)
        assert refused.code == 400, refused
        assert refused.json["errcode"] == "M_UNKNOWN"
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_a_store_in_the_config_is_refused_where_the_host_keeps_tokens(
    tmp_path: Path, host_api: list[MintingHostApi]
) -> None:
    with pytest.raises(ConfigError) as raised:
        await start_in_process(tmp_path, {"store": {"type": "memory"}})
    assert raised.value.path == ["modules", 0, "config", "store"]
    assert str(raised.value) == (
        "modules[0].config.store: this host keeps login tokens in its own database, so the module"
        " has no token store; remove 'store' from the module's config"
    )


class LendingHostApi(MintingHostApi):
    """A host that mints the tokens and lends the module a database for the rest, as
    Synapse does (there: its own database, through run_db_interaction)."""

    database: SqliteDatabase

    @property
    def state_database(self) -> Database | None:
        return self.database


@pytest.fixture
def lending_host_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[LendingHostApi]]:
    made: list[LendingHostApi] = []

    def make(hs: Any, name: str) -> LendingHostApi:
        api = LendingHostApi(hs, name)
        api.tokens, api.lifetimes, api.invalidations = {}, [], []
        api.database = SqliteDatabase(REACTOR, str(tmp_path / "lent.db"), schema=STATE_SCHEMA, name="lent")
        made.append(api)
        return api

    monkeypatch.setattr(host_server, "HostModuleApi", make)
    yield made


@pytest_twisted.ensureDeferred
async def test_a_host_that_lends_a_database_gets_the_modules_state_there(
    tmp_path: Path, lending_host_api: list[LendingHostApi]
) -> None:
    srv = await start(tmp_path)
    try:
        (api,) = lending_host_api
        phone, laptop = await login_device(srv, "PHONE"), await login_device(srv, "LAPTOP")
        pending = await srv.client.post("/_matrix/client/v1/login/get_token", {}, phone)
        assert pending.code == 401, pending
        first, kept = await mint(srv, phone), await mint(srv, laptop)
        with sqlite3.connect(tmp_path / "lent.db") as db:
            # The UIA session, the buckets and the notes of the host's tokens are in the lent file.
            sessions = db.execute("SELECT session_id FROM login_token_uia_sessions").fetchall()
            assert (pending.json["session"],) in sessions
            limiters = {row[0] for row in db.execute("SELECT limiter FROM login_token_ratelimits")}
            assert limiters == {"get_token", "get_token_failed_auth"}
            notes = db.execute("SELECT token_hash, device_id FROM login_tokens ORDER BY device_id").fetchall()
            assert notes == [
                (hashlib.sha256(kept.encode()).digest(), "LAPTOP"),
                (hashlib.sha256(first.encode()).digest(), "PHONE"),
            ]
        assert (await srv.client.post(LOGOUT, {}, phone)).code == 200
        (asked,) = api.invalidations
        assert asked == (USER, frozenset({hashlib.sha256(first.encode()).digest()}))
        assert set(api.tokens) == {kept}
        history = {entry.minted_by_device: entry.outcome for entry in await srv.module.minted.lineage(USER)}
        assert history == {"PHONE": "revoked", "LAPTOP": None}
    finally:
        await srv.stop()
        lending_host_api[0].database.close()


class SsoHostApi(MintingHostApi):
    """A minting host that also confirms users by single sign-on at a fallback page of its
    own, as Synapse does; the test plays the page by marking a session completed."""

    sso_users: set[str]
    host_sessions: dict[str, str]  # host session -> the user it must confirm
    host_endpoints: dict[str, str]  # host session -> the endpoint it was begun for
    completed: dict[str, str]  # host session -> the user who signed in there

    async def single_sign_on_available(self, user_id: str) -> bool:
        return user_id in self.sso_users

    async def begin_single_sign_on(self, user_id: str, endpoint: str) -> str:
        session_id = "host" + secrets.token_hex(8)
        self.host_sessions[session_id] = user_id
        self.host_endpoints[session_id] = endpoint
        return session_id

    async def completed_single_sign_on(self, session_id: str, user_id: str) -> bool:
        return self.completed.get(session_id) == user_id


@pytest.fixture
def sso_host_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[SsoHostApi]]:
    made: list[SsoHostApi] = []

    def make(hs: Any, name: str) -> SsoHostApi:
        api = SsoHostApi(hs, name)
        api.tokens, api.lifetimes, api.invalidations = {}, [], []
        api.sso_users, api.host_sessions, api.host_endpoints, api.completed = {USER}, {}, {}, {}
        made.append(api)
        return api

    monkeypatch.setattr(host_server, "HostModuleApi", make)
    yield made


GET_TOKEN = "/_matrix/client/v1/login/get_token"


def sso_failures() -> float:
    return REGISTRY.get_sample_value("login_token_module_uia_failures_total", {"reason": "sso"}) or 0.0


@pytest_twisted.ensureDeferred
async def test_single_sign_on_named_before_it_is_complete_is_a_failed_stage(
    tmp_path: Path, sso_host_api: list[SsoHostApi]
) -> None:
    """A client that sends ``m.login.sso`` before the user finished at the host's page gets
    the stage's 401 with M_FORBIDDEN, counted as an sso failure; with no session it gets a
    fresh one, begun at the host for the endpoint that asked."""
    srv = await start(tmp_path)
    try:
        (api,) = sso_host_api
        phone = await login_device(srv, "PHONE")
        session = (await srv.client.post(GET_TOKEN, {}, phone)).json["session"]
        before = sso_failures()
        early = await srv.client.post(GET_TOKEN, {"auth": {"type": "m.login.sso", "session": session}}, phone)
        assert (early.code, early.json.get("errcode")) == (401, "M_FORBIDDEN"), early
        assert early.json["error"] == "Single sign-on is not complete in this session"
        assert early.json["session"] == session
        assert sso_failures() == before + 1

        fresh = await srv.client.post(GET_TOKEN, {"auth": {"type": "m.login.sso"}}, phone)
        assert (fresh.code, fresh.json.get("errcode")) == (401, "M_FORBIDDEN"), fresh
        new_session = fresh.json["session"]
        assert new_session != session
        assert api.host_endpoints[new_session] == GET_TOKEN
        assert sso_failures() == before + 2
        # The fresh session is held like any other: completed at the host, it mints.
        api.completed[new_session] = USER
        done = await srv.client.post(GET_TOKEN, {"auth": {"session": new_session}}, phone)
        assert done.code == 200 and done.json["login_token"], done
        # A bare session (no stage named) is a plain prompt, not a failure.
        later = (await srv.client.post(GET_TOKEN, {}, phone)).json["session"]
        plain = await srv.client.post(GET_TOKEN, {"auth": {"session": later}}, phone)
        assert plain.code == 401 and "errcode" not in plain.json, plain
        assert sso_failures() == before + 2
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_a_session_completed_by_the_hosts_single_sign_on_mints_once(
    tmp_path: Path, sso_host_api: list[SsoHostApi]
) -> None:
    srv = await start(tmp_path, ratelimit={"per_second": 0.001, "burst_count": 2})
    try:
        (api,) = sso_host_api
        phone = await login_device(srv, "PHONE")
        challenge = await srv.client.post(GET_TOKEN, {}, phone)
        assert challenge.code == 401, challenge
        assert challenge.json["flows"] == [{"stages": ["m.login.password"]}, {"stages": ["m.login.sso"]}]
        session = challenge.json["session"]
        assert api.host_sessions == {session: USER}  # the host's session, held by the module
        assert api.host_endpoints == {session: GET_TOKEN}  # begun for the endpoint that asked

        for auth in ({"session": session}, {"type": "m.login.sso", "session": session}):
            early = await srv.client.post(GET_TOKEN, {"auth": auth}, phone)
            assert early.code == 401 and early.json["session"] == session, early
            assert "login_token" not in early.json
        # Someone else signing in at the host's page completes nothing for this user.
        api.completed[session] = "@mallory:test.local"
        assert (await srv.client.post(GET_TOKEN, {"auth": {"session": session}}, phone)).code == 401

        api.completed[session] = USER
        done = await srv.client.post(GET_TOKEN, {"auth": {"session": session}}, phone)
        assert done.code == 200, done
        assert list(api.tokens) == [done.json["login_token"]]
        for auth in ({"session": session}, {"type": "m.login.sso", "session": session}):
            replayed = await srv.client.post(GET_TOKEN, {"auth": auth}, phone)
            assert replayed.code == 401 and replayed.json["session"] != session, replayed
        assert len(api.tokens) == 1

        # Admit, then work: past the rate limit a completed session is refused and kept.
        assert (await srv.client.get_login_token(phone)).code == 200
        later = (await srv.client.post(GET_TOKEN, {}, phone)).json["session"]
        api.completed[later] = USER
        limited = await srv.client.post(GET_TOKEN, {"auth": {"session": later}}, phone)
        assert limited.code == 429, limited
        assert await srv.module._uia.get(later, REACTOR.seconds()) is not None
    finally:
        await srv.stop()


@pytest_twisted.ensureDeferred
async def test_a_single_sign_on_session_lives_exactly_the_modules_session_lifetime(
    tmp_path: Path, sso_host_api: list[SsoHostApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's session, held by the module, lives the module's own UIA session lifetime:
    completed at the host, it mints 5 ms before the end of its 10 s, and not at the end."""
    srv = await start(tmp_path, ui_auth_session_lifetime_ms=10_000)
    try:
        (api,) = sso_host_api
        phone = await login_device(srv, "PHONE")
        start_at = srv.module._now()
        monkeypatch.setattr(srv.module, "_now", lambda: start_at)
        early = (await srv.client.post(GET_TOKEN, {}, phone)).json["session"]
        late = (await srv.client.post(GET_TOKEN, {}, phone)).json["session"]
        api.completed[early] = api.completed[late] = USER
        monkeypatch.setattr(srv.module, "_now", lambda: start_at + 9.995)
        done = await srv.client.post(GET_TOKEN, {"auth": {"session": early}}, phone)
        assert done.code == 200 and done.json["login_token"], done
        monkeypatch.setattr(srv.module, "_now", lambda: start_at + 10.0)
        gone = await srv.client.post(GET_TOKEN, {"auth": {"session": late}}, phone)
        assert gone.code == 401 and gone.json["session"] != late, gone
        assert len(api.tokens) == 1
    finally:
        await srv.stop()
