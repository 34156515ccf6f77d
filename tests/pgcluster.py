"""A throwaway PostgreSQL cluster, for the tests and the benchmarks.

``PostgresCluster.create()`` runs the machine's own server binaries (``initdb``
and ``pg_ctl``, from PATH or Debian's /usr/lib/postgresql/<version>/bin) in a
temporary folder, on a free loopback port, with password (SCRAM) auth for one
superuser. PostgreSQL refuses to run as root, so under root the cluster runs
as the ``postgres`` system user (Debian's package creates it), or ``nobody``.
Nothing depends on a PostgreSQL service already running on the machine.

By default durability is turned off (``fsync``, ``synchronous_commit``): these
clusters hold test data only, and the tests measure behaviour, not disks. The
benchmarks pass settings of their own.

A cluster dies with the process that made it: a watchdog (tests/watchdog.py)
stops the server and removes its folder if that process ends without
``destroy()``, killed or not.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.watchdog import Watchdog, watch

SUPERUSER = "ltm"
_NAMES = itertools.count(1)
# Test data only: no need to survive a crash of the machine.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


# A PostgreSQL that is not there: nothing listens on port 1 of loopback, so a
# connection is refused at once.
NOWHERE = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2"


class ClusterUnavailableError(Exception):
    """PostgreSQL cannot be started here; the message says why and what to install."""


def find_bindir() -> Path | None:
    """The folder with initdb and pg_ctl: PATH first, then Debian's newest version."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent

    def version(path: str) -> int:
        match = re.search(r"/postgresql/(\d+)/", path)
        return int(match.group(1)) if match else 0

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version, reverse=True):
        folder = Path(candidate).parent
        if (folder / "initdb").exists():
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    """The account to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ClusterUnavailableError("running as root, and there is no 'postgres' or 'nobody' user to run as")


@dataclass
class Database:
    """One database in the cluster, with the ways our configs name it."""

    cluster: PostgresCluster
    name: str

    @property
    def dsn(self) -> str:
        return self.cluster.dsn(self.name)

    @property
    def args(self) -> dict[str, Any]:
        """The host's ``database: {name: psycopg2, args: ...}``."""
        return self.cluster.args(self.name)


@dataclass
class PostgresCluster:
    bindir: Path
    folder: Path
    port: int
    password: str
    owner: pwd.struct_passwd | None
    settings: Mapping[str, str] = field(default_factory=lambda: dict(FAST_SETTINGS))
    running: bool = False
    _log: Path = field(init=False)
    _watchdog: Watchdog | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._log = self.folder / "postgres.log"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    # -- life -----------------------------------------------------------------------

    @classmethod
    def create(cls, settings: Mapping[str, str] | None = None) -> PostgresCluster:
        bindir = find_bindir()
        if bindir is None:
            raise ClusterUnavailableError(
                "PostgreSQL's server binaries (initdb, pg_ctl) are not installed;"
                " on Debian: apt-get install postgresql"
            )
        owner = _run_as()
        folder = Path(tempfile.mkdtemp(prefix="ltm-pg-"))
        cluster = cls(
            bindir,
            folder,
            _free_port(),
            secrets.token_urlsafe(16),
            owner,
            dict(FAST_SETTINGS if settings is None else settings),
        )
        cluster._watchdog = watch(postgres=[cluster.data], remove=[folder])
        try:
            if owner is not None:
                os.chown(folder, owner.pw_uid, owner.pw_gid)
            cluster._initdb()
            # The free port may be taken between finding it and the server binding it
            # (by another test process, e.g. two mutation runs at once): try another.
            for attempt in range(3):
                try:
                    cluster.start()
                    break
                except ClusterUnavailableError as error:
                    if "already in use" not in str(error) or attempt == 2:
                        raise
                    cluster.port = _free_port()
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        extra: dict[str, Any] = {}
        if self.owner is not None:
            extra = {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.folder)}
        return subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.folder,
            env=env,
            **extra,
        )

    def _initdb(self) -> None:
        pwfile = self.folder / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.owner is not None:
            os.chown(pwfile, self.owner.pw_uid, self.owner.pw_gid)
        pwfile.chmod(0o600)
        result = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise ClusterUnavailableError(f"initdb failed: {result.stderr.strip()[-500:]}")

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.folder}",
                "-c max_connections=300",
                *(f"-c {name}={value}" for name, value in self.settings.items()),
            ]
        )
        result = self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self._log),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        if result.returncode != 0:
            log = self._log.read_text(errors="replace")[-1000:] if self._log.exists() else ""
            raise ClusterUnavailableError(f"pg_ctl start failed: {result.stderr.strip()} {log}".strip())
        self.running = True
        self._wait_until_accepting()

    def _wait_until_accepting(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect("postgres").close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        if not self.running:
            return
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            if self._watchdog is not None:
                self._watchdog.release()
                self._watchdog = None

    # -- naming and using databases ----------------------------------------------------

    def dsn(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def args(self, dbname: str) -> dict[str, Any]:
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "user": SUPERUSER,
            "password": self.password,
            "database": dbname,
        }

    def connect(self, dbname: str) -> Any:
        """A plain psycopg2 connection (autocommit), for setting up and inspecting."""
        import psycopg2

        conn = psycopg2.connect(self.dsn(dbname), connect_timeout=5)
        conn.autocommit = True
        return conn

    def create_database(self, prefix: str = "test") -> Database:
        name = f"{prefix}_{os.getpid()}_{next(_NAMES)}"
        conn = self.connect("postgres")
        try:
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return Database(self, name)

    def query(self, dbname: str, sql: str, params: Mapping[str, Any] | tuple[Any, ...] = ()) -> list[Any]:
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql, params)
                return list(cursor.fetchall()) if cursor.description is not None else []
        finally:
            conn.close()

    def postmaster_pid(self) -> int | None:
        """The server's main process (its children do the work), for CPU accounting."""
        try:
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None


def driver_missing_reason() -> str | None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[postgres]')"
    return None
