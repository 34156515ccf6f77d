"""Prometheus metrics, in the process's global registry (Synapse's too).

Inside Synapse the module's metrics land in ``prometheus_client.REGISTRY``,
which Synapse's ``type: metrics`` listener serves beside its own. The
reference host serves the same registry from its own metrics listener, or,
under ``serve --workers N``, every worker's values added up (prometheus_client's
multiprocess mode, see ``host/metrics.py``).

The metric objects are made on first use, not at import, because multiprocess
mode is chosen by an environment variable that must be set before the first
value exists (the worker parent sets it before it forks).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

PREFIX = "login_token_module"
# Why a token presented at login was refused.
REFUSAL_REASONS = ("malformed", "unknown", "expired", "reused", "revoked")
# Latency buckets for database calls and requests, in seconds (1 ms to 10 s).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Metrics:
    tokens_issued: Any
    tokens_spent: Any
    tokens_refused: Any
    tokens_revoked: Any
    uia_prompts: Any
    uia_failures: Any
    ratelimited: Any
    pairings: Any
    outstanding_tokens: Any
    store_duration: Any
    request_duration: Any


@functools.cache
def metrics() -> Metrics:
    """The module's metrics, registered in the global registry once per process."""
    from prometheus_client import Counter, Gauge, Histogram

    return Metrics(
        tokens_issued=Counter(f"{PREFIX}_tokens_issued", "Login tokens handed out by get_token"),
        tokens_spent=Counter(
            f"{PREFIX}_tokens_spent", "Login tokens spent by a login (each signs in one new device)"
        ),
        tokens_refused=Counter(
            f"{PREFIX}_tokens_refused",
            "Logins refused for their token: malformed, unknown, expired, reused or revoked",
            ["reason"],
        ),
        tokens_revoked=Counter(
            f"{PREFIX}_tokens_revoked",
            "Outstanding login tokens revoked (reason: logout of the minting device)",
            ["reason"],
        ),
        uia_prompts=Counter(
            f"{PREFIX}_uia_prompts", "User-Interactive Auth challenges (401 with a session) sent"
        ),
        uia_failures=Counter(
            f"{PREFIX}_uia_failures",
            "User-Interactive Auth attempts refused (password: wrong password; session: unknown,"
            " expired or spent session; user: confirms another account)",
            ["reason"],
        ),
        ratelimited=Counter(
            f"{PREFIX}_ratelimited", "Requests refused with 429 M_LIMIT_EXCEEDED, by limiter", ["limiter"]
        ),
        pairings=Counter(
            f"{PREFIX}_pairings",
            "Pairings (sign in a device by code) by event: started, approved, denied, delivered, expired",
            ["event"],
        ),
        outstanding_tokens=Gauge(
            f"{PREFIX}_outstanding_tokens",
            "Login tokens issued, not yet spent, revoked or expired (counted at each sweep)",
            multiprocess_mode="mostrecent",
        ),
        store_duration=Histogram(
            f"{PREFIX}_store_duration_seconds",
            "Time taken by the module's state operations (tokens, UIA sessions, rate limits)",
            ["operation"],
            buckets=BUCKETS,
        ),
        request_duration=Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from routing a request to writing its answer, per endpoint",
            ["endpoint", "method", "code"],
            buckets=BUCKETS,
        ),
    )


@contextmanager
def _timer(operation: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics().store_duration.labels(operation).observe(time.perf_counter() - started)


async def timed(operation: str, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``, recording how long it took as ``operation`` in the store histogram."""
    with _timer(operation):
        return await awaitable
