"""The Synapse adapter's pieces that need no Synapse: the password check, the path
mapping, the SQL, and that nothing imports Synapse where it is not running.

The password check is compared with hashes made the way Synapse makes them
(``bcrypt(NFKC(password) + pepper)``, cut to 72 bytes); ``test_synapse.py``
checks the same against a real Synapse's stored hashes.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import sys
import types
import unicodedata

import bcrypt
import pytest

from login_token_module.synapse import (
    SYNAPSE_PREFIX,
    as_module_api,
    is_synapse_module_api,
    served_path,
    synapse_path,
)
from login_token_module.synapse.passwords import bcrypt_input, check_password, select_password_hash
from login_token_module.synapse.tokens import device_signed_in, invalidate_unused_tokens

PEPPER = "pepper"


def synapse_hash(password: str, pepper: str = PEPPER) -> str:
    """A hash as Synapse's AuthHandler.hash makes it."""
    data = (unicodedata.normalize("NFKC", password).encode("utf-8") + pepper.encode("utf-8"))[:72]
    return bcrypt.hashpw(data, bcrypt.gensalt(4)).decode("ascii")


def test_the_right_password_with_the_pepper_matches() -> None:
    stored = synapse_hash("hunter2")
    assert check_password("hunter2", PEPPER, stored)
    assert not check_password("hunter3", PEPPER, stored)


def test_the_pepper_is_part_of_the_check() -> None:
    stored = synapse_hash("hunter2")
    assert not check_password("hunter2", "", stored)
    assert not check_password("hunter2", "other pepper", stored)
    assert not check_password("hunter2" + PEPPER, "", synapse_hash("hunter2", pepper=""))


def test_the_password_is_normalised_with_nfkc_before_hashing() -> None:
    typed = "\uff30\uff41\uff53\uff53 \ufb01ne cafe\u0301 \u2460"
    stored = synapse_hash(typed)
    assert check_password(typed, PEPPER, stored)
    assert check_password(unicodedata.normalize("NFKC", typed), PEPPER, stored)
    assert not check_password(unicodedata.normalize("NFD", "Pass fine café 1") + "x", PEPPER, stored)
    assert bcrypt_input("\ufb01", "") == b"fi"
    # NFKC, not NFC: NFC leaves the ligature as it is.
    assert bcrypt_input("\ufb01", "") != unicodedata.normalize("NFC", "\ufb01").encode()


def test_only_the_first_72_bytes_count_as_in_synapse() -> None:
    long = "x" * 80
    stored = synapse_hash(long)
    assert check_password(long, PEPPER, stored)
    assert check_password("x" * 72 + "something else", PEPPER, stored)
    assert not check_password("x" * 71, PEPPER, stored)
    assert len(bcrypt_input(long, PEPPER)) == 72
    # The cut is in bytes of password + pepper, even through a multi-byte character.
    assert bcrypt_input("a" + "\u00e9" * 40, "") == ("a" + "\u00e9" * 35).encode() + b"\xc3"
    assert bcrypt_input("a" * 70, "pepper") == b"a" * 70 + b"pe"


def test_values_that_cannot_match_are_false_not_errors() -> None:
    assert not check_password("x", PEPPER, "not a bcrypt hash")
    assert not check_password("x", PEPPER, "\u00e9t\u00e9")
    assert not check_password("\ud800", PEPPER, synapse_hash("x"))


def test_the_stored_hash_is_read_from_synapses_users_table() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE users (name TEXT PRIMARY KEY, password_hash TEXT)")
    conn.executemany(
        "INSERT INTO users VALUES (?, ?)",
        [("@a:hs", "$2b$04$hash"), ("@sso:hs", None), ("@empty:hs", "")],
    )
    cursor = conn.cursor()
    assert select_password_hash(cursor, "@a:hs") == "$2b$04$hash"
    assert select_password_hash(cursor, "@sso:hs") is None
    assert select_password_hash(cursor, "@empty:hs") is None
    assert select_password_hash(cursor, "@nobody:hs") is None


@pytest.mark.parametrize(
    ("spec", "served"),
    [
        ("/_matrix/client/v1/login/get_token", "/_synapse/client/login_token/v1/login/get_token"),
        (
            "/_matrix/client/unstable/org.matrix.msc3882/login/get_token",
            "/_synapse/client/login_token/unstable/org.matrix.msc3882/login/get_token",
        ),
        (
            "/_matrix/client/unstable/org.matrix.msc3882/login/token",
            "/_synapse/client/login_token/unstable/org.matrix.msc3882/login/token",
        ),
    ],
)
def test_spec_paths_move_under_synapse_client(spec: str, served: str) -> None:
    assert synapse_path(spec) == served
    assert served.startswith(SYNAPSE_PREFIX)


@pytest.mark.parametrize("bad", ["/_matrix/client/", "/_matrix/federation/v1/x", "/_synapse/client/x", ""])
def test_other_paths_are_not_mapped(bad: str) -> None:
    with pytest.raises(ValueError):
        synapse_path(bad)


@pytest.mark.parametrize(
    "path", ["/_synapse/client/login_token/pair", "/_synapse/client/login_token/pair/start"]
)
def test_pairing_paths_are_served_where_they_are(path: str) -> None:
    assert served_path(path) == path


def test_spec_paths_are_served_moved_and_others_refused() -> None:
    assert served_path("/_matrix/client/v1/login/get_token") == synapse_path(
        "/_matrix/client/v1/login/get_token"
    )
    for bad in (
        "/_synapse/client/other",
        "/_synapse/client/login_token/../admin",
        "/_matrix/federation/v1/x",
    ):
        with pytest.raises(ValueError):
            served_path(bad)


def sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def test_revoking_deletes_only_the_users_unused_live_tokens_with_a_given_hash() -> None:
    """Synapse's login_tokens table as its schema has it; the module knows only hashes."""
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE login_tokens (token TEXT PRIMARY KEY, user_id TEXT NOT NULL,"
        " expiry_ts BIGINT NOT NULL, used_ts BIGINT, auth_provider_id TEXT,"
        " auth_provider_session_id TEXT)"
    )
    now = 1_700_000_000_000
    rows = {
        "syl_live_a": ("@a:hs", now + 1, None),
        "syl_live_b": ("@a:hs", now + 60_000, None),
        "syl_not_asked": ("@a:hs", now + 60_000, None),
        "syl_used": ("@a:hs", now + 60_000, now - 5),
        "syl_expired_now": ("@a:hs", now, None),
        "syl_other_user": ("@b:hs", now + 60_000, None),
    }
    conn.executemany(
        "INSERT INTO login_tokens (token, user_id, expiry_ts, used_ts) VALUES (?, ?, ?, ?)",
        [(token, *row) for token, row in rows.items()],
    )
    asked = {sha256(t) for t in ("syl_live_a", "syl_live_b", "syl_used", "syl_expired_now", "syl_other_user")}

    found = invalidate_unused_tokens(conn.cursor(), "@a:hs", frozenset(asked), now)

    assert sorted(found) == sorted([sha256("syl_live_a"), sha256("syl_live_b")])
    left = {row[0] for row in conn.execute("SELECT token FROM login_tokens")}
    assert left == set(rows) - {"syl_live_a", "syl_live_b"}
    # Nothing left to revoke: a second call finds nothing and deletes nothing.
    assert invalidate_unused_tokens(conn.cursor(), "@a:hs", frozenset(asked), now) == []
    assert {row[0] for row in conn.execute("SELECT token FROM login_tokens")} == left


def test_a_device_is_signed_in_while_it_holds_an_access_token_of_its_user() -> None:
    """Synapse's access_tokens table as its schema has it: a logout deletes the device's rows."""
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE access_tokens (id BIGINT PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT,"
        " token TEXT NOT NULL UNIQUE, valid_until_ms BIGINT, puppets_user_id TEXT, last_validated BIGINT,"
        " refresh_token_id BIGINT, used BOOLEAN)"
    )
    rows = [
        (1, "@a:hs", "PHONE", "syt_phone_1"),
        (2, "@a:hs", "PHONE", "syt_phone_2"),
        (3, "@a:hs", None, "syt_no_device"),
        (4, "@b:hs", "LAPTOP", "syt_laptop"),
    ]
    conn.executemany("INSERT INTO access_tokens (id, user_id, device_id, token) VALUES (?, ?, ?, ?)", rows)

    assert device_signed_in(conn.cursor(), "@a:hs", "PHONE")
    assert device_signed_in(conn.cursor(), "@b:hs", "LAPTOP")
    # Another user's device, a device nobody has, an empty id: not signed in.
    assert not device_signed_in(conn.cursor(), "@a:hs", "LAPTOP")
    assert not device_signed_in(conn.cursor(), "@b:hs", "PHONE")
    assert not device_signed_in(conn.cursor(), "@c:hs", "PHONE")
    assert not device_signed_in(conn.cursor(), "@a:hs", "")
    # Signed in while any of its tokens is left; out once the logout deleted the last.
    conn.execute("DELETE FROM access_tokens WHERE token = 'syt_phone_1'")
    assert device_signed_in(conn.cursor(), "@a:hs", "PHONE")
    conn.execute("DELETE FROM access_tokens WHERE token = 'syt_phone_2'")
    assert not device_signed_in(conn.cursor(), "@a:hs", "PHONE")
    # The user's token without a device signs no device in.
    assert not device_signed_in(conn.cursor(), "@a:hs", "None")


def test_a_synapse_module_api_is_recognised_by_its_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only an instance of synapse.module_api.ModuleApi, once that module is loaded, counts."""
    fake = types.ModuleType("synapse.module_api")

    class ModuleApi:
        pass

    fake.ModuleApi = ModuleApi  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "synapse.module_api", fake)
    assert is_synapse_module_api(ModuleApi())
    assert not is_synapse_module_api(object())
    assert not is_synapse_module_api(ModuleApi)
    fake.ModuleApi = "not a class"  # type: ignore[attr-defined]
    assert not is_synapse_module_api("not a class")


def test_a_non_synapse_api_passes_through() -> None:
    api = object()
    assert not is_synapse_module_api(api)
    assert as_module_api(api) is api


def test_the_module_imports_and_runs_without_synapse() -> None:
    code = (
        "import sys, login_token_module, login_token_module.synapse; "
        "from login_token_module.host import server; "
        "bad = [m for m in sys.modules if m == 'synapse' or m.startswith('synapse.')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    with pytest.raises(ModuleNotFoundError):
        __import__("synapse")


def test_the_modules_tables_get_their_prefix_in_synapses_database() -> None:
    from login_token_module.stores.sql import STATE_SCHEMA
    from login_token_module.synapse.storage import synapse_statement

    assert synapse_statement("DELETE FROM login_tokens WHERE token_hash = ?") == (
        "DELETE FROM login_token_module_tokens WHERE token_hash = ?"
    )
    assert synapse_statement("CREATE INDEX login_tokens_expiry ON login_tokens (expires_at_ms)") == (
        "CREATE INDEX login_token_module_tokens_expiry ON login_token_module_tokens (expires_at_ms)"
    )
    assert synapse_statement("UPDATE login_token_history SET outcome = 'spent'") == (
        "UPDATE login_token_module_history SET outcome = 'spent'"
    )
    assert synapse_statement("SELECT version FROM schema_versions") == (
        "SELECT version FROM login_token_module_schema_versions"
    )
    # Every name the schema creates is the module's, whatever Synapse calls its own tables.
    for migration in STATE_SCHEMA.migrations:
        for statement in (*migration.sqlite, *migration.postgres):
            renamed = synapse_statement(statement)
            created = re.findall(r"CREATE (?:TABLE|INDEX)(?: IF NOT EXISTS)? (\w+)", renamed)
            assert all(name.startswith("login_token_module_") for name in created), statement
