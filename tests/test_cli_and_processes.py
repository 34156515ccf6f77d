"""The command line and the server as child processes: config errors, signals,
restarts, crashes, logs, and two processes racing on one SQLite file.

These are plain synchronous tests (no reactor): HTTP goes through urllib.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    GET_TOKEN,
    PASSWORD,
    Launcher,
    access_token,
    call,
    cli,
    homeserver_yaml,
    mint_login_token,
    one_line,
    password_login,
    register,
    run_serve,
    sync_call,
    token_login,
    write_config,
)

WHOAMI = "/_matrix/client/v3/account/whoami"
# Enough tokens a second for tests that mint several.
GENEROUS = {"ratelimit": {"per_second": 1000, "burst_count": 1000}}
SQLITE_STORE = {"store": {"type": "sqlite", "path": "tokens.db"}, **GENEROUS}
MEMORY_STORE = {"store": {"type": "memory"}, **GENEROUS}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config with the SQLite store and a generous rate limit, and alice registered."""
    path = write_config(tmp_path, homeserver_yaml(tmp_path, SQLITE_STORE))
    register(path)
    return path


# -- the command line -----------------------------------------------------------


def test_help_for_the_command_and_its_subcommands() -> None:
    main = cli("--help")
    assert main.returncode == 0, main.stderr
    assert "serve" in main.stdout and "register-user" in main.stdout
    serve = cli("serve", "--help")
    assert serve.returncode == 0 and "--config" in serve.stdout
    reg = cli("register-user", "--help")
    assert reg.returncode == 0 and "--exist-ok" in reg.stdout
    nothing = cli()
    assert nothing.returncode == 2 and "usage" in nothing.stderr


def test_console_script_runs() -> None:
    script = Path(sys.executable).parent / "login-token-module"
    if not script.exists():
        pytest.skip("the package is not installed as a console script here")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and "register-user" in result.stdout


def test_register_user_from_stdin_then_log_in(tmp_path: Path, launch: Launcher) -> None:
    path = write_config(tmp_path, homeserver_yaml(tmp_path))
    created = cli("register-user", "-c", str(path), "carol", stdin="first pass word\n")
    assert created.returncode == 0, created.stderr
    assert "@carol:test.local" in created.stdout
    full_id = cli("register-user", "-c", str(path), "@dave:test.local", stdin="dave's pw")
    assert full_id.returncode == 0, full_id.stderr

    server = launch(path)
    assert password_login(server.base_url, "carol", "first pass word")[0] == 200
    # The trailing newline from stdin is not part of the password.
    assert password_login(server.base_url, "carol", "first pass word\n")[0] == 403
    assert password_login(server.base_url, "dave", "dave's pw")[0] == 200

    again = cli("register-user", "-c", str(path), "carol", stdin="another\n")
    assert again.returncode == 1
    assert "already exists" in one_line(again.stderr)
    assert password_login(server.base_url, "carol", "first pass word")[0] == 200

    updated = cli("register-user", "-c", str(path), "carol", "--exist-ok", stdin="second\n")
    assert updated.returncode == 0, updated.stderr
    # The running server shares the database file and sees the new password at once.
    assert password_login(server.base_url, "carol", "second")[0] == 200
    assert password_login(server.base_url, "carol", "first pass word")[0] == 403


@pytest.mark.parametrize(
    ("localpart", "stdin"),
    [
        ("Bad Name", "pw\n"),
        ("émile", "pw\n"),
        ("@erin:elsewhere", "pw\n"),
        ("", "pw\n"),
        ("frank", "\n"),
    ],
)
def test_register_user_rejects_bad_input(tmp_path: Path, localpart: str, stdin: str) -> None:
    path = write_config(tmp_path, homeserver_yaml(tmp_path))
    result = cli("register-user", "-c", str(path), localpart, stdin=stdin)
    assert result.returncode == 1
    one_line(result.stderr)
    assert result.stdout == ""


def test_register_user_with_an_unusable_database_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "homeserver.db").mkdir()
    path = write_config(tmp_path, homeserver_yaml(tmp_path))
    result = cli("register-user", "-c", str(path), "alice", stdin="pw\n")
    assert result.returncode == 1
    assert "homeserver.db" in one_line(result.stderr)


def _without(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda cfg: cfg.pop(key)


def _module_config(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda cfg: cfg["modules"][0]["config"].update(values)


BAD_CONFIGS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("lifetime", _module_config(token_lifetime_ms=-5), "modules[0].config.token_lifetime_ms"),
    (
        "per_second",
        _module_config(ratelimit={"per_second": "fast"}),
        "modules[0].config.ratelimit.per_second",
    ),
    ("store_type", _module_config(store={"type": "redis"}), "modules[0].config.store.type"),
    ("module_key", _module_config(colour="blue"), "modules[0].config.colour"),
    ("ui_auth", _module_config(require_ui_auth="yes"), "modules[0].config.require_ui_auth"),
    ("top_level", lambda cfg: cfg.update(colour="blue"), "colour"),
    ("server_name", _without("server_name"), "server_name"),
    ("listeners", _without("listeners"), "listeners"),
    ("port", lambda cfg: cfg["listeners"][0].update(port="eighty"), "listeners[0].port"),
    ("bcrypt", lambda cfg: cfg.update(bcrypt_rounds=2), "bcrypt_rounds"),
    ("database", lambda cfg: cfg.update(database={"name": "postgres"}), "database.name"),
    ("module_path", lambda cfg: cfg["modules"][0].update(module="no.such.Module"), "modules[0].module"),
    ("module_class", lambda cfg: cfg["modules"][0].update(module="login_token_module.Nope"), "modules[0]"),
    (
        "database_folder",
        lambda cfg: cfg["database"]["args"].update(database="no/such/folder/homeserver.db"),
        "database.args.database",
    ),
    (
        "store_folder",
        _module_config(store={"type": "sqlite", "path": "no/such/folder/tokens.db"}),
        "modules[0].config.store.path",
    ),
    (
        "database_is_a_folder",
        lambda cfg: cfg["database"]["args"].update(database="."),
        "database.args.database",
    ),
    (
        "store_is_a_folder",
        _module_config(store={"type": "sqlite", "path": "."}),
        "modules[0].config.store.path",
    ),
]


@pytest.mark.parametrize(
    ("change", "key"), [(c, k) for _, c, k in BAD_CONFIGS], ids=[n for n, _, _ in BAD_CONFIGS]
)
def test_bad_config_stops_serve_with_one_line_naming_the_key(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], key: str
) -> None:
    raw = homeserver_yaml(tmp_path)
    change(raw)
    path = write_config(tmp_path, raw)
    result = run_serve(path)
    assert result.returncode == 1, result
    line = one_line(result.stderr)
    assert key in line, line
    assert str(path) in line


def test_invalid_yaml_and_missing_file_stop_serve_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "homeserver.yaml"
    path.write_text("server_name: test.local\nlisteners: [\n  - port: 8008\n")
    result = run_serve(path)
    assert result.returncode == 1
    assert "YAML" in one_line(result.stderr)

    missing = run_serve(tmp_path / "nowhere.yaml")
    assert missing.returncode == 1
    assert "nowhere.yaml" in one_line(missing.stderr)

    # register-user reads the same config and fails the same way.
    registered = cli("register-user", "-c", str(path), "alice", stdin="pw\n")
    assert registered.returncode == 1
    assert "YAML" in one_line(registered.stderr)


def test_port_in_use_stops_serve_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, homeserver_yaml(tmp_path, port=port))
        result = run_serve(path)
    assert result.returncode == 1
    assert "cannot start" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


# -- the server's life --------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_cleanly_on_signal(config: Path, launch: Launcher, sig: signal.Signals) -> None:
    server = launch(config)
    assert sync_call(server.base_url, "GET", "/_matrix/client/versions")[0] == 200
    assert server.terminate(sig) == 0
    log = server.log()
    assert "stopping" in log
    assert "Traceback" not in log
    with pytest.raises(urllib.error.URLError):
        sync_call(server.base_url, "GET", "/_matrix/client/versions")


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, launch: Launcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf"
    elsewhere = tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    # No store path: the module's default file name, also relative.
    path = write_config(folder, homeserver_yaml(folder, {}))
    monkeypatch.chdir(elsewhere)
    result = cli("register-user", "-c", str(path), "alice", stdin=PASSWORD, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    server = launch(path)
    login_token = mint_login_token(server.base_url, access_token(server.base_url))
    assert token_login(server.base_url, login_token)[0] == 200
    assert server.terminate() == 0

    assert (folder / "homeserver.db").is_file()
    assert (folder / "login_tokens.db").is_file()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_sqlite_tokens_survive_a_restart(config: Path, launch: Launcher, sig: signal.Signals) -> None:
    first = launch(config)
    login_token = mint_login_token(first.base_url, access_token(first.base_url))
    old_access = access_token(first.base_url)
    code = first.terminate(sig)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)

    second = launch(config, "restarted.log")
    code, body = token_login(second.base_url, login_token)
    assert code == 200, body
    assert body["user_id"] == "@alice:test.local"
    again = token_login(second.base_url, login_token)
    assert (again[0], again[1]["errcode"]) == (403, "M_FORBIDDEN")
    # Access tokens issued before the restart still work too.
    assert sync_call(second.base_url, "GET", WHOAMI, access_token=old_access)[0] == 200


def test_memory_tokens_do_not_survive_a_restart(tmp_path: Path, launch: Launcher) -> None:
    path = write_config(tmp_path, homeserver_yaml(tmp_path, MEMORY_STORE))
    register(path)
    first = launch(path)
    token = access_token(first.base_url)
    # The memory store works while the process lives...
    assert token_login(first.base_url, mint_login_token(first.base_url, token))[0] == 200
    login_token = mint_login_token(first.base_url, token)
    assert first.terminate() == 0

    second = launch(path, "restarted.log")
    code, body = token_login(second.base_url, login_token)
    assert (code, body["errcode"]) == (403, "M_FORBIDDEN")
    # ...while users and access tokens live in the host's database and do survive.
    assert sync_call(second.base_url, "GET", WHOAMI, access_token=token)[0] == 200
    assert not (tmp_path / "tokens.db").exists()
    assert not (tmp_path / "login_tokens.db").exists()


def test_log_holds_no_passwords_or_tokens(config: Path, launch: Launcher) -> None:
    server = launch(config)
    base = server.base_url
    wrong_password = "wrong-password-7Qx9"
    assert password_login(base, "alice", wrong_password)[0] == 403
    first_access = access_token(base)

    code, challenge = sync_call(base, "POST", GET_TOKEN, {}, first_access)
    bad_auth = {"type": "m.login.password", "password": wrong_password, "session": challenge["session"]}
    assert sync_call(base, "POST", GET_TOKEN, {"auth": bad_auth}, first_access)[0] == 401
    login_token = mint_login_token(base, first_access)
    code, by_token = token_login(base, login_token)
    assert code == 200
    second_access = str(by_token["access_token"])
    assert token_login(base, login_token)[0] == 403
    assert sync_call(base, "GET", f"{WHOAMI}?access_token={second_access}")[0] == 200
    assert sync_call(base, "POST", f"{GET_TOKEN}?access_token={second_access}", {})[0] == 401
    assert sync_call(base, "GET", f"{WHOAMI}?access_token=mat_not_a_real_token_8Kd2")[0] == 401
    assert sync_call(base, "POST", "/_matrix/client/v3/logout", {}, first_access)[0] == 200
    assert server.terminate() == 0

    log = server.log()
    # The requests were logged, by path only.
    assert "/_matrix/client/v3/account/whoami" in log and "/_matrix/client/v1/login/get_token" in log
    assert "access_token" not in log
    secrets = [
        PASSWORD,
        wrong_password,
        login_token,
        first_access,
        second_access,
        "mat_not_a_real_token_8Kd2",
    ]
    for secret in secrets:
        assert secret not in log
        # Not even a part of it.
        middle = len(secret) // 2
        assert secret[middle - 6 : middle + 6] not in log, secret


# -- two processes, one SQLite file ---------------------------------------------


def test_two_processes_never_both_spend_one_token(config: Path, launch: Launcher) -> None:
    servers = [launch(config, "a.log"), launch(config, "b.log")]
    bases = [s.base_url for s in servers]
    session = access_token(bases[0])
    attempts = 40

    for round_number in range(5):
        login_token = mint_login_token(bases[round_number % 2], session)
        barrier = threading.Barrier(attempts)

        def attempt(index: int, login_token: str = login_token, barrier: threading.Barrier = barrier) -> int:
            barrier.wait(10)
            return token_login(bases[index % 2], login_token)[0]

        with ThreadPoolExecutor(max_workers=attempts) as pool:
            codes = list(pool.map(attempt, range(attempts)))
        assert sorted(codes) == [200] + [403] * (attempts - 1), (round_number, codes)

    # Both processes answer from the same users and access tokens.
    for base in bases:
        assert sync_call(base, "GET", WHOAMI, access_token=session)[1]["user_id"] == "@alice:test.local"
    for server in servers:
        assert server.terminate() == 0


def test_config_written_as_yaml_is_what_serve_reads(tmp_path: Path, launch: Launcher) -> None:
    """sample_config.yaml (the README's walkthrough runs it), with free ports, starts and serves the flow."""
    sample = yaml.safe_load((Path(__file__).resolve().parent.parent / "sample_config.yaml").read_text())
    for listener in sample["listeners"]:
        listener["port"] = 0
    assert [listener.get("type", "http") for listener in sample["listeners"]] == ["http", "metrics"]
    sample["bcrypt_rounds"] = 4
    path = write_config(tmp_path, sample)
    register(path)
    server = launch(path)
    login_token = mint_login_token(server.base_url, access_token(server.base_url))
    assert token_login(server.base_url, login_token)[0] == 200
    # Its metrics listener, and the audit records in its log.
    code, scraped = sync_call_text(f"http://127.0.0.1:{server.metrics_port()}", "/_synapse/metrics")
    assert code == 200 and "login_token_module_tokens_spent_total 1.0" in scraped
    assert "login token event=spend outcome=spent" in server.log()
    assert (tmp_path / "homeserver.db").is_file()
    assert (tmp_path / "login_tokens.db").is_file()


def sync_call_text(base_url: str, path: str) -> tuple[int, str]:
    reply = call(base_url, "GET", path)
    assert isinstance(reply.body, bytes), reply
    return reply.code, reply.body.decode()
