"""``serve --workers N``: N processes answering on the same port.

The parent reserves each listening address (a socket bound with SO_REUSEPORT
but never listening, so it takes no connections and keeps a port chosen as 0
for the children), then forks the workers. Each worker imports the reactor
only after the fork, builds its own Homeserver (its own database connections
and threads) and binds its own SO_REUSEPORT socket on the same port: the
kernel spreads new connections between them, so every core does work.

The first worker starts alone: if the config cannot be served (a module
refuses state kept in one process's memory, the database is unreachable) it
prints the one-line error and the parent exits with it, before any other
worker starts. The rest start once the first is ready (schema migrations ran
once, in the first). A worker that dies later is started again; SIGTERM or
SIGINT to the parent stops every worker cleanly (Ctrl-C in a terminal reaches
them all at once, which is just as good).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from login_token_module.host.config import HomeserverConfig, ListenerConfig

logger = logging.getLogger(__name__)

READY_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
# A worker that keeps dying this often is not restarted again: everything stops.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


@dataclass
class Worker:
    index: int
    pid: int
    started: float


class WorkerGroup:
    def __init__(
        self,
        config: HomeserverConfig,
        config_path: str,
        count: int,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.count = count
        # Called in the parent once every worker serves.
        self.on_ready = on_ready
        self.placeholders: list[socket.socket] = []
        self.addresses: list[tuple[ListenerConfig, str, int]] = []
        # Metrics from every worker, added up by whichever serves a scrape.
        self.metrics_folder: str | None = None
        self.workers: dict[int, Worker] = {}
        self.stopping = False
        self.restarts: list[float] = []

    # -- the parent ------------------------------------------------------------------

    def reserve_ports(self) -> None:
        from login_token_module.host.server import reuse_port_socket

        for listener in self.config.listeners:
            for address in listener.bind_addresses:
                sock = reuse_port_socket(address, listener.port)
                self.placeholders.append(sock)
                self.addresses.append((listener, address, int(sock.getsockname()[1])))

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self.reserve_ports()
        except OSError as error:
            from login_token_module.host.process import CliError

            raise CliError(f"cannot start: {error}") from None
        if any(listener.type == "metrics" for listener in self.config.listeners):
            from login_token_module.host.metrics import enable_multiprocess

            self.metrics_folder = enable_multiprocess()
        try:
            # The first alone: a config it cannot serve stops everything with its one line.
            if not self._start(1):
                return self._stop_all(failed=not self.stopping)
            for index in range(2, self.count + 1):
                if self.stopping or not self._start(index):
                    return self._stop_all(failed=not self.stopping)
            logger.info(
                "%d workers serving %s",
                self.count,
                ", ".join(
                    f"http://{address}:{port}"
                    for listener, address, port in self.addresses
                    if listener.type == "http"
                ),
            )
            for listener, address, port in self.addresses:
                if listener.type == "metrics":
                    logger.info("Metrics of all %d workers on http://%s:%d", self.count, address, port)
            if self.on_ready is not None:
                self.on_ready()
            return self._watch()
        finally:
            for sock in self.placeholders:
                sock.close()
            if self.metrics_folder is not None:
                from login_token_module.host.metrics import remove_folder

                remove_folder(self.metrics_folder)

    def _start(self, index: int) -> bool:
        """Fork worker ``index`` and wait until it listens; False if it died first."""
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            os.close(ready_read)
            self._worker_main(index, ready_write)
        os.close(ready_write)
        self.workers[index] = Worker(index, pid, time.monotonic())
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline:
                if self.stopping:
                    return False  # still ours to stop, with the others
                readable, _, _ = select.select([ready_read], [], [], 0.2)
                if readable:
                    if os.read(ready_read, 1) == b"R":
                        return True
                    break  # closed without a word: the worker died
            self._reap(index)
            return False
        finally:
            os.close(ready_read)

    def _reap(self, index: int) -> None:
        worker = self.workers.pop(index, None)
        if worker is None:
            return
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(worker.pid, os.WNOHANG)
            if done == 0:
                os.kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)

    def _watch(self) -> int:
        """Until told to stop: start again any worker that died."""
        while not self.stopping:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid == 0:
                time.sleep(0.1)
                continue
            index = next((i for i, w in self.workers.items() if w.pid == pid), None)
            if index is None:
                continue
            del self.workers[index]
            if self.metrics_folder is not None:
                from login_token_module.host.metrics import worker_died

                worker_died(pid)
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
            logger.warning("Worker %d (pid %d) ended (%s); starting it again", index, pid, _status(status))
            if len(self.restarts) > MAX_RESTARTS:
                logger.error(
                    "Workers keep ending (%d restarts in %.0fs): stopping", MAX_RESTARTS, RESTART_WINDOW
                )
                return self._stop_all(failed=True)
            if not self._start(index) and not self.stopping:
                logger.error("Worker %d could not start again: stopping", index)
                return self._stop_all(failed=True)
        return self._stop_all(failed=False)

    def _stop_all(self, *, failed: bool) -> int:
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        clean = True
        for worker in list(self.workers.values()):
            status = _wait(worker.pid, deadline)
            if status is None:
                logger.error("Worker %d (pid %d) did not stop in time: killed", worker.index, worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
                clean = False
            elif not _stopped_cleanly(status):
                clean = False
        self.workers.clear()
        if not failed:
            logger.info("All workers stopped")
        return 1 if failed or not clean else 0

    # -- a worker (after fork) -------------------------------------------------------

    def _worker_main(self, index: int, ready_write: int) -> None:
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            for sock in self.placeholders:
                sock.close()
            from login_token_module.host.process import CliError, name_log_lines, print_error, run_homeserver

            name_log_lines(f"worker {index}")
            from login_token_module import audit

            audit.PROCESS_NAME = f"worker {index}"

            def ready() -> None:
                os.write(ready_write, b"R")
                os.close(ready_write)

            try:
                code = run_homeserver(
                    self.config,
                    self.config_path,
                    workers=self.count,
                    worker_addresses=self.addresses,
                    on_ready=ready,
                )
            except CliError as error:
                print_error(error)
                code = 1
        except BaseException:
            logger.exception("Worker %d failed", index)
            code = 1
        finally:
            logging.shutdown()
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def _wait(pid: int, deadline: float) -> int | None:
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if done:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _stopped_cleanly(status: int) -> bool:
    """Exit code 0, or ended by our SIGTERM before it had set up its own handling."""
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status) in (signal.SIGTERM, signal.SIGINT)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


def serve_workers(
    config: HomeserverConfig, config_path: str, count: int, on_ready: Callable[[], None] | None = None
) -> int:
    if "twisted.internet.reactor" in sys.modules:
        # A reactor made before fork would be shared by every worker (one epoll).
        raise RuntimeError("the reactor must not be imported before the workers fork")
    from login_token_module.host.process import name_log_lines

    name_log_lines("main")
    return WorkerGroup(config, config_path, count, on_ready).run()
