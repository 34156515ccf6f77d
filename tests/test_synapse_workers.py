"""The module in a Synapse deployment with a worker: state shared through Synapse's database.

Synapse's main process and one ``synapse.app.generic_worker``, on PostgreSQL (the
tests' throwaway cluster) with Redis (Debian's ``redis-server``, on loopback),
configured as Synapse's worker guide says (``instance_map``, ``redis``,
``worker_app``, ``worker_listeners``, a replication listener on the main
process), behind nginx running docs/synapse.md's blocks with the worker section's
upstream. Tests reach each process directly where they must say which one serves
a request, and through nginx where the requests should spread over both.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks import servers
from login_token_module.pairing import APPROVE_PATH, POLL_PATH, START_PATH
from login_token_module.tokens import hash_token
from tests.pgcluster import PostgresCluster
from tests.synapse_helpers import (
    MODULE_STABLE,
    SERVER_NAME,
    STABLE,
    Client,
    Proxy,
    Synapse,
    find_program,
    start_nginx,
    synapse_config,
    synapse_python,
    unique,
)

# The module's path on a process directly (what nginx rewrites the stable path to).
LOGOUT = "/_matrix/client/v3/logout"
# A burst large enough for 32 racers to reach the session's spend (the allowance is
# reserved first), spent slowly enough that a 33rd is refused for the whole test.
BURST = 32
MODULE_CONFIG = {
    "ratelimit": {"per_second": 0.001, "burst_count": BURST},
    "failed_auth_ratelimit": {"per_second": 0.001, "burst_count": BURST + 8},
    "sweep_interval_ms": 500,
    # Short enough to see a sweep drop one; long enough for every test's UIA.
    "ui_auth_session_lifetime_ms": 6_000,
    "pairing": {"enabled": True, "interval_ms": 50},
}

_numbers = itertools.count()
LOGCONTEXT_TROUBLE = re.compile(r"logging context|logcontext|sentinel context|Traceback", re.IGNORECASE)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


@dataclass
class Deployment:
    main: Synapse
    worker_port: int
    nginx: Proxy

    @property
    def on_main(self) -> Client:
        return self.main.direct

    @property
    def on_worker(self) -> Client:
        return Client(f"http://127.0.0.1:{self.worker_port}")

    @property
    def proxy(self) -> Client:
        return self.nginx.client

    def new_user(self) -> tuple[str, str]:
        localpart = unique("worker", _numbers)
        password = f"{localpart} password"
        self.main.register(localpart, password)
        return localpart, password


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def deployment(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    redis_server = find_program("redis-server")
    python = synapse_python()
    directory = tmp_path_factory.mktemp("synapse-workers")
    if not pg_cluster.running:
        pg_cluster.start()
    database = pg_cluster.create_database("synapse")
    started: list[subprocess.Popen[bytes]] = []
    main: Synapse | None = None
    nginx: Proxy | None = None
    try:
        redis_port = servers.free_port()
        redis_log = open(directory / "redis.log", "wb")  # noqa: SIM115 (the child writes to it)
        redis = subprocess.Popen(
            [
                redis_server,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=redis_log,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
        started.append(redis)
        _wait_for_port(redis_port, redis, "redis-server", timeout=20)

        replication_port = servers.free_port()
        config_path, secret = synapse_config(
            directory,
            MODULE_CONFIG,
            {
                "database": {"name": "psycopg2", "args": {**database.args, "cp_min": 1, "cp_max": 5}},
                "redis": {"enabled": True, "host": "127.0.0.1", "port": redis_port},
                "instance_map": {"main": {"host": "127.0.0.1", "port": replication_port}},
            },
        )
        config = yaml.safe_load(config_path.read_text())
        config["listeners"].append(
            {
                "port": replication_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "resources": [{"names": ["replication"]}],
            }
        )
        config_path.write_text(yaml.safe_dump(config))
        main_port = int(config["listeners"][0]["port"])
        main_server = servers.start_synapse(python, config_path, main_port)
        main = Synapse(main_server, secret, directory)

        # The worker: Synapse's shared config plus its own, as the worker guide writes it.
        worker_port = servers.free_port()
        log_config = yaml.safe_load(Path(config["log_config"]).read_text())
        log_config["handlers"]["file"]["filename"] = str(directory / "worker1.log")
        worker_log_config = directory / "worker1.log.config"
        worker_log_config.write_text(yaml.safe_dump(log_config))
        worker_config = directory / "worker1.yaml"
        worker_config.write_text(
            yaml.safe_dump(
                {
                    "worker_app": "synapse.app.generic_worker",
                    "worker_name": "worker1",
                    "worker_listeners": [
                        {
                            "type": "http",
                            "port": worker_port,
                            "bind_addresses": ["127.0.0.1"],
                            "resources": [{"names": ["client"]}],
                        }
                    ],
                    "worker_log_config": str(worker_log_config),
                }
            )
        )
        worker_out = open(directory / "worker1.stdout.log", "wb")  # noqa: SIM115 (the child writes to it)
        worker = subprocess.Popen(
            [
                str(python),
                "-m",
                "synapse.app.generic_worker",
                "-c",
                str(config_path),
                "-c",
                str(worker_config),
            ],
            stdout=worker_out,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
        started.append(worker)
        _wait_for_port(worker_port, worker, "the Synapse worker")
        nginx = start_nginx(directory / "nginx", main_port, worker_port=worker_port)
        yield Deployment(main, worker_port, nginx)
    finally:
        if nginx is not None:
            nginx.stop()
        for process in reversed(started[1:]):
            _stop(process)
        if main is not None:
            main.stop()
        if started:
            _stop(started[0])
        shutil.rmtree(directory / "nginx", ignore_errors=True)


def _signed_in(client: Client, localpart: str, password: str) -> dict[str, Any]:
    response = client.login(localpart, password)
    assert response.code == 200, response
    return dict(response.json)


def _challenge(client: Client, access: str) -> str:
    response = client.post(MODULE_STABLE, {}, access)
    assert response.code == 401, response
    return str(response.json["session"])


def _answer(client: Client, access: str, session: str, password: str) -> Any:
    auth = {"type": "m.login.password", "session": session, "password": password}
    return client.post(MODULE_STABLE, {"auth": auth}, access)


def _token(client: Client, access: str, password: str) -> str:
    response = _answer(client, access, _challenge(client, access), password)
    assert response.code == 200, response
    return str(response.json["login_token"])


def test_the_tables_are_in_synapses_postgresql(deployment: Deployment, pg_cluster: PostgresCluster) -> None:
    localpart, password = deployment.new_user()
    access = _signed_in(deployment.on_worker, localpart, password)["access_token"]
    _token(deployment.on_worker, access, password)
    dbname = _database_name(deployment)
    tables = {
        row[0]
        for row in pg_cluster.query(
            dbname,
            "SELECT tablename FROM pg_tables WHERE starts_with(tablename, %s)",
            ("login_token_module_",),
        )
    }
    assert tables == {
        "login_token_module_schema_versions",
        "login_token_module_tokens",
        "login_token_module_history",
        "login_token_module_uia_sessions",
        "login_token_module_ratelimits",
        # Pairings' table comes with the schema (version 4); pairing itself is not
        # served inside Synapse yet.
        "login_token_module_pairings",
    }
    assert pg_cluster.query(dbname, "SELECT version FROM login_token_module_schema_versions") == [(4,)]


def _database_name(deployment: Deployment) -> str:
    config = yaml.safe_load((deployment.main.directory / "homeserver.yaml").read_text())
    return str(config["database"]["args"]["database"])


def test_uia_begun_on_one_process_completes_on_the_other(deployment: Deployment) -> None:
    main, worker = deployment.on_main, deployment.on_worker
    for begins, completes in ((main, worker), (worker, main)):
        localpart, password = deployment.new_user()
        access = _signed_in(main, localpart, password)["access_token"]
        session = _challenge(begins, access)
        done = _answer(completes, access, session, password)
        assert done.code == 200, done
        # Spent: sent again to the process that began it, it issues nothing.
        again = _answer(begins, access, session, password)
        assert again.code == 401, again
        assert "login_token" not in again.json and again.json["session"] != session
        # The token works once, at either process.
        signed_in = begins.token_login(done.json["login_token"])
        assert signed_in.code == 200, signed_in
        assert signed_in.json["user_id"] == f"@{localpart}:{SERVER_NAME}"
        assert completes.token_login(done.json["login_token"]).code == 403


def test_a_wrong_password_on_one_process_keeps_the_session_on_the_other(deployment: Deployment) -> None:
    localpart, password = deployment.new_user()
    access = _signed_in(deployment.on_main, localpart, password)["access_token"]
    session = _challenge(deployment.on_main, access)
    wrong = _answer(deployment.on_worker, access, session, "not the password")
    assert wrong.code == 401 and wrong.json["errcode"] == "M_FORBIDDEN", wrong
    assert wrong.json["session"] == session
    right = _answer(deployment.on_main, access, session, password)
    assert right.code == 200, right


def test_the_rate_limit_is_one_across_both_processes(deployment: Deployment) -> None:
    localpart, password = deployment.new_user()
    access = _signed_in(deployment.on_main, localpart, password)["access_token"]
    processes = (deployment.on_main, deployment.on_worker)
    for number in range(BURST):
        _token(processes[number % 2], access, password)
    # The burst is spent, half on each process: the next is refused on both.
    for process in processes:
        refused = _answer(process, access, _challenge(process, access), password)
        assert refused.code == 429, refused
        assert refused.json["errcode"] == "M_LIMIT_EXCEEDED"
        assert int(refused.headers["retry-after"]) > 0


def test_32_parallel_completions_of_one_session_over_both_mint_one_token(deployment: Deployment) -> None:
    localpart, password = deployment.new_user()
    proxy = deployment.proxy
    access = _signed_in(proxy, localpart, password)["access_token"]
    session = _challenge(deployment.on_main, access)
    access_log = deployment.nginx.directory / "access.log"
    before = len(_served(access_log))
    auth = {"type": "m.login.password", "session": session, "password": password}
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda _: proxy.post(STABLE, {"auth": auth}, access), range(32)))
    issued = [answer for answer in answers if answer.code == 200]
    assert len(issued) == 1, [answer.code for answer in answers]
    refused = [answer for answer in answers if answer.code != 200]
    assert all(answer.code == 401 and "login_token" not in answer.json for answer in refused), refused
    assert all(answer.json["session"] != session for answer in refused)
    # nginx spread them over both processes.
    served = _served(access_log)
    assert len(served) - before == 32, served[before:]
    upstreams = set(served[before:])
    assert upstreams == {f"127.0.0.1:{deployment.main.port}", f"127.0.0.1:{deployment.worker_port}"}, (
        upstreams
    )
    assert proxy.token_login(issued[0].json["login_token"]).code == 200


def _served(access_log: Path) -> list[str]:
    """The upstream (address:port) nginx sent each get_token request to, in order."""
    lines = access_log.read_text().splitlines()
    return [line.split()[0] for line in lines if line.endswith(" " + STABLE)]


def test_a_logout_on_one_process_revokes_the_tokens_minted_on_the_other(deployment: Deployment) -> None:
    """Synapse 1.163 serves /logout on the main process only (its generic worker answers 404):
    the tokens a device minted on the worker die when it logs out on the main process."""
    main, worker = deployment.on_main, deployment.on_worker
    assert worker.post(LOGOUT, {}).code == 404
    localpart, password = deployment.new_user()
    leaving = _signed_in(worker, localpart, password)
    staying = _signed_in(worker, localpart, password)
    minted_on_worker = _token(worker, leaving["access_token"], password)
    minted_on_main = _token(main, leaving["access_token"], password)
    kept = _token(worker, staying["access_token"], password)
    assert deployment.proxy.post(LOGOUT, {}, leaving["access_token"]).code == 200
    for token in (minted_on_worker, minted_on_main):
        for process in (worker, main):
            refused = process.token_login(token)
            assert refused.code == 403 and refused.json["errcode"] == "M_FORBIDDEN", refused
    # The other device's token is untouched.
    signed_in = worker.token_login(kept)
    assert signed_in.code == 200, signed_in


def test_both_processes_sweep_expired_sessions_from_the_shared_tables(
    deployment: Deployment, pg_cluster: PostgresCluster
) -> None:
    localpart, password = deployment.new_user()
    access = _signed_in(deployment.on_worker, localpart, password)["access_token"]
    session = _challenge(deployment.on_worker, access)
    query = "SELECT count(*) FROM login_token_module_uia_sessions WHERE session_id = %s"
    assert pg_cluster.query(_database_name(deployment), query, (session,)) == [(1,)]
    deadline = time.monotonic() + 20
    while pg_cluster.query(_database_name(deployment), query, (session,)) != [(0,)]:
        assert time.monotonic() < deadline, "the expired session was never swept"
        time.sleep(0.5)
    expired = _answer(deployment.on_main, access, session, password)
    assert expired.code == 401 and expired.json["session"] != session, expired


def test_a_pairing_started_on_the_worker_is_approved_across_and_delivered_once_over_both(
    deployment: Deployment,
) -> None:
    """Start on the worker, the approval's UIA begun on the main process and answered on the
    worker, then 32 parallel polls, half on each process: one token, which signs in."""
    main, worker = deployment.on_main, deployment.on_worker
    localpart, password = deployment.new_user()
    access = _signed_in(main, localpart, password)["access_token"]
    started = worker.post(START_PATH, {"initial_device_display_name": "Bot"})
    assert started.code == 200, started
    code, pairing_id = started.json["user_code"], started.json["pairing_id"]
    assert main.post(POLL_PATH, {"pairing_id": pairing_id}).json == {"status": "pending"}
    challenge = main.post(APPROVE_PATH, {"user_code": code}, access)
    assert challenge.code == 401, challenge
    auth = {"type": "m.login.password", "session": challenge.json["session"], "password": password}
    approved = worker.post(APPROVE_PATH, {"user_code": code, "auth": auth}, access)
    assert approved.code == 200, approved
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(
            pool.map(lambda n: (main, worker)[n % 2].post(POLL_PATH, {"pairing_id": pairing_id}), range(32))
        )
    delivered = [answer for answer in answers if answer.code == 200]
    assert len(delivered) == 1, [answer.code for answer in answers]
    assert all(answer.code == 404 for answer in answers if answer.code != 200), answers
    assert delivered[0].json["status"] == "approved"
    signed_in = worker.token_login(delivered[0].json["login_token"])
    assert signed_in.code == 200 and signed_in.json["user_id"] == f"@{localpart}:{SERVER_NAME}", signed_in


def test_nginx_spreads_the_pairing_paths_over_both_processes(deployment: Deployment) -> None:
    """docs/synapse.md's pairing location: the whole flow through nginx, its requests on both."""
    proxy = deployment.proxy
    localpart, password = deployment.new_user()
    access = _signed_in(proxy, localpart, password)["access_token"]
    access_log = deployment.nginx.directory / "access.log"
    before = len(access_log.read_text().splitlines())
    started = proxy.post(START_PATH, {})
    assert started.code == 200, started
    code, pairing_id = started.json["user_code"], started.json["pairing_id"]
    challenge = proxy.post(APPROVE_PATH, {"user_code": code}, access)
    assert challenge.code == 401, challenge
    auth = {"type": "m.login.password", "session": challenge.json["session"], "password": password}
    assert proxy.post(APPROVE_PATH, {"user_code": code, "auth": auth}, access).code == 200
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: proxy.post(POLL_PATH, {"pairing_id": pairing_id}), range(8)))
    delivered = [answer for answer in answers if answer.code == 200]
    assert len(delivered) == 1, [answer.code for answer in answers]
    assert proxy.token_login(delivered[0].json["login_token"]).code == 200
    pair_lines = [
        line.split()[0]
        for line in access_log.read_text().splitlines()[before:]
        if " /_synapse/client/login_token/pair/" in line
    ]
    assert len(pair_lines) == 11, pair_lines
    assert set(pair_lines) == {f"127.0.0.1:{deployment.main.port}", f"127.0.0.1:{deployment.worker_port}"}


def test_neither_log_shows_log_context_trouble(deployment: Deployment) -> None:
    localpart, password = deployment.new_user()
    access = _signed_in(deployment.on_worker, localpart, password)["access_token"]
    _token(deployment.on_worker, access, password)
    _token(deployment.on_main, access, password)
    time.sleep(1.2)  # the sweeps run in the background on both
    for log in ("synapse.log", "worker1.log"):
        text = (deployment.main.directory / log).read_text(errors="replace")
        trouble = [line for line in text.splitlines() if LOGCONTEXT_TROUBLE.search(line)]
        assert not trouble, "\n".join(trouble[:10])
        assert password not in text


def test_lineage_a_token_minted_on_one_process_and_spent_on_the_other_is_recorded(
    deployment: Deployment, pg_cluster: PostgresCluster
) -> None:
    """The worker serves the token login (and runs the login callback); the history, in
    Synapse's PostgreSQL, shows the spend and the device it created."""
    localpart, password = deployment.new_user()
    asking = _signed_in(deployment.on_main, localpart, password)
    token = _token(deployment.on_main, asking["access_token"], password)
    new = deployment.on_worker.token_login(token)
    assert new.code == 200, new
    dbname = _database_name(deployment)
    rows = pg_cluster.query(
        dbname,
        "SELECT device_id, outcome, new_device_id FROM login_token_module_history WHERE token_hash = %s",
        (hash_token(token),),
    )
    assert rows == [(asking["device_id"], "spent", new.json["device_id"])]
    left = "SELECT count(*) FROM login_token_module_tokens WHERE token_hash = %s"
    assert pg_cluster.query(dbname, left, (hash_token(token),)) == [(0,)]
