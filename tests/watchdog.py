"""Servers a test starts die with the test process, however it dies.

A test that starts a server (a PostgreSQL cluster, the homeserver as a child
process, Synapse, nginx, Caddy) stops it when it ends. But a test process that
is killed (SIGKILL from a timeout, mutation testing's CPU limit, a closed
terminal) runs no clean-up code, and its servers would run on with no parent,
holding ports and leaving their folders in the temporary directory.

``watch()`` starts a small watchdog process per server. It blocks reading a
pipe whose only writer is the test process; the kernel closes that pipe when
the test process dies, however it dies. Then the watchdog kills what it was
given (a process, a process group, or a PostgreSQL cluster's postmaster) and
removes the folders it was given. A test that cleans up by itself calls
``Watchdog.release()``, and the watchdog leaves without touching anything.

The watchdog runs in a session of its own, so a signal to the test's process
group (Ctrl-C, or a runner killing the group) does not take it down before it
has done its work.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

# Runs in the watchdog (python -I -c): no imports from the project, nothing to
# go wrong between the test's death and the clean-up.
_WATCHDOG = r"""
import json, os, shutil, signal, sys, time

signal.signal(signal.SIGINT, signal.SIG_IGN)
orders = json.loads(sys.argv[1])
said = sys.stdin.buffer.read()  # until the test process writes "release" or dies
if said == b"release":
    sys.exit(0)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def postmaster(data):
    try:
        with open(os.path.join(data, "postmaster.pid")) as f:
            pid = int(f.readline())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
    except (OSError, ValueError):
        return None
    # The pid file may be stale and its pid reused: only a postgres of this data folder.
    return pid if data.encode() in command and b"postgres" in command else None


victims = []
for data in orders.get("postgres", []):
    pid = postmaster(data)
    if pid is not None:
        os.kill(pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown
        victims.append(pid)
for group in orders.get("groups", []):
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
for pid in orders.get("pids", []):
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
deadline = time.monotonic() + 10
while victims and time.monotonic() < deadline:
    victims = [pid for pid in victims if alive(pid)]
    time.sleep(0.05)
for pid in victims:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
for folder in orders.get("remove", []):
    shutil.rmtree(folder, ignore_errors=True)
"""

# Watchdogs stay referenced until the test process ends: a Popen that is garbage
# collected while its process runs warns, and the pipe must stay open anyway.
_WATCHING: list[subprocess.Popen[bytes]] = []


class Watchdog:
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    def release(self) -> None:
        """The test has cleaned up by itself: the watchdog leaves without doing anything."""
        stdin = self._process.stdin
        if stdin is not None and not stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                stdin.write(b"release")
            with contextlib.suppress(BrokenPipeError):
                stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(10)
        with contextlib.suppress(ValueError):
            _WATCHING.remove(self._process)


def watch(
    *,
    pids: Iterable[int] = (),
    groups: Iterable[int] = (),
    postgres: Iterable[Path] = (),
    remove: Iterable[Path] = (),
) -> Watchdog:
    """A watchdog that, if this process dies first, kills ``pids`` and process ``groups``,
    stops the PostgreSQL clusters whose data folders are ``postgres``, and removes ``remove``."""
    orders = {
        "pids": list(pids),
        "groups": list(groups),
        "postgres": [str(path) for path in postgres],
        "remove": [str(path) for path in remove],
    }
    process = subprocess.Popen(
        [sys.executable, "-I", "-c", _WATCHDOG, json.dumps(orders)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _WATCHING.append(process)
    return Watchdog(process)
