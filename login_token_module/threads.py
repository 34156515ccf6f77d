"""Worker thread pools that start on first use and never outlive the reactor."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
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
