"""The host's ``type: metrics`` listener: Prometheus text on any path (``/_synapse/metrics`` too).

One process serves prometheus_client's global registry (the module's metrics,
and the process and Python collectors). Under ``serve --workers N`` the workers
write their values to files in one folder (prometheus_client's multiprocess
mode, switched on by the parent before it forks, see :func:`enable_multiprocess`)
and whichever worker takes the scrape answers with all of them added up: one
target per homeserver, as for a single process. Counters of a worker that died
and was restarted are kept, so totals never go backwards.

Scrapes are GETs: a request that announces a body (any ``Content-Length`` above
0, or chunked) is answered 413 as soon as its headers are in, and its body is
never stored (see :class:`MetricsRequest`).
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from typing import Any

from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def registry() -> Any:
    """What a scrape reads: every worker's files in multiprocess mode, else the global registry."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    if os.environ.get(MULTIPROC_ENV):
        combined = CollectorRegistry()
        MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
        return combined
    return REGISTRY


_REFUSAL_TEXT = b"This listener serves metrics to GET and takes no request body.\n"
# Written straight to the connection: the request line has not been handed to the
# Request yet when the headers announce a body, so Twisted's response methods cannot be used.
REFUSAL = (
    b"HTTP/1.1 413 Content Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n"
    b"\r\n" % len(_REFUSAL_TEXT)
) + _REFUSAL_TEXT
# How long a refused client may go on sending (read and thrown away) before the
# connection is cut. Closing at once with its bytes unread would make the kernel
# reset the connection, which can destroy the answer before the client reads it.
LINGER_SECONDS = 2.0


class MetricsRequest(Request):
    """A request of the metrics listener: one that would bring a body is refused unread.

    Twisted would store a body of any size (a temporary file above 100 kB) before
    the resource could say 405. Here the answer goes out as soon as the headers
    announce a body, before any of it is read; the connection is half-closed,
    whatever the client still sends is thrown away as it arrives, and the
    connection is cut when the client closes or after :data:`LINGER_SECONDS`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.refused = False
        self._linger: Any = None

    def gotLength(self, length: int | None) -> None:
        if length == 0:  # no body: a scrape
            super().gotLength(length)  # type: ignore[no-untyped-call]
            return
        self.refused = True
        self.content = io.BytesIO()  # stays empty
        # The final answer is the 413: no "100 Continue" invitation to send the body.
        self.requestHeaders.removeHeader(b"expect")
        transport: Any = self.channel.transport  # a TCP transport: it half-closes and aborts
        transport.write(REFUSAL)
        transport.loseWriteConnection()
        self._linger = self.channel.callLater(LINGER_SECONDS, transport.abortConnection)

    def handleContentChunk(self, data: bytes) -> None:
        if not self.refused:
            super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self.refused:  # a refused request was answered when its headers came in
            super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


def metrics_site() -> Site:
    """The ``type: metrics`` listener's site."""
    site = Site(MetricsResource())
    site.requestFactory = MetricsRequest
    return site


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry()

    def render_GET(self, request: Request) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)


def enable_multiprocess() -> str:
    """Switch this process (and the workers it forks) to multiprocess metrics; returns the
    folder, which the caller removes at the end (:func:`remove_folder`)."""
    folder = tempfile.mkdtemp(prefix="login-token-module-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        # Imported before the switch: choose the value class again (new metrics use it).
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
    return folder


def worker_died(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay in the totals)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def remove_folder(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if os.environ.get(MULTIPROC_ENV) == folder:
        del os.environ[MULTIPROC_ENV]
