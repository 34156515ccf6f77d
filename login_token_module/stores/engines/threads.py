"""Worker thread pools that start on first use and never outlive the reactor."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class WorkerPool:
    """A Twisted ThreadPool for one kind of blocking work (a database, bcrypt).

    Its threads are not daemons, so a pool left running would keep the process
    alive after the reactor stops; like the reactor's own pool, it is therefore
    stopped at reactor shutdown if nobody closed it first.
    """

    def __init__(self, reactor: Any, name: str, *, minthreads: int = 0, maxthreads: int = 1) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=minthreads, maxthreads=maxthreads, name=name)
        self._shutdown_trigger: Any = None

    def run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """``func(*args, **kwargs)`` in a pool thread; its result as a Deferred."""
        if not self._pool.started:
            self._pool.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self.close)
        return deferToThreadPool(self._reactor, self._pool, func, *args, **kwargs)

    def close(self) -> None:
        """Finish queued work and stop the threads (blocks until they are done)."""
        if self._pool.started:
            self._pool.stop()
        if self._shutdown_trigger is not None:
            trigger, self._shutdown_trigger = self._shutdown_trigger, None
            # Already fired if shutdown itself is calling us.
            with contextlib.suppress(ValueError, KeyError):
                self._reactor.removeSystemEventTrigger(trigger)


class BatchingWorker:
    """One worker thread that hands results back to the reactor in batches.

    Under load, jobs queue up while the thread works; it takes every waiting
    job at once, runs them in order, and delivers all their results with a
    single wake-up of the reactor, instead of one thread hand-off and one
    wake-up per job. Order is preserved, which a database connection needs.
    """

    def __init__(self, reactor: Any, name: str) -> None:
        self._reactor = reactor
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._shutdown_trigger: Any = None

    def run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        result: Deferred[T] = Deferred()
        self._jobs.put((func, args, kwargs, result))
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name)
            self._thread.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self.close)
        return result

    def _work(self) -> None:
        while True:
            batch = [self._jobs.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._jobs.get_nowait())
            done: list[tuple[Deferred[Any], bool, Any]] = []
            stop = False
            for job in batch:
                if job is None:
                    stop = True
                    continue
                func, args, kwargs, deferred = job
                try:
                    done.append((deferred, True, func(*args, **kwargs)))
                except BaseException:
                    done.append((deferred, False, Failure()))
            if done:
                self._reactor.callFromThread(_deliver, done)
            if stop:
                return

    def close(self) -> None:
        """Finish queued work and stop the thread (blocks until it is done)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        if self._shutdown_trigger is not None:
            trigger, self._shutdown_trigger = self._shutdown_trigger, None
            with contextlib.suppress(ValueError, KeyError):
                self._reactor.removeSystemEventTrigger(trigger)


_Job = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], "Deferred[Any]"]


def _deliver(done: list[tuple[Deferred[Any], bool, Any]]) -> None:
    for deferred, ok, value in done:
        if ok:
            deferred.callback(value)
        else:
            deferred.errback(value)
