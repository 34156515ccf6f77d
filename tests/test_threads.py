"""The worker threads behind SQLite and bcrypt: order, errors, batching, shutdown."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from login_token_module.stores.engines import threads
from login_token_module.stores.engines.threads import BatchingWorker, WorkerPool
from tests.helpers import REACTOR


@pytest_twisted.ensureDeferred
async def test_batching_worker_runs_jobs_in_order_off_the_reactor_thread() -> None:
    worker = BatchingWorker(REACTOR, "test-worker")
    seen: list[int] = []
    reactor_thread = threading.current_thread()

    def job(index: int) -> tuple[int, bool]:
        seen.append(index)
        return index * 2, threading.current_thread() is reactor_thread

    try:
        results = await defer.gatherResults([worker.run(job, i) for i in range(500)])
    finally:
        worker.close()
    assert [value for value, _ in results] == [i * 2 for i in range(500)]
    assert not any(on_reactor for _, on_reactor in results)
    assert seen == list(range(500))


@pytest_twisted.ensureDeferred
async def test_batching_worker_delivers_queued_jobs_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs queued while the thread is busy come back in one reactor call, not one each."""
    batch_sizes: list[int] = []
    deliver = threads._deliver

    def counting_deliver(done: list[tuple[defer.Deferred[Any], bool, Any]]) -> None:
        batch_sizes.append(len(done))
        deliver(done)

    monkeypatch.setattr(threads, "_deliver", counting_deliver)
    worker = BatchingWorker(REACTOR, "test-worker")
    gate = threading.Event()
    first = worker.run(gate.wait, 10)
    queued = [worker.run(int, i) for i in range(50)]
    gate.set()
    try:
        assert await first is True
        assert await defer.gatherResults(queued) == list(range(50))
    finally:
        worker.close()
    # The gate job's batch may have picked up a few of the 50; the rest come as one.
    assert sum(batch_sizes) == 51
    assert len(batch_sizes) <= 2, batch_sizes


@pytest_twisted.ensureDeferred
async def test_a_failing_job_fails_only_its_own_deferred() -> None:
    worker = BatchingWorker(REACTOR, "test-worker")

    def boom() -> None:
        raise ValueError("no")

    try:
        failing = worker.run(boom)
        fine = worker.run(lambda: "yes")
        with pytest.raises(ValueError, match="no"):
            await failing
        assert await fine == "yes"
    finally:
        worker.close()


@pytest_twisted.ensureDeferred
async def test_close_finishes_queued_work_and_the_worker_can_start_again() -> None:
    worker = BatchingWorker(REACTOR, "test-worker")
    done: list[int] = []
    pending = [worker.run(done.append, i) for i in range(20)]
    worker.close()
    assert done == list(range(20))
    await defer.gatherResults(pending)
    assert await worker.run(lambda: 7) == 7
    worker.close()
    assert not any(t.name == "test-worker" for t in threading.enumerate())


@pytest_twisted.ensureDeferred
async def test_worker_pool_runs_jobs_in_threads_and_closes() -> None:
    pool = WorkerPool(REACTOR, "test-pool", maxthreads=2)
    reactor_thread = threading.current_thread()
    try:
        results = await defer.gatherResults(
            [pool.run(lambda: threading.current_thread() is reactor_thread) for _ in range(10)]
        )
    finally:
        pool.close()
    assert results == [False] * 10
    assert not any(t.name.startswith("PoolThread-test-pool") for t in threading.enumerate())
