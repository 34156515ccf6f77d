"""The load generator: a separate process that drives a homeserver over loopback HTTP.

Run as ``python -m benchmarks.loadgen``; it reads one job (JSON) on standard
input and writes progress lines, then one ``RESULT {json}`` line, to standard
output. Passwords and tokens arrive or are created in this process's memory
only: nothing here ever prints or logs one. Timestamps are ``time.monotonic()``
(CLOCK_MONOTONIC, shared by every process on the machine), so the orchestrator
can match each phase with the server's memory samples.

Jobs:
- ``get``: GET a path with N workers, for a number of requests or a duration,
  optionally paced (one request per ``interval`` seconds per worker).
- ``flow``: for each user, password login, then get_token with one UIA round
  (``{}`` then the password), then m.login.token login; one phase at a time.
  ``get_token_path`` picks where get_token is asked (default: the spec path);
  ``base_urls`` spreads the operations over several processes in turn, and
  ``get_token_base_urls`` sends get_token to these only.
- ``storm``: workers log in once, print ``READY``, then repeat get_token with
  UIA until the duration is over.
- ``register_synapse``: create users through Synapse's shared-secret admin API.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

LOGIN = "/_matrix/client/v3/login"
GET_TOKEN = "/_matrix/client/v1/login/get_token"
ADMIN_REGISTER = "/_synapse/admin/v1/register"


class UnexpectedResponseError(Exception):
    """A response other than the one the flow needs; carries status and errcode only."""

    def __init__(self, what: str, status: int, body: Any) -> None:
        errcode = body.get("errcode") if isinstance(body, dict) else None
        super().__init__(f"{what}: HTTP {status} {errcode or ''}".rstrip())


@dataclass
class PhaseResult:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    http_requests: int = 0
    error_samples: list[str] = field(default_factory=list)
    t_start: float = 0.0
    t_end: float = 0.0

    def failed(self, error: Exception) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(str(error) or type(error).__name__)

    async def timed(self, op: Awaitable[object], http_requests: int) -> None:
        """Await one operation, recording its latency, or the failure if it failed."""
        started = time.perf_counter()
        try:
            await op
        except (TimeoutError, UnexpectedResponseError, aiohttp.ClientError) as error:
            self.failed(error)
            return
        finally:
            self.http_requests += http_requests
        self.latencies_ms.append((time.perf_counter() - started) * 1000)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ops": len(self.latencies_ms),
            "errors": self.errors,
            "http_requests": self.http_requests,
            "error_samples": self.error_samples,
            "t_start": self.t_start,
            "t_end": self.t_end,
            "seconds": self.t_end - self.t_start,
            "latencies_ms": [round(v, 4) for v in self.latencies_ms],
        }


class Client:
    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._base = base_url.rstrip("/")

    async def request(
        self, method: str, path: str, body: Any = None, access_token: str | None = None
    ) -> tuple[int, Any]:
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if access_token is not None:
            headers["Authorization"] = f"Bearer {access_token}"
        async with self._session.request(method, self._base + path, data=data, headers=headers) as response:
            raw = await response.read()
            parsed: Any = None
            if raw:
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    parsed = None
            return response.status, parsed


def _identifier(localpart: str) -> dict[str, str]:
    return {"type": "m.id.user", "user": localpart}


async def password_login(client: Client, localpart: str, password: str) -> str:
    body = {"type": "m.login.password", "identifier": _identifier(localpart), "password": password}
    status, reply = await client.request("POST", LOGIN, body)
    if status != 200 or not isinstance(reply, dict) or "access_token" not in reply:
        raise UnexpectedResponseError("password login", status, reply)
    return str(reply["access_token"])


async def get_token_with_uia(
    client: Client, localpart: str, password: str, access_token: str, path: str = GET_TOKEN
) -> str:
    status, challenge = await client.request("POST", path, {}, access_token)
    if status != 401 or not isinstance(challenge, dict) or "session" not in challenge:
        raise UnexpectedResponseError("get_token challenge", status, challenge)
    auth = {
        "type": "m.login.password",
        "identifier": _identifier(localpart),
        "password": password,
        "session": challenge["session"],
    }
    status, reply = await client.request("POST", path, {"auth": auth}, access_token)
    if status != 200 or not isinstance(reply, dict) or "login_token" not in reply:
        raise UnexpectedResponseError("get_token with auth", status, reply)
    return str(reply["login_token"])


async def token_login(client: Client, login_token: str) -> str:
    status, reply = await client.request("POST", LOGIN, {"type": "m.login.token", "token": login_token})
    if status != 200 or not isinstance(reply, dict) or "access_token" not in reply:
        raise UnexpectedResponseError("token login", status, reply)
    return str(reply["access_token"])


async def get_ok(client: Client, path: str) -> None:
    status, reply = await client.request("GET", path)
    if status != 200:
        raise UnexpectedResponseError(f"GET {path}", status, reply)


async def run_workers(concurrency: int, worker: Callable[[int], Awaitable[object]]) -> None:
    await asyncio.gather(*(worker(i) for i in range(concurrency)))


async def timed_over_items(
    phase: PhaseResult,
    items: list[Any],
    concurrency: int,
    op: Callable[[Any], Awaitable[None]],
    requests_per_op: int,
) -> None:
    """Run ``op`` once per item with ``concurrency`` workers, timing each op."""
    queue = list(reversed(items))

    async def worker(_: int) -> None:
        while queue:
            await phase.timed(op(queue.pop()), requests_per_op)

    phase.t_start = time.monotonic()
    await run_workers(concurrency, worker)
    phase.t_end = time.monotonic()


def _session(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120))


async def job_get(job: dict[str, Any]) -> dict[str, Any]:
    concurrency = int(job.get("concurrency", 1))
    total = job.get("requests")
    duration = job.get("duration")
    interval = float(job.get("interval", 0))
    path = str(job["path"])
    phase = PhaseResult(name=f"GET {path}")
    async with _session(concurrency) as session:
        client = Client(session, job["base_url"])
        # Open the connections before timing starts.
        await run_workers(concurrency, lambda _: client.request("GET", path))
        issued = 0
        deadline = time.monotonic() + float(duration) if duration is not None else None

        async def worker(_: int) -> None:
            nonlocal issued
            next_at = time.monotonic()
            while True:
                if total is not None and issued >= int(total):
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    return
                issued += 1
                if interval:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_at = max(next_at + interval, time.monotonic())
                await phase.timed(get_ok(client, path), 1)

        phase.t_start = time.monotonic()
        await run_workers(concurrency, worker)
        phase.t_end = time.monotonic()
    return {"phases": [phase.to_json()]}


async def job_flow(job: dict[str, Any]) -> dict[str, Any]:
    concurrency = int(job["concurrency"])
    password = str(job["password"])
    users: list[str] = list(job["users"])
    warmup: list[str] = list(job.get("warmup_users", []))
    get_token_path = str(job.get("get_token_path", GET_TOKEN))
    results: list[PhaseResult] = []
    async with _session(concurrency) as session:
        # With ``base_urls`` (several processes of one server), each operation goes to the
        # next one in turn, as a round-robin proxy would send it.
        # ``get_token_base_urls``: where get_token goes, if not there (Synapse's generic
        # worker does not serve its built-in get_token).
        base_urls = job.get("base_urls") or [job["base_url"]]
        clients = itertools.cycle([Client(session, url) for url in base_urls])
        get_token_clients = itertools.cycle(
            [Client(session, url) for url in job.get("get_token_base_urls") or base_urls]
        )
        access: dict[str, str] = {}
        login_tokens: dict[str, str] = {}

        async def do_password_login(user: str) -> None:
            access[user] = await password_login(next(clients), user, password)

        async def do_get_token(user: str) -> None:
            client = next(get_token_clients)
            token = await get_token_with_uia(client, user, password, access[user], get_token_path)
            login_tokens[user] = token

        async def do_token_login(user: str) -> None:
            await token_login(next(clients), login_tokens.pop(user))

        # (name, operation, HTTP requests per operation, what the operation needs first)
        phases: list[tuple[str, Callable[[str], Awaitable[None]], int, dict[str, str] | None]] = [
            ("password_login", do_password_login, 1, None),
            ("get_token_uia", do_get_token, 2, access),
            ("token_login", do_token_login, 1, login_tokens),
        ]
        if warmup:
            # Warm both sides up (connections, caches, code paths); not measured.
            for name, op, per_op, needs in phases:
                scratch = PhaseResult(name=f"warmup {name}")
                ready = [u for u in warmup if needs is None or u in needs]
                await timed_over_items(scratch, ready, concurrency, op, per_op)
                if scratch.errors:
                    return {"phases": [scratch.to_json()], "fatal": f"warm-up {name} failed"}
        for name, op, per_op, needs in phases:
            ready = [u for u in users if needs is None or u in needs]
            phase = PhaseResult(name=name)
            await timed_over_items(phase, ready, concurrency, op, per_op)
            results.append(phase)
            print(f"phase {name}: {len(phase.latencies_ms)} ok, {phase.errors} errors", flush=True)
    return {"phases": [p.to_json() for p in results]}


async def job_storm(job: dict[str, Any]) -> dict[str, Any]:
    users: list[str] = list(job["users"])
    password = str(job["password"])
    duration = float(job["duration"])
    phase = PhaseResult(name="get_token_uia storm")
    async with _session(len(users)) as session:
        client = Client(session, job["base_url"])
        access = {user: await password_login(client, user, password) for user in users}
        print("READY", flush=True)
        deadline = time.monotonic() + duration

        async def worker(index: int) -> None:
            user = users[index]
            while time.monotonic() < deadline:
                await phase.timed(get_token_with_uia(client, user, password, access[user]), 2)

        phase.t_start = time.monotonic()
        await run_workers(len(users), worker)
        phase.t_end = time.monotonic()
    return {"phases": [phase.to_json()]}


async def job_register_synapse(job: dict[str, Any]) -> dict[str, Any]:
    concurrency = int(job.get("concurrency", 8))
    password = str(job["password"])
    secret = str(job["shared_secret"]).encode()
    phase = PhaseResult(name="register")
    async with _session(concurrency) as session:
        client = Client(session, job["base_url"])

        async def register(user: str) -> None:
            status, reply = await client.request("GET", ADMIN_REGISTER)
            if status != 200 or not isinstance(reply, dict):
                raise UnexpectedResponseError("register nonce", status, reply)
            nonce = str(reply["nonce"])
            mac = hmac.new(secret, digestmod=hashlib.sha1)
            for part in (nonce.encode(), user.encode(), password.encode()):
                mac.update(part)
                mac.update(b"\x00")
            mac.update(b"notadmin")
            body = {
                "nonce": nonce,
                "username": user,
                "password": password,
                "admin": False,
                "mac": mac.hexdigest(),
                "inhibit_login": True,
            }
            status, reply = await client.request("POST", ADMIN_REGISTER, body)
            if status != 200:
                raise UnexpectedResponseError("register", status, reply)

        await timed_over_items(phase, list(job["users"]), concurrency, register, 2)
    return {"phases": [phase.to_json()]}


JOBS: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]] = {
    "get": job_get,
    "flow": job_flow,
    "storm": job_storm,
    "register_synapse": job_register_synapse,
}


def main() -> int:
    job = json.loads(sys.stdin.read())
    result = asyncio.run(JOBS[job["kind"]](job))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
