"""Users a password auth provider confirms, confirming get_token through the module in Synapse.

Synapse runs with the module and a small provider (``synapse_password_provider.py``)
that registers ``auth_checkers`` for ``m.login.password`` over users of its own and
registers each in Synapse on their first login, as directory modules (LDAP) do:
those users have no password hash in Synapse. The module asks Synapse's password
auth providers where the stored hash does not confirm the password, as Synapse's
own re-authentication does.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.synapse_helpers import (
    MODULE_STABLE,
    SERVER_NAME,
    STABLE,
    Client,
    Proxy,
    Synapse,
    start_nginx,
    start_synapse,
)

PROVIDER_FILE = Path(__file__).with_name("synapse_password_provider.py")
PROVIDER_USERS = {f"directory{number}": f"directory password {number}" for number in range(8)}
MODULE_CONFIG = {
    "ratelimit": {"per_second": 0.001, "burst_count": 10},
    "failed_auth_ratelimit": {"per_second": 0.001, "burst_count": 3},
}
LOGCONTEXT_TROUBLE = ("logging context", "logcontext", "Traceback")


@pytest.fixture(scope="module")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    directory = tmp_path_factory.mktemp("synapse-provider")
    # Synapse's working directory is on its import path: the provider is loaded from there.
    shutil.copy(PROVIDER_FILE, directory / PROVIDER_FILE.name)
    modules = [
        {"module": "login_token_module.LoginTokenModule", "config": MODULE_CONFIG},
        {"module": "synapse_password_provider.PasswordProvider", "config": {"users": PROVIDER_USERS}},
    ]
    server = start_synapse(directory, None, {"modules": modules})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(synapse: Synapse, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    proxy: Proxy = start_nginx(tmp_path_factory.mktemp("nginx"), synapse.port)
    try:
        yield proxy.client
    finally:
        proxy.stop()


def _directory_user(number: int) -> tuple[str, str]:
    localpart = f"directory{number}"
    return localpart, PROVIDER_USERS[localpart]


def _stored_hash(synapse: Synapse, user_id: str) -> Any:
    with sqlite3.connect(synapse.directory / "homeserver.db") as db:
        row = db.execute("SELECT password_hash FROM users WHERE name = ?", (user_id,)).fetchone()
    assert row is not None, f"{user_id} is not registered"
    return row[0]


def test_a_provider_user_confirms_get_token_through_the_module(synapse: Synapse, client: Client) -> None:
    localpart, password = _directory_user(0)
    access = client.access_token(localpart, password)  # the provider registers them now
    user_id = f"@{localpart}:{SERVER_NAME}"
    assert _stored_hash(synapse, user_id) is None
    token = client.get_login_token(access, password)
    signed_in = client.token_login(token)
    assert signed_in.code == 200, signed_in
    assert signed_in.json["user_id"] == user_id
    # Either form of the user in the UIA identifier names them.
    for named in (localpart, user_id):
        session = client.challenge(access)
        auth = {
            "type": "m.login.password",
            "session": session,
            "password": password,
            "identifier": {"type": "m.id.user", "user": named},
        }
        done = client.post(STABLE, {"auth": auth}, access)
        assert done.code == 200, done


def test_a_wrong_password_gets_403_forbidden_in_a_401_with_the_same_session(
    synapse: Synapse, client: Client
) -> None:
    localpart, password = _directory_user(1)
    access = client.access_token(localpart, password)
    session = client.challenge(access)
    wrong = client.answer(access, session, "not the directory password")
    assert wrong.code == 401, wrong
    assert wrong.json["errcode"] == "M_FORBIDDEN"
    assert wrong.json["session"] == session
    assert "login_token" not in wrong.json
    # Another user's password does not pass for this one.
    other = client.answer(access, session, _directory_user(2)[1])
    assert other.code == 401 and other.json["session"] == session, other
    right = client.answer(access, session, password)
    assert right.code == 200, right


def test_a_replayed_completed_session_issues_nothing(synapse: Synapse, client: Client) -> None:
    localpart, password = _directory_user(3)
    access = client.access_token(localpart, password)
    session = client.challenge(access)
    first = client.answer(access, session, password)
    assert first.code == 200, first
    for _ in range(2):
        replayed = client.answer(access, session, password)
        assert replayed.code == 401, replayed
        assert "login_token" not in replayed.json and replayed.json["session"] != session


def test_wrong_provider_passwords_meet_the_failed_attempt_limit(synapse: Synapse, client: Client) -> None:
    localpart, password = _directory_user(4)
    access = client.access_token(localpart, password)
    session = client.challenge(access)
    codes = [client.answer(access, session, f"guess {number}").code for number in range(4)]
    assert codes == [401, 401, 401, 429], codes
    # Refused before any check: the right password waits too.
    assert client.answer(access, session, password).code == 429


def test_a_local_user_still_confirms_with_the_stored_hash(synapse: Synapse, client: Client) -> None:
    synapse.register("localuser", "local password")
    access = client.access_token("localuser", "local password")
    assert _stored_hash(synapse, f"@localuser:{SERVER_NAME}")
    client.get_login_token(access, "local password")
    session = client.challenge(access)
    assert client.answer(access, session, "wrong local password").json["errcode"] == "M_FORBIDDEN"


def test_the_log_shows_no_trouble_and_no_password(synapse: Synapse, client: Client) -> None:
    localpart, password = _directory_user(5)
    access = client.access_token(localpart, password)
    client.get_login_token(access, password)
    time.sleep(0.5)
    log = synapse.log_once_it_shows("login token event=issue outcome=issued")
    assert not [line for line in log.splitlines() if any(word in line for word in LOGCONTEXT_TROUBLE)]
    assert password not in log


def test_with_local_passwords_off_the_providers_alone_confirm(tmp_path: Path) -> None:
    directory = tmp_path / "synapse"
    directory.mkdir()
    shutil.copy(PROVIDER_FILE, directory / PROVIDER_FILE.name)
    modules = [
        {"module": "login_token_module.LoginTokenModule", "config": MODULE_CONFIG},
        {"module": "synapse_password_provider.PasswordProvider", "config": {"users": PROVIDER_USERS}},
    ]
    synapse = start_synapse(
        directory, None, {"modules": modules, "password_config": {"localdb_enabled": False}}
    )
    proxy: Proxy | None = None
    try:
        proxy = start_nginx(tmp_path / "nginx", synapse.port)
        client = proxy.client
        localpart, password = _directory_user(6)
        access = client.access_token(localpart, password)
        session = client.challenge(access)
        wrong = client.answer(access, session, "not it")
        assert wrong.code == 401 and wrong.json["errcode"] == "M_FORBIDDEN", wrong
        right = client.answer(access, session, password)
        assert right.code == 200, right
        assert client.token_login(right.json["login_token"]).code == 200
    finally:
        if proxy is not None:
            proxy.stop()
        synapse.stop()


def test_with_no_password_anywhere_get_token_says_so_instead_of_counting_a_wrong_one(
    tmp_path: Path,
) -> None:
    """Local passwords off and no provider for m.login.password: no password can confirm the
    request, so the answer is 403 saying so (single sign-on is the way), not a failed stage."""
    directory = tmp_path / "synapse"
    directory.mkdir()
    modules = [{"module": "login_token_module.LoginTokenModule", "config": MODULE_CONFIG}]
    synapse = start_synapse(
        directory, None, {"modules": modules, "password_config": {"localdb_enabled": False}}
    )
    try:
        access = synapse.register_signed_in("nopassword", "kept by Synapse, never checked")
        client = synapse.direct
        session = client.challenge(access, MODULE_STABLE)
        refused = client.answer(access, session, "kept by Synapse, never checked", MODULE_STABLE)
        assert refused.code == 403, refused
        assert refused.json["errcode"] == "M_FORBIDDEN", refused
        assert refused.json["error"].startswith("This account has no password"), refused
        assert "login_token" not in refused.json
    finally:
        synapse.stop()
