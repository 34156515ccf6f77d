"""``login-token-module``: run the reference homeserver and manage its users."""

from __future__ import annotations

import argparse
import getpass
import logging
import logging.config
import signal
import sys
from collections.abc import Callable
from typing import Any

from login_token_module.config import ConfigError
from login_token_module.host import database
from login_token_module.host.config import HomeserverConfig, ListenerConfig, load_config_file
from login_token_module.host.passwords import hash_password_sync
from login_token_module.host.resources import LOCALPART_RE

PROG = "login-token-module"
MAX_WORKERS = 64


class CliError(Exception):
    """A problem to report as one line and exit 1."""


def _load(path: str) -> HomeserverConfig:
    try:
        return load_config_file(path)
    except OSError as error:
        raise CliError(f"cannot read config file {path}: {error.strerror or error}") from None
    except ConfigError as error:
        raise CliError(f"config error in {path}: {error}") from None


LOG_FORMAT = "%(asctime)s {who}%(levelname)s %(name)s: %(message)s"


# Whether logging follows the config's log_config (whose formatters are then left alone).
_configured_by_file = False


def _setup_logging(level: str, log_config: str | None = None, *, twisted: bool = True) -> None:
    """Plain lines on stderr at ``level``, or, with a ``log_config`` file (Synapse's key), that
    file's Python logging config (``logging.config.dictConfig``'s YAML shape)."""
    global _configured_by_file
    if log_config is not None:
        import yaml

        try:
            with open(log_config, encoding="utf-8") as handle:
                logging.config.dictConfig(yaml.safe_load(handle))
        except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError, ImportError) as error:
            raise CliError(f"cannot use log_config {log_config}: {error}") from None
        _configured_by_file = True
    else:
        logging.basicConfig(
            level=getattr(logging, level.upper()),
            format=LOG_FORMAT.format(who=""),
            stream=sys.stderr,
        )
    if twisted:
        from twisted.logger import STDLibLogObserver, globalLogBeginner

        globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)


def name_log_lines(who: str) -> None:
    """Start every log line with ``who`` (which worker process wrote it); a log_config's
    formatters are kept (the JSON formatter adds a ``process`` field instead)."""
    if _configured_by_file:
        return
    formatter = logging.Formatter(LOG_FORMAT.format(who=f"[{who}] "))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


def serve(args: argparse.Namespace) -> int:
    if not 1 <= args.workers <= MAX_WORKERS:
        raise CliError(f"--workers must be a whole number from 1 to {MAX_WORKERS}")
    config = _load(args.config)
    _setup_logging(args.log_level, config.log_config)
    from login_token_module.host.limits import log_open_files_limit, set_open_files_limit

    # Before any worker is forked: they inherit it. Logged once everything serves.
    open_files = set_open_files_limit(config.soft_file_limit)
    if args.workers > 1:
        from login_token_module.host.workers import serve_workers

        return serve_workers(
            config, args.config, args.workers, on_ready=lambda: log_open_files_limit(open_files)
        )
    return run_homeserver(config, args.config, on_ready=lambda: log_open_files_limit(open_files))


def run_homeserver(
    config: HomeserverConfig,
    config_path: str,
    *,
    workers: int = 1,
    worker_addresses: list[tuple[ListenerConfig, str, int]] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Build, start and run the homeserver in this process until SIGTERM or SIGINT."""
    from twisted.internet import reactor

    from login_token_module.host.server import Homeserver

    r: Any = reactor
    try:
        hs = Homeserver(config, r, workers=workers, worker_addresses=worker_addresses)
        hs.start()
    except ConfigError as error:
        raise CliError(f"config error in {config_path}: {error}") from None
    except Exception as error:  # e.g. the port is taken
        raise CliError(f"cannot start: {error}") from None
    if on_ready is not None:
        on_ready()

    stopping = False

    def shut_down(signum: int, frame: Any) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        logging.getLogger(__name__).info("Signal %d received, stopping", signum)

        from twisted.internet import defer

        d = defer.ensureDeferred(hs.stop())
        d.addBoth(lambda _: r.stop())

    signal.signal(signal.SIGTERM, lambda s, f: r.callFromThread(shut_down, s, f))
    signal.signal(signal.SIGINT, lambda s, f: r.callFromThread(shut_down, s, f))
    r.run(installSignalHandlers=False)
    return 0


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
    _setup_logging("INFO", config.log_config, twisted=False)
    try:
        return tokens_cli.run(args, config)
    except tokens_cli.TokensError as error:
        raise CliError(str(error)) from None


def print_error(error: CliError) -> None:
    print(f"{PROG}: {error}", file=sys.stderr, flush=True)


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
