"""The reference homeserver: wiring config, database, modules and HTTP together."""

from __future__ import annotations

import importlib
import io
import ipaddress
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet import address, defer
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from login_token_module.config import ConfigError
from login_token_module.errors import Codes
from login_token_module.host.config import HomeserverConfig, ListenerConfig
from login_token_module.host.database import RATELIMIT_TABLE, open_database
from login_token_module.host.module_api import HostModuleApi, awaited
from login_token_module.host.passwords import PasswordHasher
from login_token_module.host.resources import host_resources
from login_token_module.host.state import ModuleRegistry
from login_token_module.http import render_unrecognized, respond_json, set_route
from login_token_module.safe_text import printable
from login_token_module.stores import RateLimitStore
from login_token_module.stores.memory import MemoryRateLimitStore
from login_token_module.stores.sql import SqlRateLimitStore

# How often the host drops drained rc_login buckets.
RC_LOGIN_SWEEP_SECONDS = 60.0

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("login_token_module.access")


class PathNode(Resource):
    """A segment of the URL tree: 404 ``M_UNRECOGNIZED`` for anything not below it.

    A node that serves a resource knows the path it was registered under, and
    tells the request (the request's own spelling, ``%76ersions`` or ``//``,
    may differ): metrics are labelled with that path, one of a fixed set.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.own: IResource | None = None
        self.route = ""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return _UNRECOGNIZED

    def render(self, request: Request) -> Any:
        if self.own is not None:
            set_route(request, self.route)
            return self.own.render(request)
        return render_unrecognized(request)


class _Unrecognized(Resource):
    isLeaf = True

    def render(self, request: Request) -> Any:
        return render_unrecognized(request)


_UNRECOGNIZED = _Unrecognized()  # type: ignore[no-untyped-call]


def build_tree(resources: dict[str, IResource]) -> PathNode:
    root = PathNode()
    for path, resource in sorted(resources.items()):
        node = root
        for segment in path.strip("/").split("/"):
            child = node.children.get(segment.encode())
            if child is None:
                child = PathNode()
                node.putChild(segment.encode(), child)
            assert isinstance(child, PathNode)
            node = child
        node.own = resource
        node.route = path
    return root


class HostRequest(Request):
    """A request that refuses oversized bodies without holding them in memory.

    On a listener with ``x_forwarded: true`` the client's address is the last
    address in ``X-Forwarded-For``: the one the reverse proxy in front saw
    (addresses before it were sent by the client, who may write anything there).
    Elsewhere the header is ignored.
    """

    max_body_size = 64 * 1024
    x_forwarded = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._body_too_large = False
        self._body_received = 0
        self.started_at = time.monotonic()

    def getClientAddress(self) -> Any:
        if self.x_forwarded:
            forwarded = forwarded_for(self.requestHeaders.getRawHeaders(b"x-forwarded-for"))
            if forwarded is not None:
                peer = super().getClientAddress()  # type: ignore[no-untyped-call]
                return (
                    address.IPv6Address("TCP", forwarded, 0)
                    if ":" in forwarded
                    else address.IPv4Address("TCP", forwarded, getattr(peer, "port", 0))
                )
        return super().getClientAddress()  # type: ignore[no-untyped-call]

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_size:
            self._body_too_large = True
            self.content = io.BytesIO()
            return
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self._body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self.max_body_size:
            self._body_too_large = True
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def process(self) -> None:
        if self._body_too_large:
            respond_json(
                self,
                413,
                {"errcode": Codes.TOO_LARGE, "error": f"Request body is over {self.max_body_size} bytes"},
            )
            return
        super().process()  # type: ignore[no-untyped-call]


def forwarded_for(headers: Sequence[bytes] | None) -> str | None:
    """The address a reverse proxy put last in X-Forwarded-For, or None if there is none usable."""
    if not headers:
        return None
    last = headers[-1].split(b",")[-1].strip().decode("ascii", "replace")
    try:
        return str(ipaddress.ip_address(last))
    except ValueError:
        return None


class HostChannel(HTTPChannel):
    """An HTTP/1.1 connection that must deliver each request whole within ``request_timeout``.

    Twisted's own idle timeout restarts with every byte received, so a client that
    sends one header line a minute, or a body a byte at a time, would hold the
    connection (and a file descriptor) for ever. Here a deadline starts with a
    request's first line and ends when its body is complete; a request still
    arriving at the deadline is dropped. Between requests the idle timeout (the
    site's ``timeout``, the same figure) closes a connection nobody uses.
    """

    request_timeout = 60.0

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._read_deadline: Any = None

    def lineReceived(self, line: bytes) -> None:
        if self._read_deadline is None and not self._handlingRequest:
            self._read_deadline = self.callLater(  # type: ignore[no-untyped-call]
                self.request_timeout, self._request_too_slow
            )
        super().lineReceived(line)  # type: ignore[no-untyped-call]

    def allContentReceived(self) -> None:
        self._cancel_read_deadline()
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_read_deadline()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            if self._read_deadline.active():
                self._read_deadline.cancel()
            self._read_deadline = None

    def _request_too_slow(self) -> None:
        self._read_deadline = None
        logger.info("Dropping a connection whose request did not arrive within %.0f s", self.request_timeout)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class HostSite(Site):
    """A Site whose access log never shows query strings (they can hold access tokens)."""

    protocol = HostChannel  # type: ignore[assignment]

    def log(self, request: Request) -> None:  # type: ignore[override]
        started = getattr(request, "started_at", None)
        took = f" {1000 * (time.monotonic() - started):.1f}ms" if started is not None else ""
        client = request.getClientAddress()
        # Method and path are the client's text: escaped and cut, so a log line is one line.
        access_logger.info(
            "%s %s %s %d%s",
            getattr(client, "host", "-"),
            printable(request.method, 16),
            printable(request.path),
            request.code,
            took,
        )


def load_module_class(dotted: str) -> Any:
    module_name, _, class_name = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(["module"], f"cannot import {module_name}: {error}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(["module"], f"{module_name} has no {class_name}")
    return cls


def reuse_port_socket(address: str, port: int) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT: every worker binds its own on the same
    port and the kernel spreads new connections between them."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


class Homeserver:
    """The reference homeserver.

    ``workers``: how many processes serve this config at once (``serve
    --workers N``); with more than one, ``worker_addresses`` are the (listener,
    address, port) each process binds with SO_REUSEPORT, and nothing that lives
    in one process's memory may hold shared state.
    """

    def __init__(
        self,
        config: HomeserverConfig,
        reactor: Any = None,
        *,
        workers: int = 1,
        worker_addresses: list[tuple[ListenerConfig, str, int]] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.workers = workers
        self.worker_addresses = worker_addresses
        self.registry = ModuleRegistry()
        if workers > 1 and config.database.name == "sqlite3" and config.database.path == ":memory:":
            raise ConfigError(
                ["database", "args", "database"],
                "':memory:' cannot be shared by several worker processes; use a file or PostgreSQL",
            )
        self.db = open_database(config.database, reactor)
        self.hasher = PasswordHasher(
            reactor, config.bcrypt_rounds, config.bcrypt_threads, config.bcrypt_max_queued
        )
        # rc_login buckets: in the database when other processes serve this homeserver
        # too (workers, or PostgreSQL shared by machines), so they count together.
        shared = workers > 1 or config.database.name == "psycopg2"
        self.rc_login: dict[str, RateLimitStore] = {}
        for name in ("address", "account", "failed_attempts"):
            limit = getattr(config.rc_login, name)
            self.rc_login[name] = (
                SqlRateLimitStore(
                    self.db, f"rc_login_{name}", limit.per_second, limit.burst_count, table=RATELIMIT_TABLE
                )
                if shared
                else MemoryRateLimitStore(reactor, limit.per_second, limit.burst_count)
            )
        self._rc_sweep = LoopingCall(self._sweep_rc_login)
        self._rc_sweep.clock = reactor
        self.modules: list[Any] = []
        self.ports: list[IListeningPort] = []
        try:
            self._load_modules()
        except BaseException:
            self._close_after_failed_start()
            raise

    @property
    def public_baseurl(self) -> str:
        """The configured ``public_baseurl``, else the first client listener's address
        (the port it really got, once listening; a wildcard address as loopback)."""
        if self.config.public_baseurl is not None:
            return self.config.public_baseurl
        listener = next(entry for entry in self.config.listeners if entry.type == "http")
        host, port = listener.bind_addresses[0], listener.port
        bound = getattr(self.ports[0].getHost(), "port", None) if self.ports else None
        if isinstance(bound, int):
            port = bound
        if self.worker_addresses:
            port = next((p for (entry, _, p) in self.worker_addresses if entry.type == "http"), port)
        try:
            unspecified = ipaddress.ip_address(host).is_unspecified
        except ValueError:
            unspecified = False
        if unspecified:
            # Listening everywhere: loopback is one address that surely reaches it.
            host = "::1" if ":" in host else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    def _close_after_failed_start(self) -> None:
        """Release what was opened before a module refused to start (threads would keep
        the process alive). The reactor is not running: closes run to completion now."""
        for callback in self.registry.shutdown_callbacks:
            try:
                result = callback()
                if result is not None:
                    defer.ensureDeferred(awaited(result)).addErrback(lambda failure: None)
            except Exception:
                logger.debug("A module's shutdown callback failed after a failed start")
        self.db.close()
        self.hasher.close()

    def _load_modules(self) -> None:
        for index, entry in enumerate(self.config.modules):
            try:
                cls = load_module_class(entry.module)
                parse = getattr(cls, "parse_config", None)
                parsed = parse(dict(entry.config)) if parse is not None else dict(entry.config)
                # A module may find a config problem only when it starts (a missing folder).
                self.modules.append(cls(parsed, HostModuleApi(self, entry.module)))
            except ConfigError as error:
                if error.path[:1] == ["module"]:
                    raise error.within("modules", index) from None
                raise error.within("modules", index, "config") from None

    async def _sweep_rc_login(self) -> None:
        now = float(self.reactor.seconds())
        for limiter in self.rc_login.values():
            try:
                await limiter.sweep(now)
            except Exception as error:
                logger.warning("Could not sweep the rc_login buckets: %s", error)

    def build_metrics_site(self) -> Site:
        from login_token_module.host.metrics import metrics_site

        return metrics_site()

    def build_site(self, x_forwarded: bool = False) -> HostSite:
        resources: dict[str, IResource] = dict(host_resources(self))
        for path, resource in self.registry.resources.items():
            if path in resources:
                raise ConfigError(["modules"], f"a module wants {path}, which the host serves itself")
            resources[path] = resource
        # Only JSON is spoken here: skip Twisted's form-body parsing, which costs
        # a Content-Type parse per POST and would consume a form body's bytes.
        timeout = self.config.request_timeout_ms / 1000
        site = HostSite(  # type: ignore[no-untyped-call]
            build_tree(resources), parsePOSTFormSubmission=False, timeout=timeout, reactor=self.reactor
        )
        max_body_size = self.config.max_request_body_size

        class BoundHostChannel(HostChannel):
            pass

        BoundHostChannel.request_timeout = timeout
        site.protocol = BoundHostChannel

        class BoundHostRequest(HostRequest):
            pass

        BoundHostRequest.max_body_size = max_body_size
        BoundHostRequest.x_forwarded = x_forwarded
        site.requestFactory = BoundHostRequest
        return site

    def start(self) -> list[IListeningPort]:
        """Listen on every configured address and start background tasks.

        Returns the ports, client (http) listeners first, in config order."""
        sites: dict[tuple[str, bool], Site] = {}

        def site_for(listener: ListenerConfig) -> Site:
            key = (listener.type, listener.x_forwarded)
            if key not in sites:
                sites[key] = (
                    self.build_metrics_site()
                    if listener.type == "metrics"
                    else self.build_site(listener.x_forwarded)
                )
            return sites[key]

        bindings = self.worker_addresses
        if bindings is None:
            bindings = [
                (listener, address, listener.port)
                for listener in self.config.listeners
                for address in listener.bind_addresses
            ]
        bindings = sorted(bindings, key=lambda binding: binding[0].type != "http")
        for listener, bind_address, port_number in bindings:
            site = site_for(listener)
            if self.worker_addresses is not None:
                sock = reuse_port_socket(bind_address, port_number)
                try:
                    sock.listen(128)
                    sock.setblocking(False)
                    port = self.reactor.adoptStreamPort(sock.fileno(), sock.family, site)
                finally:
                    sock.close()  # the reactor holds its own copy of the descriptor
            else:
                port = self.reactor.listenTCP(port_number, site, interface=bind_address)
            self.ports.append(port)
            host = port.getHost()
            what = "Serving metrics" if listener.type == "metrics" else "Listening"
            logger.info("%s on http://%s:%d", what, host.host, host.port)
        for loop, msec in self.registry.loops:
            loop.start(msec / 1000, now=False)
        self._rc_sweep.start(RC_LOGIN_SWEEP_SECONDS, now=False)
        return self.ports

    async def stop(self) -> None:
        for port in self.ports:
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        self.ports.clear()
        for loop, _ in self.registry.loops:
            if loop.running:
                loop.stop()
        if self._rc_sweep.running:
            self._rc_sweep.stop()
        for callback in self.registry.shutdown_callbacks:
            try:
                result = callback()
                if result is not None:
                    await result
            except Exception:
                logger.exception("A module's shutdown callback failed")
        self.db.close()
        self.hasher.close()
