"""Real servers on 127.0.0.1 for the benchmarks and the tests: the reference host, and Synapse.

Both run as child processes exactly as an operator would run them. Users are
created through each server's own supported tools: for the reference host, the
same helper ``register-user`` uses (``create_user`` with a real bcrypt hash);
for Synapse, its shared-secret admin registration API (driven by the load
generator, see ``loadgen.job_register_synapse``, or by the tests).

This is the one place that pins Synapse and installs it, into a virtualenv of
its own (``benchmarks/.venv-synapse``) together with this project, as an
operator installs the module into Synapse's environment. The benchmarks and
the Synapse tests both use it; ``python -m benchmarks.servers ensure-synapse``
does the install ahead of time (``scripts/test`` runs it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
import yaml

from login_token_module.host import database
from login_token_module.host.config import load_config_file
from login_token_module.host.passwords import hash_password_sync
from login_token_module.stores.engines.connection import Conn

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SYNAPSE_VENV = BENCH_DIR / ".venv-synapse"
SYNAPSE_VERSION = "1.163.2"
# With the drivers Synapse's workers need (PostgreSQL: psycopg2, Redis: txredisapi) and its
# single sign-on (authlib).
SYNAPSE_REQUIREMENT = f"matrix-synapse[postgres,redis,oidc]=={SYNAPSE_VERSION}"
LISTENING_RE = re.compile(r"Listening on http://[^:]+:(\d+)")
WORKERS_RE = re.compile(r"workers serving http://[^:]+:(\d+)")
SERVER_NAME = "bench.local"
GENEROUS = {"per_second": 100_000, "burst_count": 100_000}


class ServerError(Exception):
    pass


class RssSampler:
    """Samples a process's resident memory in a background thread."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self._process.memory_info().rss))
            except psutil.Error:
                return
            self._stop.wait(self._interval)

    def peak_mb(self, t_start: float, t_end: float) -> float:
        inside = [rss for t, rss in self.samples if t_start <= t <= t_end]
        if not inside:
            before = [rss for t, rss in self.samples if t <= t_end]
            inside = before[-1:] if before else [0]
        return max(inside) / (1024 * 1024)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (a server and its workers; PostgreSQL and its backends)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class CpuSampler:
    """The CPU time (user + system) used by groups of process trees, sampled in a thread.

    Each process's own counters (what the kernel charged it) are read every
    ``interval``; a group's total adds every process ever seen in it, so a
    process that exits keeps what it used. Unlike throughput, this does not
    depend on who else wanted the machine's two cores at the time.
    """

    def __init__(self, roots: dict[str, int], interval: float = 0.02) -> None:
        self._roots = roots
        self._interval = interval
        self._last: dict[str, dict[int, float]] = {group: {} for group in roots}
        self._processes: dict[int, psutil.Process] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._sample()
        self._thread.start()

    def _sample(self) -> None:
        totals: dict[str, float] = {}
        for group, root in self._roots.items():
            seen = self._last[group]
            for process in process_tree(root):
                known = self._processes.setdefault(process.pid, process)
                try:
                    times = known.cpu_times()
                except psutil.Error:
                    continue
                seen[process.pid] = times.user + times.system
            totals[group] = sum(seen.values())
        self.samples.append((time.monotonic(), totals))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def seconds_between(self, group: str, t_start: float, t_end: float) -> float:
        """CPU seconds ``group`` used from ``t_start`` to ``t_end`` (nearest samples outside)."""
        before = [totals[group] for t, totals in self.samples if t <= t_start]
        after = [totals[group] for t, totals in self.samples if t >= t_end]
        start = before[-1] if before else self.samples[0][1][group]
        end = after[0] if after else self.samples[-1][1][group]
        return max(0.0, end - start)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sample()


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    log_file: IO[bytes]
    sampler: RssSampler = field(init=False)

    def __post_init__(self) -> None:
        self.sampler = RssSampler(self.process.pid)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_until_idle(self, cpu_percent: float = 10, timeout: float = 120) -> float:
        """Wait until the server's own CPU use over one second drops below ``cpu_percent``.

        After bulk set-up (registering thousands of users) Synapse keeps working
        in the background for a while; measuring then would charge that work to
        whichever run comes first. Returns the seconds waited.
        """
        process = psutil.Process(self.pid)
        started = time.monotonic()
        process.cpu_percent(None)
        while time.monotonic() - started < timeout:
            if process.cpu_percent(interval=1.0) < cpu_percent:
                break
        return time.monotonic() - started

    def stop(self, timeout: float = 30) -> None:
        self.sampler.stop()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log_file.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_password() -> str:
    return secrets.token_urlsafe(18)


# -- the reference host ------------------------------------------------------


def host_config(
    directory: Path,
    *,
    bcrypt_rounds: int,
    store: str = "sqlite",
    database_name: str = "homeserver.db",
    postgres: Any = None,
) -> Path:
    """Write a host config with the module, generous rate limits and port 0.

    ``store``: memory, sqlite (UIA sessions and rate limits in memory unless
    there are several workers), sqlite-shared (them too in the SQLite file), or
    postgres (host and module on ``postgres``, a tests.pgcluster.Database).
    """
    generous = {"per_second": 1000, "burst_count": 1000}
    store_config: dict[str, Any] = {"type": "memory"}
    database: dict[str, Any] = {"name": "sqlite3", "args": {"database": database_name}}
    if store in ("sqlite", "sqlite-shared"):
        store_config = {"type": "sqlite", "path": "login_tokens.db"}
        if store == "sqlite-shared":
            store_config["shared_state"] = True
    elif store == "postgres":
        store_config = {"type": "postgres", "dsn": postgres.dsn}
        database = {"name": "psycopg2", "args": postgres.args}
    config = {
        "server_name": SERVER_NAME,
        "listeners": [{"port": 0, "bind_addresses": ["127.0.0.1"]}],
        "database": database,
        "bcrypt_rounds": bcrypt_rounds,
        # The load generator logs in from one address far faster than rc_login's defaults allow.
        "rc_login": {"address": generous, "account": generous, "failed_attempts": generous},
        "modules": [
            {
                "module": "login_token_module.LoginTokenModule",
                "config": {
                    "token_lifetime_ms": 120_000,
                    "require_ui_auth": True,
                    # The default (1 a minute per user) is the right production
                    # setting; the benchmark asks for many tokens per user.
                    "ratelimit": generous,
                    "failed_auth_ratelimit": generous,
                    "store": store_config,
                },
            }
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "homeserver.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def create_host_users(
    config_path: Path, localparts: Sequence[str], password: str, bcrypt_rounds: int
) -> None:
    """Create users the way ``register-user`` does (a real bcrypt hash each), in the
    database the config names (SQLite or PostgreSQL)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:  # bcrypt releases the GIL
        hashes = list(pool.map(lambda _: hash_password_sync(password, bcrypt_rounds), localparts))
    conn = database.connect_now(load_config_file(str(config_path)).database)
    try:

        def create_all(txn: Conn) -> None:
            for localpart, password_hash in zip(localparts, hashes, strict=True):
                database.create_user(txn, f"@{localpart}:{SERVER_NAME}", password_hash)

        conn.transaction(create_all)
    finally:
        conn.close()


def start_host(config_path: Path, name: str = "ours", timeout: float = 30, workers: int = 1) -> ServerProcess:
    log_path = config_path.parent / "server.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 (the child writes to it for its whole life)
    command = [sys.executable, "-m", "login_token_module.host.cli", "serve", "-c", str(config_path)]
    if workers > 1:
        command += ["--workers", str(workers)]
    process = subprocess.Popen(
        command,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    # With several workers, serving starts when the parent says they are all up.
    ready = WORKERS_RE if workers > 1 else LISTENING_RE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = ready.search(log_path.read_text(errors="replace"))
        if match:
            return ServerProcess(name, process, int(match.group(1)), log_path, log_file)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    log_file.close()
    raise ServerError(f"the reference host did not start; see {log_path}")


# -- Synapse -----------------------------------------------------------------


def synapse_python() -> Path:
    return SYNAPSE_VENV / "bin" / "python"


def synapse_version(python: Path) -> str | None:
    """The Synapse version installed beside this project in ``python``'s environment, if both are."""
    try:
        out = subprocess.run(
            [
                str(python),
                "-c",
                "import importlib.metadata as m, synapse, login_token_module as l; "
                "import psycopg2, txredisapi, authlib; "
                "print(m.version('matrix-synapse')); print(l.__file__)",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split("\n")
    if len(lines) < 2 or not Path(lines[1].strip()).resolve().is_relative_to(ROOT):
        return None  # the module there is not this checkout's
    return lines[0].strip() or None


def _pip(python: Path, *args: str) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
        check=True,
        timeout=1800,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def ensure_synapse(log: Any) -> tuple[Path | None, str]:
    """The Synapse venv's python (creating and installing it if needed), or why not.

    The venv holds the pinned Synapse and this project (editable, so it always
    runs the checkout's code), as an operator's Synapse environment would.
    """
    python = synapse_python()
    version = synapse_version(python) if python.exists() else None
    if version == SYNAPSE_VERSION:
        return python, version
    log(f"installing {SYNAPSE_REQUIREMENT} and this project into {SYNAPSE_VENV} (about a minute)")
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(SYNAPSE_VENV)], check=True, timeout=300)
        _pip(python, SYNAPSE_REQUIREMENT)
        _pip(python, "-e", str(ROOT))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        tail = detail.decode(errors="replace").strip().splitlines()[-1:] if detail else []
        return None, f"cannot install {SYNAPSE_REQUIREMENT}: {error} {' '.join(tail)}".strip()
    version = synapse_version(python)
    if version != SYNAPSE_VERSION:
        return None, f"{SYNAPSE_REQUIREMENT} installed but importing it with login_token_module fails"
    return python, version


def generate_synapse_files(python: Path, directory: Path) -> Path:
    """Synapse's own ``--generate-config`` into ``directory`` (keys, secrets, log config)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "homeserver.yaml"
    subprocess.run(
        [
            str(python),
            "-m",
            "synapse.app.homeserver",
            "--generate-config",
            "--server-name",
            SERVER_NAME,
            "--config-path",
            str(path),
            "--data-directory",
            str(directory),
            "--report-stats=no",
        ],
        check=True,
        cwd=directory,
        capture_output=True,
        timeout=120,
    )
    return path


def copy_synapse_files(template: Path, directory: Path) -> Path:
    """A copy of generated files in ``directory``, with the paths inside pointing there.

    Generating takes seconds (Synapse's start-up cost); tests that start many
    Synapses generate once and copy.
    """
    shutil.copytree(template, directory, dirs_exist_ok=True)
    for name in ("homeserver.yaml", f"{SERVER_NAME}.log.config"):
        copied = directory / name
        copied.write_text(copied.read_text().replace(str(template), str(directory)))
    return directory / "homeserver.yaml"


def synapse_config(
    python: Path,
    directory: Path,
    *,
    bcrypt_rounds: int,
    port: int,
    module_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    template: Path | None = None,
) -> tuple[Path, str]:
    """A throwaway Synapse config on SQLite; returns (path, shared secret).

    ``module_config``: load login_token_module.LoginTokenModule with this
    config (None: Synapse alone). ``extra``: further homeserver.yaml keys.
    ``template``: a folder from :func:`generate_synapse_files` to copy instead
    of generating anew.
    """
    if template is None:
        path = generate_synapse_files(python, directory)
    else:
        path = copy_synapse_files(template, directory)
    config = yaml.safe_load(path.read_text())
    log_config_path = Path(config["log_config"])
    log_config = yaml.safe_load(log_config_path.read_text())
    log_config["handlers"]["file"]["filename"] = str(directory / "synapse.log")
    log_config_path.write_text(yaml.safe_dump(log_config))
    shared_secret = secrets.token_urlsafe(24)
    config.update(
        {
            "listeners": [
                {
                    "port": port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {"name": "sqlite3", "args": {"database": str(directory / "homeserver.db")}},
            "bcrypt_rounds": bcrypt_rounds,
            "login_via_existing_session": {"enabled": True, "require_ui_auth": True, "token_timeout": "2m"},
            "rc_login": {"address": GENEROUS, "account": GENEROUS, "failed_attempts": GENEROUS},
            "rc_registration": GENEROUS,
            "registration_shared_secret": shared_secret,
            "enable_metrics": False,
            "report_stats": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "presence": {"enabled": False},
            "url_preview_enabled": False,
        }
    )
    if module_config is not None:
        config["modules"] = [{"module": "login_token_module.LoginTokenModule", "config": module_config}]
    config.update(extra or {})
    path.write_text(yaml.safe_dump(config))
    return path, shared_secret


def _versions_ok(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url + "/_matrix/client/versions", timeout=2) as response:
            json.loads(response.read())
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def start_synapse(python: Path, config_path: Path, port: int, timeout: float = 180) -> ServerProcess:
    log_path = config_path.parent / "stdout.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 (the child writes to it for its whole life)
    process = subprocess.Popen(
        [str(python), "-m", "synapse.app.homeserver", "-c", str(config_path)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=config_path.parent,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _versions_ok(base_url):
            return ServerProcess("synapse", process, port, log_path, log_file)
        time.sleep(0.2)
    if process.poll() is None:
        process.kill()
        process.wait(10)
    log_file.close()
    raise ServerError(f"Synapse did not start; see {log_path} and {config_path.parent / 'synapse.log'}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.servers ensure-synapse``: install the pinned Synapse now."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["ensure-synapse"]:
        print("usage: python -m benchmarks.servers ensure-synapse", file=sys.stderr)
        return 2
    python, detail = ensure_synapse(lambda message: print(message, file=sys.stderr, flush=True))
    if python is None:
        print(f"Synapse is not available: {detail}", file=sys.stderr)
        return 1
    print(f"Synapse {detail} in {SYNAPSE_VENV}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
