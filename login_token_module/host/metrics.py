"""The host's ``type: metrics`` listener: Prometheus text on any path (``/_synapse/metrics`` too).

One process serves prometheus_client's global registry (the module's metrics,
and the process and Python collectors). Under ``serve --workers N`` the workers
write their values to files in one folder (prometheus_client's multiprocess
mode, switched on by the parent before it forks, see :func:`enable_multiprocess`)
and whichever worker takes the scrape answers with all of them added up: one
target per homeserver, as for a single process. Counters of a worker that died
and was restarted are kept, so totals never go backwards.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

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
