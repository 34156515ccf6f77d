"""What the host process holds, seen from outside it: what its metrics listener
keeps of a request body (nothing), the modes of the files it creates (0600),
and its open-files limit. Real servers started as an operator starts them.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from login_token_module.stores.engines.sqlite import SqliteDatabase
from login_token_module.stores.sql import STATE_SCHEMA
from tests.helpers import (
    LISTENING_RE,
    ROOT,
    ChildServer,
    Launcher,
    access_token,
    call,
    homeserver_yaml,
    mint_login_token,
    register,
    start_child,
    token_login,
    write_config,
)

MB = 1024 * 1024

# -- the metrics listener refuses request bodies unread --------------------------------


@pytest.fixture
def metrics_server(tmp_path: Path, launch: Launcher) -> Iterator[tuple[ChildServer, int]]:
    """A server with a metrics listener (no workers: one process to look into); and that port."""
    config = homeserver_yaml(tmp_path)
    config["listeners"].append({"type": "metrics", "port": 0, "bind_addresses": ["127.0.0.1"]})
    server = launch(write_config(tmp_path, config))
    yield server, server.metrics_port()


def read_to_end(sock: socket.socket, timeout: float = 5) -> bytes:
    """Everything the server sends until it closes; fails if it does not close in time."""
    sock.settimeout(timeout)
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


def refusal(port: int, head: bytes) -> bytes:
    """What the listener answers to ``head`` (request line and headers) with no body sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        try:
            return read_to_end(sock)
        except TimeoutError:
            pytest.fail(f"no answer (or the connection left open) without the body: {head!r}")


def assert_413(answer: bytes) -> None:
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413 "), answer[:200]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    assert b"100 continue" not in answer.lower()
    assert body == b"This listener serves metrics to GET and takes no request body.\n"


def large_files(pid: int, at_least: int) -> list[tuple[str, int]]:
    """The regular files process ``pid`` has open of ``at_least`` bytes (deleted temp files too)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            info = os.stat(f"/proc/{pid}/fd/{fd}")
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_size >= at_least:
            found.append((target, info.st_size))
    return found


def resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


def test_the_metrics_listener_answers_a_body_before_it_is_sent(
    metrics_server: tuple[ChildServer, int],
) -> None:
    _, port = metrics_server
    # A chunked POST (the listener serves GET): answered from its headers alone, and closed.
    chunked = b"POST /_synapse/metrics HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert_413(refusal(port, chunked))
    # A client that asks before sending 200 MB is told no, not invited to go on.
    assert_413(
        refusal(
            port,
            b"PUT /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 209715200\r\nExpect: 100-continue\r\n\r\n",
        )
    )
    # A GET with a body is refused the same way; any method, any path.
    assert_413(refusal(port, b"GET /_synapse/metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"))
    # Scrapes are as before: GET and HEAD, and a POST without a body gets the usual 405.
    scraped = call(f"http://127.0.0.1:{port}", "GET", "/_synapse/metrics")
    assert scraped.code == 200 and isinstance(scraped.body, bytes) and b"process_" in scraped.body
    head = call(f"http://127.0.0.1:{port}", "HEAD", "/_synapse/metrics")
    assert head.code == 200 and not head.body
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert read_to_end(sock).startswith(b"HTTP/1.1 405 ")


def test_a_streamed_body_is_thrown_away_as_it_comes_not_stored(
    metrics_server: tuple[ChildServer, int],
) -> None:
    server, port = metrics_server
    pid = server.process.pid
    rss_before = resident_bytes(pid)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sent = [0]

    def stream(total: int = 64 * MB) -> None:
        """A chunked body, 1 MB a chunk, never finished (no last chunk)."""
        chunk = b"%x\r\n%s\r\n" % (MB, b"x" * MB)
        try:
            sock.sendall(b"POST /_synapse/metrics HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            while sent[0] < total:
                sock.sendall(chunk)
                sent[0] += MB
        except OSError:
            pass  # the server cut the connection: it has answered and stopped listening

    sender = threading.Thread(target=stream)
    try:
        sender.start()
        sender.join(30)
        assert not sender.is_alive(), f"the server stopped reading after {sent[0] // MB} MB"
        # Nothing of it is kept: no temporary file, no memory.
        assert large_files(pid, MB) == [], f"{sent[0] // MB} MB sent"
        assert resident_bytes(pid) - rss_before < 16 * MB
        assert_413(read_to_end(sock))
    finally:
        sock.close()
    # And the listener still serves.
    assert call(f"http://127.0.0.1:{port}", "GET", "/_synapse/metrics").code == 200


def test_a_client_that_never_closes_is_cut_off_after_its_answer(
    metrics_server: tuple[ChildServer, int],
) -> None:
    _, port = metrics_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
        started = time.monotonic()
        sock.settimeout(10)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413 ")
        # The client keeps the connection open and sends nothing more: the server ends it.
        read_to_end(sock, timeout=10)
        assert time.monotonic() - started < 5


# -- files that hold secrets are 0600 from creation ------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask (files 0644 unless the program says otherwise), for this process and its children."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def demo_project(folder: Path) -> Path:
    """A copy of scripts/serve and sample_config.yaml (free ports, fast bcrypt) in ``folder``.

    Only the virtualenv step is left out: ``.venv/bin`` holds a ``login-token-module``
    that runs this checkout's, and a ``python`` that runs this Python after noting the
    mode ``.demo-password`` has at that moment (the script writes the password with it).
    """
    command = Path(sys.prefix) / "bin" / "login-token-module"
    if not command.exists():
        pytest.skip("the package is not installed as a console script here")
    (folder / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "serve", folder / "scripts" / "serve")
    (folder / "scripts" / "_venv.sh").write_text("ensure_venv() { :; }\n")
    sample = yaml.safe_load((ROOT / "sample_config.yaml").read_text())
    for listener in sample["listeners"]:
        listener["port"] = 0
    sample["bcrypt_rounds"] = 4
    write_config(folder, sample, "sample_config.yaml")
    venv_bin = folder / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(
        "#!/bin/sh\n"
        "[ -e .demo-password ] && stat -c %a .demo-password >> .modes-seen\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    (venv_bin / "login-token-module").write_text(f'#!/bin/sh\nexec "{command}" "$@"\n')
    for script in venv_bin.iterdir():
        script.chmod(0o755)
    return folder


def test_scripts_serve_makes_every_secret_file_0600_from_its_creation(
    tmp_path: Path, umask_022: None
) -> None:
    project = demo_project(tmp_path)
    log_path = project / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            ["bash", str(project / "scripts" / "serve")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not (match := LISTENING_RE.search(log_path.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        base = f"http://127.0.0.1:{match.group(1)}"
        password = (project / ".demo-password").read_text()
        # Real use: a password login, a token minted (UIA) and spent, so both databases write.
        login_token = mint_login_token(base, access_token(base, password=password), password=password)
        assert token_login(base, login_token)[0] == 200
        # While the password was written the file was already 0600, not only once it was done.
        assert (project / ".modes-seen").read_text().split() == ["600"]
        files = [".demo-password"] + [
            name + suffix for name in ("homeserver.db", "login_tokens.db") for suffix in ("", "-wal", "-shm")
        ]
        assert {name: oct(mode(project / name)) for name in files} == dict.fromkeys(files, "0o600")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def test_a_rollback_journal_gets_the_database_files_mode(tmp_path: Path, umask_022: None) -> None:
    """SQLite gives -journal (as -wal and -shm) the database file's mode: the store's files in
    rollback-journal mode (which the server does not use) are 0600 too."""
    path = tmp_path / "store.db"
    conn = SqliteDatabase(None, str(path), schema=STATE_SCHEMA).connect()
    try:
        # PERSIST keeps the journal file after the transaction, where it can be looked at.
        conn.execute("PRAGMA journal_mode = PERSIST")
        conn.execute("CREATE TABLE probe (x INTEGER)")
        conn.transaction(lambda txn: txn.execute("INSERT INTO probe VALUES (1)"))
        assert oct(mode(tmp_path / "store.db-journal")) == "0o600"
        assert oct(mode(path)) == "0o600"
    finally:
        conn.close()


def test_register_user_and_a_server_with_workers_make_0600_databases(
    tmp_path: Path, umask_022: None, launch: Launcher
) -> None:
    config = write_config(
        tmp_path, homeserver_yaml(tmp_path, {"store": {"type": "sqlite", "path": "tokens.db"}})
    )
    register(config)  # register-user creates homeserver.db
    assert oct(mode(tmp_path / "homeserver.db")) == "0o600"
    server = launch(config, "server.log", "--workers", "2")
    base = server.base_url
    assert token_login(base, mint_login_token(base, access_token(base)))[0] == 200
    for name in ("homeserver.db", "tokens.db"):
        for suffix in ("", "-wal", "-shm"):
            assert oct(mode(tmp_path / (name + suffix))) == "0o600", name + suffix


# -- the open-files limit ---------------------------------------------------------------

START_SOFT, START_HARD = 256, 4096


def low_open_files_limit() -> None:
    """In the child before the server starts: the limits a careful shell might give."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (START_SOFT, START_HARD))


def open_files_limits(pid: int) -> tuple[int, int]:
    """The soft and hard open-files limits of process ``pid``, as the kernel reports them."""
    match = re.search(
        r"^Max open files\s+(\d+)\s+(\d+)", Path(f"/proc/{pid}/limits").read_text(), re.MULTILINE
    )
    assert match, pid
    return int(match.group(1)), int(match.group(2))


def limit_line(server: ChildServer) -> str:
    """The one "Open-files limit" line, logged once the server serves (after start_child returns)."""
    deadline = time.monotonic() + 10
    while not (lines := [line for line in server.log().splitlines() if "Open-files limit:" in line]):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert len(lines) == 1, server.log()
    return lines[0]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                # The parent's pid is the 4th field, after the command name in parentheses.
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
                if int(fields[1]) == pid:
                    found.append(int(entry))
    return found


@pytest.fixture
def limited_server(tmp_path: Path) -> Iterator[Callable[..., ChildServer]]:
    """Starts the server with the open-files limits 256 soft / 4096 hard and the given config keys."""
    started: list[ChildServer] = []

    def start(*extra_args: str, **keys: Any) -> ChildServer:
        config = write_config(tmp_path, homeserver_yaml(tmp_path, **keys))
        server = start_child(config, extra_args=extra_args, preexec_fn=low_open_files_limit)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill_all()


def test_the_server_raises_its_open_files_limit_to_the_hard_limit(
    limited_server: Callable[..., ChildServer],
) -> None:
    server = limited_server()
    assert open_files_limits(server.process.pid) == (START_HARD, START_HARD)
    assert limit_line(server).endswith(
        f" INFO login_token_module.host.limits: Open-files limit: {START_HARD}"
    )


@pytest.mark.parametrize(("wanted", "given"), [(1000, 1000), (10**9, START_HARD), (128, 128)])
def test_soft_file_limit_sets_the_figure_capped_to_the_hard_limit(
    limited_server: Callable[..., ChildServer], wanted: int, given: int
) -> None:
    server = limited_server(soft_file_limit=wanted)
    assert open_files_limits(server.process.pid) == (given, START_HARD)
    assert limit_line(server).endswith(f"Open-files limit: {given}")


def test_every_worker_has_the_raised_limit(
    limited_server: Callable[..., ChildServer],
) -> None:
    server = limited_server(
        "--workers", "2", module_config={"store": {"type": "sqlite", "path": "tokens.db"}}
    )
    workers = children_of(server.process.pid)
    assert len(workers) == 2, server.log()
    for pid in [server.process.pid, *workers]:
        assert open_files_limits(pid) == (START_HARD, START_HARD)
    # Set once, in the parent, before it forks; said once, when all serve.
    assert "[main] INFO" in limit_line(server)
    time.sleep(0.2)
    assert server.log().count("Open-files limit:") == 1
