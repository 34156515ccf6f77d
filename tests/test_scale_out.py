"""Scale-out with real processes: the host and the module on PostgreSQL, two
``serve`` processes sharing one PostgreSQL (as on two machines), ``serve
--workers 2`` on one port, and PostgreSQL stopped and started under load.

Plain synchronous tests: the servers are child processes, HTTP goes through
urllib from threads, and the database is a real PostgreSQL cluster the tests
start themselves (tests/pgcluster.py).
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.helpers import (
    GET_TOKEN,
    PASSWORD,
    ROOT,
    ChildServer,
    Launcher,
    access_token,
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
from tests.pgcluster import Database, PostgresCluster

WHOAMI = "/_matrix/client/v3/account/whoami"
GENEROUS = {"per_second": 1000, "burst_count": 1000}
ONE_SHOT = {"auth": {"type": "m.login.password", "password": PASSWORD}}


def pg_config(directory: Path, database: Database, **module: Any) -> Path:
    """The host and the module both on ``database``, alice registered (through the CLI)."""
    raw = homeserver_yaml(
        directory, {"store": {"type": "postgres", "dsn": database.dsn}, "ratelimit": GENEROUS, **module}
    )
    raw["database"] = {"name": "psycopg2", "args": database.args}
    path = write_config(directory, raw)
    register(path)
    return path


def sqlite_config(directory: Path, **module: Any) -> Path:
    raw = homeserver_yaml(
        directory, {"store": {"type": "sqlite", "path": "tokens.db"}, "ratelimit": GENEROUS, **module}
    )
    path = write_config(directory, raw)
    register(path)
    return path


def race_one_token(bases: list[str], session: str, attempts: int = 64) -> list[int]:
    """``attempts`` logins at once with one token, spread over ``bases``; their status codes."""
    login_token = mint_login_token(bases[0], session)
    barrier = threading.Barrier(attempts)

    def attempt(index: int) -> int:
        barrier.wait(30)
        return token_login(bases[index % len(bases)], login_token)[0]

    with ThreadPoolExecutor(max_workers=attempts) as pool:
        return list(pool.map(attempt, range(attempts)))


def flood(bases: list[str], session: str, attempts: int = 40) -> list[int]:
    """One user asks for ``attempts`` tokens at once (password given each time), spread over ``bases``."""
    barrier = threading.Barrier(attempts)

    def attempt(index: int) -> int:
        barrier.wait(30)
        return sync_call(bases[index % len(bases)], "POST", GET_TOKEN, ONE_SHOT, session)[0]

    with ThreadPoolExecutor(max_workers=attempts) as pool:
        return list(pool.map(attempt, range(attempts)))


# -- the host and the module on PostgreSQL ---------------------------------------------


def test_the_flow_on_postgres_with_the_schema_recorded(
    pg_database: Database, tmp_path: Path, launch: Launcher
) -> None:
    path = pg_config(tmp_path, pg_database)
    server = launch(path)
    session = access_token(server.base_url)
    code, body = token_login(server.base_url, mint_login_token(server.base_url, session))
    assert code == 200, body
    assert sync_call(server.base_url, "GET", WHOAMI, access_token=body["access_token"])[1]["user_id"] == (
        "@alice:test.local"
    )
    # Logging in again to the same device replaces its access token.
    first = password_login(server.base_url, device_id="PHONE")[1]["access_token"]
    second = password_login(server.base_url, device_id="PHONE")[1]["access_token"]
    assert sync_call(server.base_url, "GET", WHOAMI, access_token=first)[0] == 401
    assert sync_call(server.base_url, "GET", WHOAMI, access_token=second)[1]["device_id"] == "PHONE"
    # A user registered while the server runs can log in at once (one database).
    register(path, "bob")
    assert password_login(server.base_url, "bob")[0] == 200

    versions = dict(
        pg_database.cluster.query(pg_database.name, "SELECT component, version FROM schema_versions")
    )
    assert versions == {"homeserver": 2, "login_token_module": 4}
    # Tokens and access tokens are stored as hashes only.
    rows = pg_database.cluster.query(pg_database.name, "SELECT token_hash FROM access_tokens")
    assert rows and all(len(bytes(row[0])) == 32 for row in rows)
    assert server.terminate() == 0
    log = server.log()
    assert pg_database.cluster.password not in log
    assert "Traceback" not in log


def test_a_database_from_a_newer_program_is_refused_in_one_line(
    pg_database: Database, tmp_path: Path
) -> None:
    path = pg_config(tmp_path, pg_database)
    pg_database.cluster.query(
        pg_database.name, "UPDATE schema_versions SET version = 99 WHERE component = 'homeserver'"
    )
    result = run_serve(path)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "database: the database holds homeserver tables at schema version 99" in line, line


@pytest.mark.parametrize("which", ["database", "store"])
def test_an_unreachable_postgres_stops_serve_with_one_line(
    pg_database: Database, tmp_path: Path, which: str
) -> None:
    raw = homeserver_yaml(tmp_path, {"store": {"type": "postgres", "dsn": pg_database.dsn}})
    raw["database"] = {"name": "psycopg2", "args": pg_database.args}
    nowhere = pg_database.cluster.port + 1 if pg_database.cluster.port < 65535 else 1
    if which == "database":
        raw["database"]["args"]["port"] = nowhere
    else:
        dsn = pg_database.dsn.replace(f":{pg_database.cluster.port}/", f":{nowhere}/")
        raw["modules"][0]["config"]["store"]["dsn"] = dsn
    path = write_config(tmp_path, raw)
    result = run_serve(path)
    assert result.returncode == 1
    line = one_line(result.stderr)
    key = "database: cannot connect to PostgreSQL" if which == "database" else "store.dsn: cannot connect"
    assert key in line, line
    assert pg_database.cluster.password not in line

    registered = cli("register-user", "-c", str(path), "carol", stdin="pw\n")
    if which == "database":
        assert registered.returncode == 1
        assert "cannot connect to PostgreSQL" in one_line(registered.stderr)


# -- two serve processes on one PostgreSQL (two machines) -------------------------------


@pytest.fixture
def two_on_postgres(pg_database: Database, tmp_path: Path, launch: Launcher) -> list[ChildServer]:
    path = pg_config(tmp_path, pg_database, ratelimit={"per_second": 0.001, "burst_count": 3})
    return [launch(path, "a.log"), launch(path, "b.log")]


def test_two_servers_on_postgres_spend_a_token_once(two_on_postgres: list[ChildServer]) -> None:
    bases = [server.base_url for server in two_on_postgres]
    session = access_token(bases[0])
    for _ in range(3):
        codes = race_one_token(bases, session)
        assert sorted(codes) == [200] + [403] * 63, codes
    # Both answered from the same users and access tokens.
    for base in bases:
        assert sync_call(base, "GET", WHOAMI, access_token=session)[0] == 200


def test_a_uia_session_begun_on_one_server_completes_once_on_the_other(
    two_on_postgres: list[ChildServer],
) -> None:
    first, second = (server.base_url for server in two_on_postgres)
    session = access_token(first)
    code, challenge = sync_call(first, "POST", GET_TOKEN, {}, session)
    assert code == 401
    auth = {"auth": {**ONE_SHOT["auth"], "session": challenge["session"]}}
    code, issued = sync_call(second, "POST", GET_TOKEN, auth, session)
    assert code == 200, issued
    for base in (first, second):
        code, again = sync_call(base, "POST", GET_TOKEN, auth, session)
        assert code == 401, again
        assert again["errcode"] == "M_FORBIDDEN" and again["session"] != challenge["session"]
    assert token_login(first, issued["login_token"])[0] == 200


def test_one_users_flood_across_two_servers_gets_exactly_the_burst(
    two_on_postgres: list[ChildServer],
) -> None:
    bases = [server.base_url for server in two_on_postgres]
    session = access_token(bases[0])
    codes = flood(bases, session)
    assert sorted(codes) == [200] * 3 + [429] * 37, codes


def test_wrong_passwords_count_across_two_servers(
    pg_database: Database, tmp_path: Path, launch: Launcher
) -> None:
    path = pg_config(tmp_path, pg_database, failed_auth_ratelimit={"per_second": 0.001, "burst_count": 3})
    bases = [launch(path, "a.log").base_url, launch(path, "b.log").base_url]
    session = access_token(bases[0])
    wrong = {"auth": {"type": "m.login.password", "password": "not it"}}
    codes = [sync_call(bases[i % 2], "POST", GET_TOKEN, wrong, session)[0] for i in range(5)]
    assert codes == [401, 401, 401, 429, 429], codes
    # The right password is refused too while the limit holds, on either server.
    assert sync_call(bases[1], "POST", GET_TOKEN, ONE_SHOT, session)[0] == 429


# -- serve --workers 2 on one port ------------------------------------------------------


def _served_by_both(server: ChildServer) -> None:
    log = server.log()
    for worker in ("[worker 1]", "[worker 2]"):
        assert any(worker in line and "POST /_matrix/client/v3/login" in line for line in log.splitlines()), (
            worker
        )


@pytest.fixture(params=["sqlite", "postgres"])
def two_workers(request: pytest.FixtureRequest, tmp_path: Path, launch: Launcher) -> ChildServer:
    limit = {"ratelimit": {"per_second": 0.001, "burst_count": 3}}
    if request.param == "sqlite":
        path = sqlite_config(tmp_path, **limit)
    else:
        path = pg_config(tmp_path, request.getfixturevalue("pg_database"), **limit)
    return launch(path, "server.log", "--workers", "2")


def test_two_workers_on_one_port_spend_a_token_once_and_share_the_limit(two_workers: ChildServer) -> None:
    base = two_workers.base_url
    session = access_token(base)
    for _ in range(2):
        codes = race_one_token([base], session)
        assert sorted(codes) == [200] + [403] * 63, codes
    _served_by_both(two_workers)

    # The two tokens above used 2 of the burst of 3.
    codes = flood([base], session)
    assert sorted(codes) == [200] + [429] * 39, codes

    assert sync_call(base, "POST", GET_TOKEN, {}, session)[0] == 401
    assert "Traceback" not in two_workers.log()


def test_a_uia_session_completes_once_under_two_workers(tmp_path: Path, launch: Launcher) -> None:
    server = launch(sqlite_config(tmp_path), "server.log", "--workers", "2")
    session = access_token(server.base_url)
    code, challenge = sync_call(server.base_url, "POST", GET_TOKEN, {}, session)
    assert code == 401
    auth = {"auth": {**ONE_SHOT["auth"], "session": challenge["session"]}}
    barrier = threading.Barrier(24)

    def complete(_: int) -> int:
        barrier.wait(30)
        return sync_call(server.base_url, "POST", GET_TOKEN, auth, session)[0]

    with ThreadPoolExecutor(max_workers=24) as pool:
        codes = list(pool.map(complete, range(24)))
    # One mints; the others are told to start again (401) or were refused before their
    # password was checked (429: the allowances are reserved before bcrypt runs).
    assert codes.count(200) == 1 and set(codes) <= {200, 401, 429}, codes


def _workers_of(server: ChildServer) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children()


@pytest.mark.parametrize(
    "stop",
    [
        lambda server: server.process.send_signal(signal.SIGTERM),
        # Ctrl-C in a terminal: SIGINT to the whole process group at once.
        lambda server: os.killpg(server.process.pid, signal.SIGINT),
    ],
    ids=["SIGTERM", "Ctrl-C"],
)
def test_workers_stop_together(tmp_path: Path, launch: Launcher, stop: Callable[[ChildServer], None]) -> None:
    server = launch(sqlite_config(tmp_path), "server.log", "--workers", "2")
    workers = _workers_of(server)
    assert len(workers) == 2
    assert sync_call(server.base_url, "GET", "/_matrix/client/versions")[0] == 200
    stop(server)
    assert server.process.wait(30) == 0
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []
    log = server.log()
    assert log.count("Signal") >= 2 and "All workers stopped" in log
    assert "Traceback" not in log


def test_a_worker_that_dies_is_started_again(tmp_path: Path, launch: Launcher) -> None:
    server = launch(sqlite_config(tmp_path), "server.log", "--workers", "2")
    victim = _workers_of(server)[0]
    victim.kill()
    victim.wait(10)
    deadline = time.monotonic() + 30
    while len(_workers_of(server)) < 2 or "starting it again" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    # The port answers throughout (the other worker) and after (both).
    session = access_token(server.base_url)
    for _ in range(3):
        assert token_login(server.base_url, mint_login_token(server.base_url, session))[0] == 200
    assert server.terminate() == 0


REFUSED_UNDER_WORKERS: list[tuple[str, dict[str, Any], str]] = [
    ("memory_store", {"store": {"type": "memory"}}, "modules[0].config.store.type: 'memory' keeps tokens"),
    (
        "state_not_shared",
        {"store": {"type": "sqlite", "path": "t.db", "shared_state": False}},
        "modules[0].config.store.shared_state: must be true when several worker processes",
    ),
    (
        "memory_sqlite",
        {"store": {"type": "sqlite", "path": ":memory:"}},
        "modules[0].config.store.path: ':memory:' cannot be shared",
    ),
]


@pytest.mark.parametrize(
    ("module", "message"),
    [(m, msg) for _, m, msg in REFUSED_UNDER_WORKERS],
    ids=[n for n, _, _ in REFUSED_UNDER_WORKERS],
)
def test_state_that_workers_would_split_is_refused_in_one_line(
    tmp_path: Path, module: dict[str, Any], message: str
) -> None:
    path = write_config(tmp_path, homeserver_yaml(tmp_path, module))
    result = run_serve(path, "--workers", "2")
    assert result.returncode == 1, result
    line = one_line(result.stderr)
    assert message in line, line
    # The same config is fine for one process.
    assert "Listening" not in result.stderr


def test_an_in_memory_host_database_is_refused_under_workers(tmp_path: Path) -> None:
    raw = homeserver_yaml(tmp_path, database_name=":memory:")
    result = run_serve(write_config(tmp_path, raw), "--workers", "2")
    assert result.returncode == 1
    assert "database.args.database: ':memory:' cannot be shared" in one_line(result.stderr)


@pytest.mark.parametrize("count", ["0", "65", "two"])
def test_a_bad_worker_count_is_one_line(tmp_path: Path, count: str) -> None:
    result = run_serve(write_config(tmp_path, homeserver_yaml(tmp_path)), "--workers", count)
    assert result.returncode != 0
    assert "--workers" in result.stderr.splitlines()[-1]


# -- PostgreSQL stopped and started under load -------------------------------------------


def test_a_postgres_outage_gives_503s_loses_nothing_and_heals(
    own_pg_cluster: PostgresCluster, tmp_path: Path, launch: Launcher
) -> None:
    database = own_pg_cluster.create_database()
    path = pg_config(tmp_path, database)
    servers = [launch(path, "a.log"), launch(path, "b.log")]
    bases = [server.base_url for server in servers]
    session = access_token(bases[0])
    before = [mint_login_token(bases[i % 2], session) for i in range(4)]

    issued: list[str] = []
    # (when the request was sent, when its answer came, status)
    seen: list[tuple[float, float, int]] = []
    other_errors: list[Any] = []
    lock = threading.Lock()
    stop_load = threading.Event()

    def load(index: int) -> None:
        base = bases[index % 2]
        while not stop_load.is_set():
            sent = time.monotonic()
            code, body = sync_call(base, "POST", GET_TOKEN, ONE_SHOT, session)
            with lock:
                seen.append((sent, time.monotonic(), code))
                if code == 200:
                    issued.append(body["login_token"])
                elif (code, body.get("errcode")) not in ((503, "M_UNKNOWN"), (429, "M_LIMIT_EXCEEDED")):
                    # A 429 is a clear answer too: a request admitted just before the outage
                    # could not give its failed-password allowance back during it, so it
                    # stays counted until it drains (a few seconds).
                    other_errors.append((code, body))
            time.sleep(0.02)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        own_pg_cluster.stop("fast")
        stopped_at = time.monotonic()
        # While it is down every request that needs it is a clear Matrix 503, on both servers.
        for base in bases:
            code, body = token_login(base, before[0])
            assert (code, body["errcode"]) == (503, "M_UNKNOWN"), body
            assert sync_call(base, "GET", WHOAMI, access_token=session)[0] == 503
            assert password_login(base)[0] == 503
            # What needs no database still works.
            assert sync_call(base, "GET", "/_matrix/client/versions")[0] == 200
        time.sleep(1.0)
        # Judged from the moment the start is asked for: PostgreSQL may already be
        # serving while pg_ctl is still waiting to see it up.
        restarting_at = time.monotonic()
        own_pg_cluster.start()
        started_at = time.monotonic()
        # Both recover by themselves, with no restart.
        deadline = time.monotonic() + 30
        for base in bases:
            while sync_call(base, "GET", WHOAMI, access_token=session)[0] != 200:
                assert time.monotonic() < deadline, "no recovery"
                time.sleep(0.1)
        time.sleep(1.0)
    finally:
        stop_load.set()
        for thread in threads:
            thread.join(30)

    assert other_errors == []
    # Sent once the server was down and answered before it was started again: all 503.
    during = [code for sent, answered, code in seen if stopped_at < sent and answered < restarting_at]
    assert during and set(during) == {503}, collections.Counter(during)
    assert any(code == 200 for sent, _, code in seen if sent > started_at)
    assert len(set(issued)) == len(issued)
    # Every token handed out, before, during or after the outage, logs in exactly once.
    for index, login_token in enumerate(before + issued):
        code, body = token_login(bases[index % 2], login_token)
        assert code == 200, (index, body)
        assert token_login(bases[(index + 1) % 2], login_token)[0] == 403
    for server in servers:
        assert server.terminate() == 0
        log = server.log()
        assert "Traceback" not in log
        assert own_pg_cluster.password not in log
        assert "unavailable" in log


def test_the_postgres_sample_config_serves_two_workers(
    pg_database: Database, tmp_path: Path, launch: Launcher
) -> None:
    """sample_config_postgres.yaml, as docs/scale-out.md shows it, with only the connection details ours."""
    sample = yaml.safe_load((ROOT / "sample_config_postgres.yaml").read_text())
    assert sample["database"]["name"] == "psycopg2"
    assert set(sample["database"]["args"]) == {
        "host",
        "port",
        "user",
        "password",
        "database",
        "cp_min",
        "cp_max",
    }
    sample["database"]["args"].update(pg_database.args)
    sample["modules"][0]["config"]["store"]["dsn"] = pg_database.dsn
    for listener in sample["listeners"]:
        listener["port"] = 0
    sample["bcrypt_rounds"] = 4
    path = write_config(tmp_path, sample)
    register(path)
    server = launch(path, "server.log", "--workers", "2")
    session = access_token(server.base_url)
    login_token = mint_login_token(server.base_url, session)
    assert token_login(server.base_url, login_token)[0] == 200
    # The sample's own rate limit: one token a minute.
    code, body = sync_call(server.base_url, "POST", GET_TOKEN, ONE_SHOT, session)
    assert (code, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
    assert server.terminate() == 0
