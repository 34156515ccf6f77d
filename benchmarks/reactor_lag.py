"""Measuring how long something holds the Twisted reactor.

:class:`ReactorLagProbe` re-schedules itself with ``callLater(0)``, so it runs
once per reactor iteration. The gap between two of its runs is how long the
reactor was busy with something else (a sweep slice, say) plus one iteration's
own overhead. Two clocks are kept: wall time (what other requests would feel,
including the OS preempting the process on a noisy machine) and the reactor
thread's own CPU time (``time.thread_time``: the work the reactor thread did,
which no other process can inflate).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater, react


class ReactorLagProbe:
    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._call: Any = None
        self._last_wall = 0.0
        self._last_cpu = 0.0
        self.ticks = 0
        self.max_gap_wall_ms = 0.0
        self.max_gap_cpu_ms = 0.0
        self.gaps_over_10ms = 0

    def start(self) -> None:
        self._last_wall = time.perf_counter()
        self._last_cpu = time.thread_time()
        self._call = self._reactor.callLater(0, self._tick)

    def _tick(self) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        gap_wall = (wall - self._last_wall) * 1000
        gap_cpu = (cpu - self._last_cpu) * 1000
        self.ticks += 1
        self.max_gap_wall_ms = max(self.max_gap_wall_ms, gap_wall)
        self.max_gap_cpu_ms = max(self.max_gap_cpu_ms, gap_cpu)
        if gap_wall > 10:
            self.gaps_over_10ms += 1
        self._last_wall, self._last_cpu = wall, cpu
        self._call = self._reactor.callLater(0, self._tick)

    def stop(self) -> dict[str, Any]:
        if self._call is not None and self._call.active():
            self._call.cancel()
        # The stretch since the last tick counts too: work that finished without
        # ever yielding held the reactor for all of it.
        self._tick()
        self._call.cancel()
        return {
            "ticks": self.ticks,
            "max_gap_wall_ms": self.max_gap_wall_ms,
            "max_gap_cpu_ms": self.max_gap_cpu_ms,
            "gaps_over_10ms": self.gaps_over_10ms,
        }


class GcPauses:
    """Records how long each cyclic garbage collection takes (it runs on the reactor thread)."""

    def __init__(self) -> None:
        self._started: float | None = None
        self.longest_ms = {0: 0.0, 1: 0.0, 2: 0.0}
        self.counts = {0: 0, 1: 0, 2: 0}

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            generation = int(info["generation"])
            took = (time.perf_counter() - self._started) * 1000
            self.longest_ms[generation] = max(self.longest_ms[generation], took)
            self.counts[generation] += 1
            self._started = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        gc.callbacks.remove(self._callback)

    def report(self) -> dict[str, Any]:
        return {
            "longest_ms": {f"gen{g}": v for g, v in self.longest_ms.items()},
            "counts": {f"gen{g}": v for g, v in self.counts.items()},
        }


async def probe_idle(reactor: Any, seconds: float) -> dict[str, Any]:
    """The probe's own noise floor: the reactor doing nothing else."""
    probe = ReactorLagProbe(reactor)
    probe.start()
    await deferLater(reactor, seconds, lambda: None)
    return probe.stop()


async def cooperate(reactor: Any, slices: Iterator[None]) -> None:
    """Drive a sliced sweep the way LoginTokenModule.sweep does: yield to the reactor between slices."""
    for _ in slices:
        await deferLater(reactor, 0, lambda: None)


async def measure_hold(reactor: Any, work: Callable[[], Awaitable[Any]]) -> tuple[Any, dict[str, Any]]:
    """Run ``work`` with the probe going; its result and the longest reactor holds."""
    probe = ReactorLagProbe(reactor)
    probe.start()
    started = time.perf_counter()
    result = await work()
    took = time.perf_counter() - started
    report = probe.stop()
    report["seconds"] = took
    return result, report


def run_reactor(main: Callable[[Any], Awaitable[None]]) -> None:
    """Run ``main(reactor)`` on the global reactor, then stop (never returns normally)."""

    def start(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(_wrap(main, reactor))

    react(start)


async def _wrap(main: Callable[[Any], Awaitable[None]], reactor: Any) -> None:
    await main(reactor)
