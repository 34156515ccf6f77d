"""Pairing across worker processes: ``serve --workers 2`` on one port, the new
device on one worker, the approving device on the other.

The kernel spreads connections between the workers (SO_REUSEPORT), so the test
holds two keep-alive connections that it has seen served by different workers
(each worker's access-log lines say which it is): the new device starts and
polls on the first, the signed-in device approves on the second.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from login_token_module.pairing import APPROVE_PATH, POLL_PATH, START_PATH
from tests.helpers import (
    LOGIN,
    PASSWORD,
    ChildServer,
    Launcher,
    homeserver_yaml,
    register,
    write_config,
)
from tests.pgcluster import Database

GENEROUS = {"per_second": 1000, "burst_count": 1000}
PAIRING = {"enabled": True, "lifetime_ms": 600_000, "interval_ms": 10}
WORKER_RE = re.compile(r"\[worker (\d+)\].* (GET|POST) (\S+) (\d{3})")


class Connection:
    """One keep-alive connection, so every request on it reaches the same worker."""

    def __init__(self, server: ChildServer) -> None:
        self._server = server
        self._conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body)
        self._conn.request(method, path, body=data, headers=headers)
        response = self._conn.getresponse()
        return response.status, json.loads(response.read() or b"null")

    def worker(self) -> str:
        """The worker that served this connection's last request (from the access log)."""
        before = len(served(self._server))
        self.call("GET", "/_matrix/client/versions")
        deadline = time.monotonic() + 10
        while len(lines := served(self._server)) <= before:
            assert time.monotonic() < deadline, self._server.log()
            time.sleep(0.02)
        return lines[-1][0]

    def close(self) -> None:
        self._conn.close()


def served(server: ChildServer) -> list[tuple[str, str, str, str]]:
    """(worker, method, path, status) of every request the workers logged, in order."""
    return [match.groups() for match in WORKER_RE.finditer(server.log())]  # type: ignore[misc]


def two_connections(server: ChildServer) -> tuple[Connection, Connection, str, str]:
    first = Connection(server)
    first_worker = first.worker()
    for _ in range(50):
        second = Connection(server)
        second_worker = second.worker()
        if second_worker != first_worker:
            return first, second, first_worker, second_worker
        second.close()
    pytest.fail("50 connections in a row reached the same worker")


@pytest.fixture(params=["sqlite", "postgres"])
def config_path(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    module: dict[str, Any] = {"ratelimit": GENEROUS, "pairing": PAIRING}
    if request.param == "sqlite":
        raw = homeserver_yaml(tmp_path, {"store": {"type": "sqlite", "path": "tokens.db"}, **module})
    else:
        database: Database = request.getfixturevalue("pg_database")
        raw = homeserver_yaml(tmp_path, {"store": {"type": "postgres", "dsn": database.dsn}, **module})
        raw["database"] = {"name": "psycopg2", "args": database.args}
    path = write_config(tmp_path, raw)
    register(path)
    return path


def test_start_on_one_worker_approve_on_another_poll_on_the_first(
    config_path: Path, launch: Launcher
) -> None:
    server = launch(config_path, "server.log", "--workers", "2")
    new_device, phone, new_worker, phone_worker = two_connections(server)
    try:
        code, started = new_device.call("POST", START_PATH, {"initial_device_display_name": "TV"})
        assert code == 200, started
        assert new_device.call("POST", POLL_PATH, {"pairing_id": started["pairing_id"]}) == (
            200,
            {"status": "pending"},
        )

        login = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}}
        code, signed_in = phone.call("POST", LOGIN, {**login, "password": PASSWORD})
        assert code == 200, signed_in
        access = signed_in["access_token"]
        code, seen = phone.call("GET", f"{APPROVE_PATH}?user_code={started['user_code']}", token=access)
        assert code == 200 and seen["initial_device_display_name"] == "TV", seen
        code, challenge = phone.call("POST", APPROVE_PATH, {"user_code": started["user_code"]}, access)
        assert code == 401, challenge
        auth = {"type": "m.login.password", "password": PASSWORD, "session": challenge["session"]}
        code, approved = phone.call(
            "POST", APPROVE_PATH, {"user_code": started["user_code"], "auth": auth}, access
        )
        assert code == 200, approved

        time.sleep(0.05)
        code, delivered = new_device.call("POST", POLL_PATH, {"pairing_id": started["pairing_id"]})
        assert code == 200 and delivered["status"] == "approved", delivered
        code, body = new_device.call(
            "POST", LOGIN, {"type": "m.login.token", "token": delivered["login_token"]}
        )
        assert code == 200 and body["user_id"] == "@alice:test.local", body
        assert phone.call("POST", POLL_PATH, {"pairing_id": started["pairing_id"]})[0] == 404
    finally:
        new_device.close()
        phone.close()

    # The log says who served what: the new device's worker started and polled, the other approved.
    workers: dict[tuple[str, str], set[str]] = {}
    for worker, method, path, _ in served(server):
        workers.setdefault((method, path.split("?")[0]), set()).add(worker)
    assert workers[("POST", START_PATH)] == {new_worker}
    assert workers[("POST", APPROVE_PATH)] == {phone_worker}
    assert new_worker in workers[("POST", POLL_PATH)]
    assert new_worker != phone_worker
    assert "Traceback" not in server.log()
