"""Real servers for tests: in-process on the test reactor, or as child processes.

Every test talks HTTP over loopback to a listening homeserver with the module
loaded from its YAML-shaped config, exactly as an operator would run it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any

import pytest
import treq
import yaml
from treq.cookies import IndexableCookieJar
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from login_token_module.host import database
from login_token_module.host.config import parse_homeserver_config
from login_token_module.host.server import Homeserver
from login_token_module.module import LoginTokenModule
from tests.watchdog import Watchdog, watch

REACTOR: Any = reactor
ROOT = Path(__file__).resolve().parent.parent
GET_TOKEN = "/_matrix/client/v1/login/get_token"
LOGIN = "/_matrix/client/v3/login"
PASSWORD = "correct horse battery staple"
PASSWORD_FLOWS = [{"stages": ["m.login.password"]}]


async def sleep(seconds: float) -> None:
    await deferLater(REACTOR, seconds, lambda: None)


def flip_last(token: str) -> str:
    """``token`` with its last character changed: always another string, whose checksum fails."""
    return token[:-1] + ("B" if token[-1] == "A" else "A")


def password_auth(session: str | None = None, password: str = PASSWORD, **extra: Any) -> dict[str, Any]:
    """A get_token body answering the password stage (in ``session``, if given)."""
    auth: dict[str, Any] = {"type": "m.login.password", "password": password, **extra}
    if session is not None:
        auth["session"] = session
    return {"auth": auth}


@dataclass
class Response:
    code: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def json(self) -> dict[str, Any]:
        assert isinstance(self.body, dict), f"expected a JSON object, got {self.body!r}"
        return self.body


class HttpClient:
    """A small treq client that returns (status, parsed JSON, headers).

    It keeps the cookies servers set, as a browser does, unless ``keep_cookies`` is
    false (then only a ``Cookie`` header the caller sends goes out).
    """

    def __init__(self, base_url: str, *, keep_cookies: bool = True) -> None:
        self.base_url = base_url
        pool = HTTPConnectionPool(REACTOR, persistent=False)
        jar = None if keep_cookies else IndexableCookieJar(DefaultCookiePolicy(allowed_domains=[]))
        self._http = treq.client.HTTPClient(Agent(REACTOR, pool=pool), cookiejar=jar)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        raw_body: bytes | None = None,
        access_token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        send_headers: dict[bytes | str, list[bytes | str]] = {k: [v] for k, v in (headers or {}).items()}
        if access_token is not None:
            send_headers["Authorization"] = [f"Bearer {access_token}"]
        data = raw_body
        if json_body is not None:
            data = json.dumps(json_body).encode()
            send_headers.setdefault("Content-Type", ["application/json"])
        response = await self._http.request(method, self.base_url + path, data=data, headers=send_headers)
        content = await treq.content(response)
        body: Any = None
        if content:
            try:
                body = json.loads(content)
            except ValueError:
                body = content
        found = {
            name.decode().lower(): values[-1].decode() for name, values in response.headers.getAllRawHeaders()
        }
        return Response(response.code, body, found)

    async def post(self, path: str, body: Any = None, access_token: str | None = None) -> Response:
        return await self.request("POST", path, json_body=body, access_token=access_token)

    async def get(self, path: str, access_token: str | None = None) -> Response:
        return await self.request("GET", path, access_token=access_token)

    async def password_login(self, user: str, password: str = PASSWORD, **extra: Any) -> Response:
        body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}}
        body["password"] = password
        body.update(extra)
        return await self.post(LOGIN, body)

    async def access_token(self, user: str, password: str = PASSWORD) -> str:
        response = await self.password_login(user, password)
        assert response.code == 200, response
        return str(response.json["access_token"])

    async def get_login_token(
        self, access_token: str, password: str = PASSWORD, path: str = GET_TOKEN
    ) -> Response:
        """The two-step UIA dance: ask, then answer the challenge with the password."""
        challenge = await self.post(path, {}, access_token)
        assert challenge.code == 401, challenge
        auth = {"type": "m.login.password", "password": password, "session": challenge.json["session"]}
        return await self.post(path, {"auth": auth}, access_token)

    async def token_login(self, token: Any, **extra: Any) -> Response:
        return await self.post(LOGIN, {"type": "m.login.token", "token": token, **extra})


def homeserver_yaml(
    directory: Path,
    module_config: Mapping[str, Any] | None = None,
    *,
    port: int = 0,
    database_name: str = "homeserver.db",
    **extra: Any,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server_name": "test.local",
        "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"]}],
        "database": {"name": "sqlite3", "args": {"database": database_name}},
        "bcrypt_rounds": 4,
        "modules": [
            {
                "module": "login_token_module.LoginTokenModule",
                "config": dict(
                    module_config
                    if module_config is not None
                    else {"store": {"type": "sqlite", "path": "tokens.db"}}
                ),
            }
        ],
    }
    # Tests log in far more often than a person: rc_login (default 0.17/s, burst 3)
    # is turned up unless a test sets it (tests/test_operators.py checks the defaults).
    generous = {"per_second": 1000, "burst_count": 1000}
    config["rc_login"] = {"address": generous, "account": generous, "failed_attempts": generous}
    config.update(extra)
    return config


@dataclass
class InProcessServer:
    hs: Homeserver
    client: HttpClient

    @property
    def module(self) -> LoginTokenModule:
        module = self.hs.modules[0]
        assert isinstance(module, LoginTokenModule)
        return module

    async def register(self, localpart: str, password: str = PASSWORD) -> str:
        user_id = f"@{localpart}:{self.hs.config.server_name}"
        password_hash = await self.hs.hasher.hash(password)
        await self.hs.db.run(database.create_user, user_id, password_hash)
        return user_id

    async def stop(self) -> None:
        await self.hs.stop()


async def start_in_process(
    directory: Path, module_config: Mapping[str, Any] | None = None, *, workers: int = 1, **extra: Any
) -> InProcessServer:
    """The homeserver in this process; ``workers`` > 1 makes it keep its shared state (rc_login
    buckets, the module's limits) in the database as a worker would, without starting others."""
    raw = homeserver_yaml(directory, module_config, **extra)
    hs = Homeserver(parse_homeserver_config(raw, str(directory)), REACTOR, workers=workers)
    ports = hs.start()
    port: int = ports[0].getHost().port  # type: ignore[attr-defined]
    return InProcessServer(hs, HttpClient(f"http://127.0.0.1:{port}"))


LISTENING_RE = re.compile(r"Listening on http://[^:]+:(\d+)")
METRICS_RE = re.compile(r"Serving metrics on http://127\.0\.0\.1:(\d+)")


@dataclass
class ChildServer:
    """The homeserver as an operator runs it: `login-token-module serve -c FILE`."""

    process: subprocess.Popen[str]
    port: int
    log_path: Path
    # Kills the server's process group if the test process dies without kill_all().
    watchdog: Watchdog | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def metrics_port(self, timeout: float = 30) -> int:
        """The port its metrics listener logged. That line comes just after the client
        listener's, which is all start_child waits for, so it may not be written yet."""
        deadline = time.monotonic() + timeout
        while not (match := METRICS_RE.search(self.log())):
            assert time.monotonic() < deadline and self.process.poll() is None, self.log()
            time.sleep(0.05)
        return int(match.group(1))

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill_all(self) -> None:
        """SIGKILL the server and any worker processes it started."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self.watchdog is not None:
            self.watchdog.release()
            self.watchdog = None


def cli(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "login_token_module.host.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def write_config(directory: Path, config: Mapping[str, Any], name: str = "homeserver.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(dict(config)))
    return path


def start_child(
    config_path: Path,
    log_name: str = "server.log",
    timeout: float = 30,
    extra_args: tuple[str, ...] = (),
    preexec_fn: Callable[[], Any] | None = None,
) -> ChildServer:
    """``preexec_fn`` runs in the child before the server starts (to set its limits or umask)."""
    log_path = config_path.parent / log_name
    log_file = open(log_path, "w")  # noqa: SIM115 (the child writes to it for its whole life)
    process = subprocess.Popen(
        [sys.executable, "-m", "login_token_module.host.cli", "serve", "-c", str(config_path), *extra_args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A group of its own, so a test can signal (or clean up) a server and its workers together.
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    watchdog = watch(groups=[process.pid])
    # With --workers N, serving starts when the parent says all N are up.
    ready = re.compile(r"workers serving http://[^:]+:(\d+)") if "--workers" in extra_args else LISTENING_RE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = ready.search(log_path.read_text())
        if match:
            return ChildServer(process, int(match.group(1)), log_path, watchdog)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the server and any worker it started
    process.wait(10)
    watchdog.release()
    if process.returncode != -signal.SIGKILL:
        raise RuntimeError(f"server exited early:\n{log_path.read_text()}")
    raise RuntimeError(f"server did not start:\n{log_path.read_text()}")


@asynccontextmanager
async def running(
    tmp_path: Path, module_config: Mapping[str, Any], users: tuple[str, ...] = ("alice",)
) -> AsyncIterator[InProcessServer]:
    """A server with the given module config (SQLite store unless it says otherwise) and users."""
    srv = await start_in_process(
        tmp_path, {"store": {"type": "sqlite", "path": "tokens.db"}, **module_config}
    )
    try:
        for user in users:
            await srv.register(user)
        yield srv
    finally:
        await srv.stop()


def assert_challenge(response: Response) -> str:
    """A plain UIA 401 (no stage failed); returns its session."""
    assert response.code == 401, response
    body = response.json
    assert body["flows"] == PASSWORD_FLOWS
    assert body["params"] == {}
    assert "errcode" not in body, body
    session = body["session"]
    assert isinstance(session, str) and session
    return session


async def challenge(srv: InProcessServer, access_token: str, path: str = GET_TOKEN) -> str:
    """Start UIA on ``path``; returns the new session."""
    return assert_challenge(await srv.client.post(path, {}, access_token))


# Loopback requests must never go through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(
    base_url: str,
    method: str,
    path: str,
    body: Any = None,
    access_token: str | None = None,
    *,
    raw_body: bytes | None = None,
) -> Response:
    """One blocking request with urllib, for tests that run without the reactor.

    ``body`` is sent as JSON (``None``: no body); ``raw_body`` as given bytes.
    The answer's body is parsed JSON if it parses, else the raw bytes.
    """
    data = raw_body if raw_body is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if access_token is not None:
        request.add_header("Authorization", f"Bearer {access_token}")
    try:
        with _OPENER.open(request, timeout=60) as reply:
            code, raw, headers = reply.status, reply.read(), reply.headers
    except urllib.error.HTTPError as error:
        with error:
            code, raw, headers = error.code, error.read(), error.headers
    parsed: Any = raw
    with contextlib.suppress(ValueError):
        parsed = json.loads(raw)
    return Response(code, parsed, {name.lower(): value for name, value in headers.items()})


def sync_call(
    base_url: str,
    method: str,
    path: str,
    body: Any = None,
    access_token: str | None = None,
    *,
    raw_body: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    """:func:`call` for answers that must be a JSON object: (status, body)."""
    response = call(base_url, method, path, body, access_token, raw_body=raw_body)
    return response.code, response.json


# -- synchronous helpers for child-process tests (urllib, no reactor) ------------------


def password_login(
    base_url: str, user: str = "alice", password: str = PASSWORD, **extra: Any
) -> tuple[int, dict[str, Any]]:
    body = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": password,
        **extra,
    }
    return sync_call(base_url, "POST", LOGIN, body)


def access_token(base_url: str, user: str = "alice", password: str = PASSWORD) -> str:
    code, body = password_login(base_url, user, password)
    assert code == 200, body
    return str(body["access_token"])


def mint_login_token(base_url: str, token: str, password: str = PASSWORD) -> str:
    code, challenge = sync_call(base_url, "POST", GET_TOKEN, {}, token)
    assert code == 401, challenge
    auth = {"type": "m.login.password", "password": password, "session": challenge["session"]}
    code, issued = sync_call(base_url, "POST", GET_TOKEN, {"auth": auth}, token)
    assert code == 200, issued
    return str(issued["login_token"])


def token_login(base_url: str, login_token: str) -> tuple[int, dict[str, Any]]:
    return sync_call(base_url, "POST", LOGIN, {"type": "m.login.token", "token": login_token})


def register(config: Path, localpart: str = "alice", password: str = PASSWORD) -> None:
    result = cli("register-user", "-c", str(config), localpart, stdin=password + "\n")
    assert result.returncode == 0, result.stderr


def run_serve(config: Path, *extra_args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`serve` expected to give up at once (a bad config): it must not start serving."""
    return subprocess.run(
        [sys.executable, "-m", "login_token_module.host.cli", "serve", "-c", str(config), *extra_args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


Launcher = Callable[..., ChildServer]


def rename_table(db_path: Path, old: str, new: str) -> None:
    """Rename a table of a SQLite file behind the server's back (a real failure of the
    queries that need it; renamed back, everything works again). Blocking: run it in a thread."""
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"ALTER TABLE {old} RENAME TO {new}")


def recreate_token_table(db_path: Path) -> None:
    """Put back the SQLite token table a test dropped, as the current schema has it."""
    from login_token_module.stores.sqlite_store import SCHEMA

    with sqlite3.connect(db_path) as conn:
        # Every migration's statements about that table (its indexes went with it).
        for migration in SCHEMA.migrations:
            for statement in migration.sqlite:
                if re.search(r"\blogin_tokens\b", statement):
                    conn.execute(statement)


class AuditRecords(logging.Handler):
    """The audit trail's records, as a test sees them (install with the audit_log fixture)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [r.audit for r in self.records if r.audit["event"] == event]  # type: ignore[attr-defined]


class Clock:
    """The module's clock, held still; tests move it on by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def ms(self) -> int:
        return int(self.now * 1000)


def hold_clock(srv: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The module's clock, held at the current whole second."""
    held = Clock(float(int(srv.module._now())))
    monkeypatch.setattr(srv.module, "_now", held)
    return held


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages of every record at WARNING or above that the test captured."""
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


class PasswordChecks:
    """The host's password checks, counted; ``during_next`` runs once while the next
    one is under way (its bcrypt started, its answer not yet back to the module)."""

    def __init__(self) -> None:
        self.count = 0
        self.during_next: Callable[[], Awaitable[Any]] | None = None


def count_password_checks(srv: InProcessServer, monkeypatch: pytest.MonkeyPatch) -> PasswordChecks:
    seen = PasswordChecks()
    hasher = srv.hs.hasher
    real = hasher.check

    async def check(password: str, password_hash: str | None) -> bool:
        seen.count += 1
        action, seen.during_next = seen.during_next, None
        checking = defer.ensureDeferred(real(password, password_hash))
        if action is not None:
            await action()
        return bool(await checking)

    monkeypatch.setattr(hasher, "check", check)
    return seen
