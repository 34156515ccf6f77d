"""``python -m benchmarks.attack``: the hostile-input attack, measured against a real host.

Not a test: it prints numbers. One run, against the reference host as an operator
runs it (``login-token-module serve``, a child process) with the sample config
(SQLite, bcrypt 12 rounds, the sample's get_token and failed-password limits; only
rc_login's per-address and per-account limits are opened up, so that one client
address can log in again and again to measure):

1. Another user's password-login latency (p50/p99): idle, then while 100
   concurrent get_token requests for one user run with the right password, then
   with wrong ones; with how each burst was answered, and the server's CPU time
   over it in bcrypt checks (one check's CPU time measured here, same rounds).
2. 2,000 concurrent ``/login`` requests whose ``type`` is 10,000 lone surrogates
   (60 KB each): how many were answered, how fast, the server's memory and open
   files before, during and after, and whether ``/versions`` answered meanwhile.
3. 20,000 spellings of ``/_matrix/client/versions``: how many request-latency
   series the metrics then hold, the scrape's size and time, memory, and
   ``/versions`` latency afterwards.
4. The modes of the files ``scripts/serve`` makes when an operator runs it
   (``homeserver.db``, ``login_tokens.db``, their ``-wal``/``-shm``,
   ``.demo-password``, also as it was when first written), in a scratch copy.

``--smoke`` runs tiny numbers at 4 bcrypt rounds (seconds; the test suite runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml
from yarl import URL

from benchmarks import servers
from benchmarks.stats import percentile, ratio
from login_token_module.host.passwords import check_password_sync, hash_password_sync

ROOT = servers.ROOT
LOGIN = "/_matrix/client/v3/login"
GET_TOKEN = "/_matrix/client/v1/login/get_token"
VERSIONS = "/_matrix/client/versions"
HISTOGRAM = "login_token_module_http_request_duration_seconds"
METRICS_RE = re.compile(r"Serving metrics on http://[^:]+:(\d+)")
WIDE_OPEN = {"per_second": 100_000, "burst_count": 100_000}


@dataclass(frozen=True)
class Sizes:
    bcrypt_rounds: int
    idle_logins: int
    burst: int
    surrogate_requests: int
    surrogate_length: int
    answer_timeout: float
    spellings: int

    @staticmethod
    def full() -> Sizes:
        return Sizes(12, 10, 100, 2_000, 10_000, 15.0, 20_000)

    @staticmethod
    def smoke() -> Sizes:
        return Sizes(4, 3, 10, 20, 100, 2.0, 200)


def say(text: str = "") -> None:
    print(text, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def mb(size: float) -> str:
    return f"{size / (1024 * 1024):,.1f} MB"


# -- the host -----------------------------------------------------------------------------


def sample_like_config(directory: Path, rounds: int) -> Path:
    """sample_config.yaml, on free ports, at ``rounds``, with rc_login opened up per address
    and per account (failed attempts keep the sample's limit)."""
    config = yaml.safe_load((ROOT / "sample_config.yaml").read_text())
    config["server_name"] = servers.SERVER_NAME
    for listener in config["listeners"]:
        listener["port"] = 0
    config["bcrypt_rounds"] = rounds
    config["rc_login"]["address"] = WIDE_OPEN
    config["rc_login"]["account"] = WIDE_OPEN
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "homeserver.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Host:
    server: servers.ServerProcess
    metrics_port: int

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.server.pid)

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def cpu(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def open_files(self) -> int:
        return int(self.process.num_fds())


def start(directory: Path, sizes: Sizes, password: str) -> Host:
    config = sample_like_config(directory, sizes.bcrypt_rounds)
    servers.create_host_users(config, ["alice", "bob"], password, sizes.bcrypt_rounds)
    server = servers.start_host(config)
    match = METRICS_RE.search(server.log_path.read_text())
    if match is None:
        server.stop()
        raise servers.ServerError("the host did not say where its metrics are")
    return Host(server, int(match.group(1)))


# -- requests -------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int | None  # None: no answer in time (or the connection broke)
    body: Any
    seconds: float


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    body: bytes | None = None,
    access: str | None = None,
    timeout: float = 120.0,
) -> Reply:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if access is not None:
        headers["Authorization"] = f"Bearer {access}"
    started = time.monotonic()
    try:
        async with session.request(
            method, url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            raw = await response.read()
            status = response.status
    except (TimeoutError, aiohttp.ClientError):
        return Reply(None, None, time.monotonic() - started)
    parsed: Any = None
    if raw:
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw
    return Reply(status, parsed, time.monotonic() - started)


def as_json(body: Any) -> bytes:
    return json.dumps(body).encode()  # ASCII: a lone surrogate goes out as \ud800


def password_login_body(user: str, password: str) -> bytes:
    identifier = {"type": "m.id.user", "user": user}
    return as_json({"type": "m.login.password", "identifier": identifier, "password": password})


def answer_kind(reply: Reply) -> str:
    if reply.status is None:
        return "no answer"
    body = reply.body if isinstance(reply.body, dict) else {}
    detail = body.get("error") if reply.status == 401 else body.get("errcode")
    return f"{reply.status} {detail}" if detail else str(reply.status)


def latencies(replies: list[Reply]) -> str:
    seconds = [r.seconds for r in replies]
    if not seconds:
        return "none"
    return (
        f"p50 {ms(percentile(seconds, 50))}  p99 {ms(percentile(seconds, 99))}"
        f"  max {ms(max(seconds))}  (n={len(seconds)})"
    )


# -- 1. another user's login while get_token is attacked -------------------------------------------


def bcrypt_cpu_seconds(rounds: int) -> float:
    """CPU seconds of one bcrypt check at ``rounds`` on this machine (best of three)."""
    password_hash = hash_password_sync("x", rounds)
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        check_password_sync("x", password_hash)
        best = min(best, time.process_time() - started)
    return best


async def bob_logins_while(
    session: aiohttp.ClientSession, base: str, password: str, busy: Callable[[], bool], least: int
) -> list[Reply]:
    """bob's password logins, one after another, while ``busy()`` (at least ``least`` of them)."""
    replies: list[Reply] = []
    while busy() or len(replies) < least:
        reply = await request(session, "POST", base + LOGIN, password_login_body("bob", password))
        if reply.status != 200:
            raise RuntimeError(f"bob's login failed: {answer_kind(reply)}")
        replies.append(reply)
    return replies


async def attack_get_token(host: Host, sizes: Sizes, password: str, one_check: float) -> dict[str, float]:
    base = host.server.base_url
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        reply = await request(session, "POST", base + LOGIN, password_login_body("alice", password))
        if reply.status != 200:
            raise RuntimeError(f"alice's login failed: {answer_kind(reply)}")
        access = str(reply.body["access_token"])

        idle = await bob_logins_while(session, base, password, lambda: False, sizes.idle_logins)
        say(f"  bob's password login, idle:          {latencies(idle)}")
        figures = {"idle_p50": percentile([r.seconds for r in idle], 50)}
        figures["idle_p99"] = percentile([r.seconds for r in idle], 99)

        for label, attempt in (("right", password), ("wrong", "not the password")):
            body = as_json({"auth": {"type": "m.login.password", "password": attempt}})
            cpu_before = host.cpu()
            started = time.monotonic()
            burst = [
                asyncio.ensure_future(request(session, "POST", base + GET_TOKEN, body, access))
                for _ in range(sizes.burst)
            ]

            def busy(burst: list[asyncio.Task[Reply]] = burst) -> bool:
                return not all(b.done() for b in burst)

            bob = asyncio.ensure_future(bob_logins_while(session, base, password, busy, 3))
            answers = await asyncio.gather(*burst)
            took = time.monotonic() - started
            bob_replies = await bob
            cpu = host.cpu() - cpu_before
            kinds = Counter(answer_kind(a) for a in answers)
            checks = cpu / one_check
            seconds = [r.seconds for r in bob_replies]
            figures[f"{label}_p50"] = percentile(seconds, 50)
            figures[f"{label}_p99"] = percentile(seconds, 99)
            say(
                f"  {sizes.burst} concurrent get_token, {label} password: answered in {took:.1f} s: "
                + ", ".join(f"{n} x {kind}" for kind, n in kinds.most_common())
            )
            say(
                f"    server CPU over it: {cpu:.2f} s = {checks:.0f} bcrypt checks of {ms(one_check)}"
                f" (bob's {len(bob_replies)} logins among them)"
            )
            say(
                f"    bob's password login meanwhile:   {latencies(bob_replies)}"
                f"  = {ratio(figures[f'{label}_p50'], figures['idle_p50']):.1f}x /"
                f" {ratio(figures[f'{label}_p99'], figures['idle_p99']):.1f}x idle"
            )
    return figures


# -- 2. lone surrogates ------------------------------------------------------------------------------


async def surrogate_flood(host: Host, sizes: Sizes) -> None:
    base = host.server.base_url
    body = b'{"type":"' + b"\\ud800" * sizes.surrogate_length + b'"}'
    rss_before, files_before = host.rss(), host.open_files()
    peak = {"rss": rss_before, "files": files_before}
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], host.rss())
            peak["files"] = max(peak["files"], host.open_files())
            await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        watcher = asyncio.ensure_future(watch())
        started = time.monotonic()
        flood = [
            asyncio.ensure_future(request(session, "POST", base + LOGIN, body, timeout=sizes.answer_timeout))
            for _ in range(sizes.surrogate_requests)
        ]
        await asyncio.sleep(min(1.0, sizes.answer_timeout / 2))
        probe = await request(session, "GET", base + VERSIONS, timeout=sizes.answer_timeout)
        replies = await asyncio.gather(*flood)
        took = time.monotonic() - started
        done.set()
        await watcher
    await asyncio.sleep(2)  # the client has closed every connection
    kinds = Counter(answer_kind(r) for r in replies)
    answered = [r for r in replies if r.status is not None]
    say(
        f"  {sizes.surrogate_requests} concurrent /login with type = {sizes.surrogate_length} lone surrogates"
        f" ({len(body) / 1024:,.0f} KB each), client waits {sizes.answer_timeout:.0f} s:"
    )
    say(f"    answered {len(answered)} of {len(replies)} in {took:.1f} s: {dict(kinds.most_common())}")
    say(f"    answer latency: {latencies(answered)}")
    say(f"    /versions during the flood: {answer_kind(probe)} in {ms(probe.seconds)}")
    say(
        f"    server RSS {mb(rss_before)} before, {mb(peak['rss'])} at peak, {mb(host.rss())} after;"
        f" open files {files_before} before, {peak['files']} at peak, {host.open_files()} after"
        f" (its limit: {host.process.rlimit(resource.RLIMIT_NOFILE)[0]})"
    )


# -- 3. path spellings -----------------------------------------------------------------------------


def spelling(n: int) -> str:
    """The n-th spelling of /_matrix/client/versions: bit i of n+1 percent-encodes letter i."""
    parts, bit = [], 0
    for char in VERSIONS:
        if char == "/":
            parts.append(char)
            continue
        parts.append(f"%{ord(char):02X}" if ((n + 1) >> bit) & 1 else char)
        bit += 1
    return "".join(parts)


async def scrape(session: aiohttp.ClientSession, port: int) -> tuple[int, int, float]:
    """(series of the request histogram, scrape size in bytes, scrape seconds)."""
    started = time.monotonic()
    async with session.get(f"http://127.0.0.1:{port}/_synapse/metrics") as response:
        text = await response.text()
    took = time.monotonic() - started
    series = sum(1 for line in text.splitlines() if line.startswith(f"{HISTOGRAM}_count{{"))
    return series, len(text.encode()), took


async def path_spellings(host: Host, sizes: Sizes) -> None:
    base = host.server.base_url
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as session:
        series_before, size_before, _ = await scrape(session, host.metrics_port)
        rss_before = host.rss()
        queue = [URL(base + spelling(n), encoded=True) for n in range(sizes.spellings)]
        statuses: Counter[str] = Counter()
        started = time.monotonic()

        async def worker() -> None:
            while queue:
                statuses[answer_kind(await request(session, "GET", queue.pop()))] += 1

        await asyncio.gather(*(worker() for _ in range(32)))
        took = time.monotonic() - started
        scraping = asyncio.ensure_future(scrape(session, host.metrics_port))
        await asyncio.sleep(0.2)
        during = await request(session, "GET", base + VERSIONS)
        series, size, scrape_seconds = await scraping
        after = [await request(session, "GET", base + VERSIONS) for _ in range(20)]
    say(f"  {sizes.spellings} spellings of {VERSIONS} in {took:.1f} s: {dict(statuses.most_common())}")
    say(
        f"    {HISTOGRAM} series: {series_before} before, {series} after;"
        f" scrape {mb(size_before)} before, {mb(size)} after, taking {ms(scrape_seconds)}"
    )
    say(f"    server RSS {mb(rss_before)} before, {mb(host.rss())} after")
    say(f"    /versions during the scrape: {answer_kind(during)} in {ms(during.seconds)}")
    say(f"    /versions after: {latencies(after)}")


# -- 4. file modes ----------------------------------------------------------------------------------

CHMOD_SHIM = """#!/bin/sh
# Records the mode of each file as it was before chmod changes it, then runs chmod.
for last; do :; done
[ -e "$last" ] && echo "$last $(stat -c %a "$last")" >> "$CHMOD_LOG"
exec {chmod} "$@"
"""


def _post(base: str, path: str, body: dict[str, Any], access: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(base + path, data=as_json(body), method="POST")
    request.add_header("Content-Type", "application/json")
    if access is not None:
        request.add_header("Authorization", f"Bearer {access}")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def sign_in_and_mint(log: str, password: str) -> None:
    """alice signs in with the demo password and asks for a login token, as the README shows."""
    match = servers.LISTENING_RE.search(log)
    if match is None:
        raise RuntimeError("scripts/serve did not say where it listens")
    base = f"http://127.0.0.1:{match.group(1)}"
    identifier = {"type": "m.id.user", "user": "alice"}
    login = {"type": "m.login.password", "identifier": identifier, "password": password}
    code, reply = _post(base, LOGIN, login)
    if code != 200:
        raise RuntimeError(f"the demo login failed: {code}")
    access = str(reply["access_token"])
    code, challenge = _post(base, GET_TOKEN, {}, access)
    auth = {"type": "m.login.password", "password": password, "session": challenge.get("session")}
    code, _ = _post(base, GET_TOKEN, {"auth": auth}, access)
    if code != 200:
        raise RuntimeError(f"the demo get_token failed: {code}")


def file_modes(sizes: Sizes) -> None:
    """Run scripts/serve as an operator would, in a scratch copy, and read the modes it leaves."""
    scratch = Path(tempfile.mkdtemp(prefix="attack-serve-"))
    try:
        (scratch / "scripts").mkdir()
        shutil.copy(ROOT / "scripts" / "serve", scratch / "scripts" / "serve")
        # The scratch copy uses this checkout's virtualenv as it is (no install into it).
        (scratch / "scripts" / "_venv.sh").write_text("ensure_venv() { :; }\n")
        (scratch / ".venv").symlink_to(Path(sys.prefix))
        config = yaml.safe_load((ROOT / "sample_config.yaml").read_text())
        for listener in config["listeners"]:
            listener["port"] = 0
        config["bcrypt_rounds"] = sizes.bcrypt_rounds
        (scratch / "sample_config.yaml").write_text(yaml.safe_dump(config))
        shims = scratch / "shims"
        shims.mkdir()
        chmod = shutil.which("chmod") or "/bin/chmod"
        (shims / "chmod").write_text(CHMOD_SHIM.format(chmod=chmod))
        (shims / "chmod").chmod(0o755)
        log = scratch / "serve.log"
        env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "CHMOD_LOG": str(scratch / "chmod.log")}
        with open(log, "wb") as out:
            process = subprocess.Popen(
                ["bash", "scripts/serve"],
                cwd=scratch,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 60
            while "Listening on" not in log.read_text(errors="replace"):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"scripts/serve did not start:\n{log.read_text(errors='replace')}")
                time.sleep(0.1)
            # A password login and a token write to both databases; the modes are read while
            # it runs (a clean stop folds the -wal files back and removes them).
            sign_in_and_mint(log.read_text(), (scratch / ".demo-password").read_text())
            modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in scratch.iterdir()}
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
        chmod_log = scratch / "chmod.log"
        lines = chmod_log.read_text().splitlines() if chmod_log.exists() else []
        first = dict(line.rsplit(" ", 1) for line in lines)
        umask = os.umask(0o22)
        os.umask(umask)
        say(f"  files scripts/serve makes, while it serves (umask {umask:03o}):")
        for name in (
            "homeserver.db",
            "homeserver.db-wal",
            "homeserver.db-shm",
            "login_tokens.db",
            "login_tokens.db-wal",
            "login_tokens.db-shm",
            ".demo-password",
        ):
            if name not in modes:
                say(f"    {name:22} (not there)")
                continue
            was = first.get(name)
            note = f"  (written {was} first, then chmod)" if was else ""
            say(f"    {name:22} {modes[name]:04o}{note}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- the run ----------------------------------------------------------------------------------------


def raise_open_files_limit() -> None:
    """Let this process (the client, after the host has started) hold thousands of connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(sizes: Sizes) -> int:
    password = servers.new_password()
    work = Path(tempfile.mkdtemp(prefix="attack-"))
    say(f"Attack on the reference host: sample config, bcrypt {sizes.bcrypt_rounds} rounds, SQLite")
    try:
        one_check = bcrypt_cpu_seconds(sizes.bcrypt_rounds)
        host = start(work / "host", sizes, password)
        raise_open_files_limit()
        try:
            steps: list[tuple[str, Callable[[], Coroutine[Any, Any, Any]]]] = [
                (
                    "1. another user's login during a get_token burst",
                    lambda: attack_get_token(host, sizes, password, one_check),
                ),
                ("2. lone surrogates", lambda: surrogate_flood(host, sizes)),
                ("3. path spellings", lambda: path_spellings(host, sizes)),
            ]
            for title, step in steps:
                say(title)
                asyncio.run(step())
        finally:
            host.server.stop()
        say("4. file modes")
        file_modes(sizes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attack", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny numbers, 4 bcrypt rounds (seconds)")
    args = parser.parse_args(argv)
    return run(Sizes.smoke() if args.smoke else Sizes.full())


if __name__ == "__main__":
    sys.exit(main())
