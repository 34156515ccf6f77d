"""What the host process holds, seen from outside it: what its metrics listener
keeps of a request body (nothing), the modes of the files it creates (0600),
and its open-files limit. Real servers started as an operator starts them.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    ChildServer,
    Launcher,
    call,
    homeserver_yaml,
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
    deadline = time.monotonic() + 10
    # The client listener is logged (and start_child returns) first.
    while not (match := re.search(r"Serving metrics on http://127.0.0.1:(\d+)", server.log())):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    yield server, int(match.group(1))


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
