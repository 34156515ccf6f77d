"""``login-token-module tokens list|revoke|history``: operators' view of the login tokens.

Works on the database the config's module ``store`` names (SQLite file or
PostgreSQL), with its own connection, while the server runs: a token revoked
here is refused by the next login that presents it, on every worker. Tokens
never leave the database (only their hashes are there); they are shown by
fingerprint, the first 8 hex digits of the SHA-256, as in the audit log.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Any

from login_token_module import audit
from login_token_module.config import ConfigError, LoginTokenConfig, parse_config
from login_token_module.host.config import HomeserverConfig
from login_token_module.metrics import metrics
from login_token_module.revocation import record_revoked
from login_token_module.safe_text import escaped
from login_token_module.stores import TokenInfo, resolve_sqlite_path
from login_token_module.stores import sql as token_sql
from login_token_module.stores.engines.connection import Conn

MODULE_CLASS = "login_token_module.LoginTokenModule"


class TokensError(Exception):
    """A problem to report as one line (the CLI turns it into exit code 1)."""


def module_config(config: HomeserverConfig, config_path: str) -> LoginTokenConfig:
    for index, entry in enumerate(config.modules):
        if entry.module == MODULE_CLASS:
            try:
                return parse_config(dict(entry.config))
            except ConfigError as error:
                raise TokensError(
                    f"config error in {config_path}: {error.within('modules', index, 'config')}"
                ) from None
    raise TokensError(f"{config_path} does not load {MODULE_CLASS} (no such entry under modules:)")


def connect(config: HomeserverConfig, config_path: str) -> Conn:
    """A blocking connection to the module's token database, schema up to date."""
    store = module_config(config, config_path).store
    if store.type == "memory":
        raise TokensError(
            "the module's store is 'memory': its tokens live inside the server process, where no other"
            " program can reach them (use sqlite or postgres to manage tokens from the command line)"
        )
    if store.type == "postgres":
        from login_token_module.stores.engines import postgres
        from login_token_module.stores.engines.schema import prepare

        problem = postgres.start_up_problem(
            store.dsn, {"application_name": "login-token-module tokens"}, token_sql.STATE_SCHEMA
        )
        if problem is not None:
            raise TokensError(problem)
        conn = postgres.connect(store.dsn, {"application_name": "login-token-module tokens"})
        prepare(conn, token_sql.STATE_SCHEMA)
        return conn
    from login_token_module.stores.engines.sqlite import SqliteDatabase

    path = resolve_sqlite_path(store.path, config.config_directory)
    if path == ":memory:" or not os.path.isfile(path):
        raise TokensError(f"no token database at {path} (the server creates it when it first starts)")
    try:
        return SqliteDatabase(None, path, schema=token_sql.STATE_SCHEMA).connect()
    except Exception as error:
        raise TokensError(f"cannot open {path}: {error}") from None


def user_id(name: str, server_name: str) -> str:
    if name.startswith("@"):
        return name
    return f"@{name}:{server_name}"


def when(ms: int | None) -> str:
    if ms is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    # Device ids are the clients' choice: control characters are shown escaped, never
    # written to the operator's terminal, so one token is always one row.
    rows = [tuple(escaped(cell) for cell in row) for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    return "\n".join(lines)


def _token_rows(found: list[TokenInfo]) -> list[tuple[str, ...]]:
    return [
        (
            audit.fingerprint_of_hash(info.token_hash),
            info.user_id,
            info.minted_by_device or "-",
            when(info.issued_at_ms),
            when(info.expires_at_ms),
        )
        for info in found
    ]


TOKEN_HEADER = ("fingerprint", "user", "minted_by_device", "issued", "expires")


def run(args: argparse.Namespace, config: HomeserverConfig) -> int:
    conn = connect(config, args.config)
    now_ms = int(time.time() * 1000)
    try:
        if args.action == "list":
            user = None if args.user is None else user_id(args.user, config.server_name)
            found = token_sql.list_tokens(conn, now_ms, user)
            if not found:
                print("No outstanding login tokens" + ("" if user is None else f" for {user}"))
            else:
                print(table(TOKEN_HEADER, _token_rows(found)))
        elif args.action == "revoke":
            found = _revoke(conn, args, config, now_ms)
            print(f"Revoked {len(found)} login token(s)")
            if found:
                print(table(TOKEN_HEADER, _token_rows(found)))
        else:
            history(conn, user_id(args.user, config.server_name), now_ms)
    finally:
        conn.close()
    return 0


def _revoke(conn: Conn, args: argparse.Namespace, config: HomeserverConfig, now_ms: int) -> list[TokenInfo]:
    if args.fingerprint is not None:
        try:
            audit.fingerprint_prefix(args.fingerprint)
        except ValueError as error:
            raise TokensError(f"--fingerprint: {error}") from None
        found = token_sql.revoke_fingerprint(conn, args.fingerprint, now_ms)
    else:
        found = token_sql.revoke_tokens(conn, user_id(args.user, config.server_name), now_ms)
    record_revoked(metrics(), found, "operator")
    return found


def history(conn: Conn, user: str, now_ms: int) -> None:
    entries = token_sql.lineage(conn, user)
    if not entries:
        print(f"No login token history for {user}")
        return
    rows: list[tuple[str, ...]] = []
    for entry in entries:
        outcome = entry.outcome or ("expired" if entry.expires_at_ms <= now_ms else "outstanding")
        finished = (
            entry.finished_at_ms if entry.outcome else (entry.expires_at_ms if outcome == "expired" else None)
        )
        rows.append(
            (
                when(entry.issued_at_ms),
                entry.minted_by_device or "-",
                audit.fingerprint_of_hash(entry.token_hash),
                outcome,
                when(finished),
                "pairing" if entry.paired else "get_token",
                entry.new_device_id or "-",
            )
        )
    print(f"Login tokens of {user}, oldest first (which device minted which new device):")
    print(table(("issued", "minted_by_device", "fingerprint", "outcome", "at", "via", "new_device"), rows))


def add_parser(commands: Any) -> None:
    tokens = commands.add_parser(
        "tokens",
        help="list, revoke and trace login tokens in the module's store (works while the server runs)",
    )
    actions = tokens.add_subparsers(dest="action", required=True)
    listing = actions.add_parser(
        "list", help="outstanding tokens: fingerprint, user, minting device, issued, expires"
    )
    listing.add_argument("-c", "--config", required=True, help="homeserver YAML config file")
    listing.add_argument("--user", help="only this user's (alice or @alice:server)")
    revoke = actions.add_parser("revoke", help="revoke a user's outstanding tokens, or one by fingerprint")
    revoke.add_argument("-c", "--config", required=True, help="homeserver YAML config file")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", help="every outstanding token of this user")
    which.add_argument(
        "--fingerprint", help="the token with this fingerprint (8 hex digits, from list or the log)"
    )
    trace = actions.add_parser("history", help="which device minted which new device, and when")
    trace.add_argument("-c", "--config", required=True, help="homeserver YAML config file")
    trace.add_argument("--user", required=True, help="alice or @alice:server")
