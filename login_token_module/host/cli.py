"""``login-token-module``: run the reference homeserver and manage its users."""

from __future__ import annotations

import argparse
import getpass
import sys

from login_token_module.config import ConfigError
from login_token_module.host import database
from login_token_module.host.config import HomeserverConfig, load_config_file
from login_token_module.host.passwords import hash_password_sync
from login_token_module.host.process import (
    PROG,
    CliError,
    print_error,
    run_homeserver,
    setup_logging,
)
from login_token_module.host.resources import LOCALPART_RE

MAX_WORKERS = 64


def _load(path: str) -> HomeserverConfig:
    try:
        return load_config_file(path)
    except OSError as error:
        raise CliError(f"cannot read config file {path}: {error.strerror or error}") from None
    except ConfigError as error:
        raise CliError(f"config error in {path}: {error}") from None


def serve(args: argparse.Namespace) -> int:
    if not 1 <= args.workers <= MAX_WORKERS:
        raise CliError(f"--workers must be a whole number from 1 to {MAX_WORKERS}")
    config = _load(args.config)
    setup_logging(args.log_level, config.log_config)
    from login_token_module.host.limits import log_open_files_limit, set_open_files_limit

    # Before any worker is forked: they inherit it. Logged once everything serves.
    open_files = set_open_files_limit(config.soft_file_limit)
    if args.workers > 1:
        from login_token_module.host.workers import serve_workers

        return serve_workers(
            config, args.config, args.workers, on_ready=lambda: log_open_files_limit(open_files)
        )
    return run_homeserver(config, args.config, on_ready=lambda: log_open_files_limit(open_files))


def _read_password(args: argparse.Namespace) -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Confirm password: "):
            raise CliError("the passwords do not match")
        password = first
    else:
        password = sys.stdin.read()
        if password.endswith("\n"):
            password = password[:-1]
        if password.endswith("\r"):
            password = password[:-1]
    if not password:
        raise CliError("the password is empty")
    if "\x00" in password:
        raise CliError("the password contains a NUL character")
    return password


def register_user(args: argparse.Namespace) -> int:
    config = _load(args.config)
    localpart = args.localpart
    if localpart.startswith("@"):
        localpart, _, domain = localpart[1:].partition(":")
        if domain != config.server_name:
            raise CliError(f"user ids here end in :{config.server_name}")
    if not LOCALPART_RE.match(localpart):
        raise CliError("a user name may only contain a-z, 0-9 and . _ = - / +")
    user_id = f"@{localpart}:{config.server_name}"
    try:
        # Checked before the password is asked for, so a bad database fails at once.
        database.connect_now(config.database).close()
    except ConfigError as error:
        raise CliError(f"config error in {args.config}: {error}") from None
    password = _read_password(args)
    password_hash = hash_password_sync(password, config.bcrypt_rounds)
    conn = database.connect_now(config.database)
    try:
        try:
            database.create_user(conn, user_id, password_hash)
            print(f"Created user {user_id}")
        except database.UserExistsError:
            if not args.exist_ok:
                raise CliError(f"user {user_id} already exists") from None
            database.set_password_hash(conn, user_id, password_hash)
            print(f"User {user_id} already existed; password updated")
    finally:
        conn.close()
    return 0


def tokens(args: argparse.Namespace) -> int:
    from login_token_module.host import tokens_cli

    config = _load(args.config)
    # Revocations are audit records: to the server's log_config if it has one, else stderr.
    setup_logging("INFO", config.log_config, twisted=False)
    try:
        return tokens_cli.run(args, config)
    except tokens_cli.TokensError as error:
        raise CliError(str(error)) from None


def pair(args: argparse.Namespace) -> int:
    from login_token_module.host import pair_cli

    try:
        pair_cli.pair(args.homeserver, args.credentials, args.device_name, qr_png=args.qr_png)
    except pair_cli.PairError as error:
        raise CliError(str(error)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The reference Matrix homeserver for login_token_module."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the homeserver until SIGTERM or SIGINT")
    serve_parser.add_argument("-c", "--config", required=True, help="homeserver YAML config file")
    serve_parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO"
    )
    serve_parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes answering on the same port (default 1); more than one needs state shared"
        " through the database (sqlite or postgres store)",
    )
    serve_parser.set_defaults(func=serve)
    register = commands.add_parser(
        "register-user",
        help="create a user; the password comes from standard input, or is asked for twice on a terminal",
    )
    register.add_argument("-c", "--config", required=True, help="homeserver YAML config file")
    register.add_argument("localpart", help="the user name, e.g. alice (or @alice:server)")
    register.add_argument(
        "--exist-ok", action="store_true", help="if the user exists, set the new password instead of failing"
    )
    register.set_defaults(func=register_user)
    from login_token_module.host.tokens_cli import add_parser

    add_parser(commands)
    commands.choices["tokens"].set_defaults(func=tokens)
    pairing = commands.add_parser(
        "pair",
        help="sign this device in by code: show a code and a QR code, wait for a signed-in device"
        " to approve it, write the new session's credentials",
    )
    pairing.add_argument(
        "--homeserver", required=True, help="the homeserver's URL, e.g. https://matrix.example.org"
    )
    pairing.add_argument("--device-name", help="the name the approving device sees, and the new device gets")
    pairing.add_argument(
        "--credentials",
        required=True,
        help="the file to write homeserver, user_id, device_id and access_token to (created 0600)",
    )
    pairing.add_argument("--qr-png", help="also write the QR code as a PNG image to this file")
    pairing.set_defaults(func=pair)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except CliError as error:
        print_error(error)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
