"""The test set-up's servers: they die with the test process, even one killed with SIGKILL,
and a PostgreSQL cluster whose port is taken meanwhile starts on another.

Each test here plays the test process in a child Python process: it starts a
server there, SIGKILLs the child (no clean-up code can run), and checks that
the server and its folder are gone within seconds.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import pgcluster
from tests.helpers import ROOT
from tests.pgcluster import driver_missing_reason, find_bindir
from tests.watchdog import watch

# Long enough for a loaded machine, short enough to mean "at once".
GONE_WITHIN = 15.0


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(check: Any, what: str) -> None:
    deadline = time.monotonic() + GONE_WITHIN
    while not check():
        assert time.monotonic() < deadline, f"{what} after {GONE_WITHIN} s"
        time.sleep(0.05)


def refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def start_in_a_child(code: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Run ``code`` in a child Python that prints one JSON line and then waits to be killed."""
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout=120)
    line = child.stdout.readline() if ready else ""
    if not line:
        child.kill()
        child.wait(30)
        pytest.fail(f"the child ({child.returncode}) did not say what it started")
    return child, json.loads(line)


def sigkill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL


def test_a_postgres_cluster_dies_with_the_process_that_made_it() -> None:
    if driver_missing_reason() is not None or find_bindir() is None:
        pytest.skip("needs PostgreSQL's server binaries and psycopg2")
    child, started = start_in_a_child(
        "import json, time\n"
        "from tests.pgcluster import PostgresCluster\n"
        "cluster = PostgresCluster.create()\n"
        "cluster.query('postgres', 'SELECT 1')\n"
        "print(json.dumps({'folder': str(cluster.folder), 'port': cluster.port,"
        " 'pid': cluster.postmaster_pid()}), flush=True)\n"
        "time.sleep(600)\n"
    )
    try:
        folder, port, pid = Path(started["folder"]), started["port"], started["pid"]
        assert folder.name.startswith("ltm-pg-") and folder.is_dir()
        assert isinstance(pid, int) and not gone(pid)
        assert not refused(port)
        sigkill(child)
        wait_until(lambda: gone(pid), "the cluster's server is still running")
        wait_until(lambda: not folder.exists(), "the cluster's folder is still there")
        assert refused(port)
    finally:
        if child.poll() is None:
            child.kill()


def test_a_child_server_group_dies_with_the_process_that_started_it() -> None:
    """The homeserver children run in a process group of their own, workers included."""
    child, started = start_in_a_child(
        "import json, subprocess, sys, time\n"
        "from tests.watchdog import watch\n"
        # A "server" that starts a "worker" in its group, as `serve --workers` does.
        "server = subprocess.Popen(['sh', '-c', 'sleep 600 & echo $!; wait'],"
        " start_new_session=True, stdout=subprocess.PIPE, text=True)\n"
        "watch(groups=[server.pid])\n"
        "worker = int(server.stdout.readline())\n"
        "print(json.dumps({'pids': [server.pid, worker]}), flush=True)\n"
        "time.sleep(600)\n"
    )
    try:
        pids = started["pids"]
        assert not any(gone(pid) for pid in pids)
        sigkill(child)
        wait_until(lambda: all(gone(pid) for pid in pids), "the server's group is still running")
    finally:
        if child.poll() is None:
            child.kill()


def test_a_released_watchdog_leaves_everything_alone(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    kept = tmp_path / "kept"
    kept.mkdir()
    try:
        dog = watch(pids=[sleeper.pid], groups=[sleeper.pid], remove=[kept])
        dog.release()
        wait_until(lambda: gone(dog.pid), "the released watchdog is still running")
        assert sleeper.poll() is None
        assert kept.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_a_cluster_whose_port_is_taken_meanwhile_starts_on_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process may bind the free port found before the server binds it."""
    if driver_missing_reason() is not None or find_bindir() is None:
        pytest.skip("needs PostgreSQL's server binaries and psycopg2")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real_free_port = pgcluster._free_port
    monkeypatch.setattr(pgcluster, "_free_port", lambda: next(ports, None) or real_free_port())
    try:
        cluster = pgcluster.PostgresCluster.create()
        try:
            assert cluster.port != taken.getsockname()[1]
            assert cluster.query("postgres", "SELECT 1") == [(1,)]
        finally:
            cluster.destroy()
    finally:
        taken.close()
