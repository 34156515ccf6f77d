"""Benchmark 4, one measurement per process: a token store at one size.

``python -m benchmarks.stores scale --store memory --size 1000000`` fills the
store with that many unexpired tokens through ``add_token``, then times
``add_token`` and ``spend_token`` one call at a time, pinned to one CPU (see
``pin_to_one_cpu``). For the in-memory store
the fill runs under tracemalloc, so the bytes each token costs are counted
exactly (the hash, the user id string, the expiry int, the dict and deque slots).

``python -m benchmarks.stores sweep --store memory --size 100000`` fills the
store with expired tokens and measures how long ``delete_expired`` holds the
reactor (see reactor_lag.py).

Each run prints one ``RESULT {json}`` line. The stores are driven directly,
exactly as the module drives them, on a running reactor.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import secrets
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults

from benchmarks.harness import Report, Settings, log, worker_result
from benchmarks.reactor_lag import GcPauses, measure_hold, probe_idle, run_reactor
from benchmarks.stats import summarize_ms
from login_token_module import tokens
from login_token_module.stores import TokenStore
from login_token_module.stores.memory import MemoryTokenStore
from login_token_module.stores.sqlite_store import SqliteTokenStore

LIFETIME_MS = 120_000
USERS = 1_000  # tokens are spread over this many users, as on a busy server
FILL_BATCH = 1_000


def pin_to_one_cpu() -> int | None:
    """Run this process (and the store's thread, started later) on one CPU.

    On this VM a thread hop, which every SQLite store call makes, costs ~35 us
    when both threads share a CPU and ~35 or ~90 us, at random from run to run,
    when the scheduler puts them on different ones (waking the other vCPU),
    whatever the store size. One CPU takes that coin toss out of the comparison.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if not allowed:
        return None
    os.sched_setaffinity(0, {allowed[0]})
    return allowed[0]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _user(i: int) -> str:
    # A fresh string object per token, as the module gets one from each request.
    return f"@user{i % USERS}:bench.local"


def _make_store(kind: str, reactor: Any, directory: Path) -> TokenStore:
    if kind == "memory":
        return MemoryTokenStore(reactor)
    return SqliteTokenStore(reactor, str(directory / "login_tokens.db"))


async def _fill(
    store: TokenStore, kind: str, size: int, expires_at: int | None, chosen: dict[int, str] | None = None
) -> None:
    """Issue ``size`` tokens through ``add_token``.

    Positions in ``chosen`` get the hash of that real token, so they can be
    spent later; every other position gets random bytes standing for a hash.
    """
    chosen = chosen or {}

    def token_hash(i: int) -> bytes:
        real = chosen.get(i)
        return tokens.hash_token(real) if real is not None else secrets.token_bytes(32)

    if kind == "memory":
        for i in range(size):
            when = expires_at if expires_at is not None else _now_ms() + LIFETIME_MS
            await store.add_token(token_hash(i), _user(i), when)
        return
    # The SQLite store works in its own thread; keep a batch of adds in flight.
    for start in range(0, size, FILL_BATCH):
        batch: list[Deferred[None]] = []
        for i in range(start, min(size, start + FILL_BATCH)):
            when = expires_at if expires_at is not None else _now_ms() + LIFETIME_MS
            batch.append(Deferred.fromCoroutine(store.add_token(token_hash(i), _user(i), when)))
        await gatherResults(batch)


async def scale(reactor: Any, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    store = _make_store(args.store, reactor, directory)
    result: dict[str, Any] = {"store": args.store, "size": args.size}
    # Real tokens at evenly spread positions of the fill: half are spent through
    # the store call alone, half the way the module spends one (shape check,
    # SHA-256, store call). Made before tracemalloc starts: the store never holds them.
    picks = min(2 * args.sample, args.size)
    step = args.size / picks
    chosen = {int(j * step): tokens.generate_token() for j in range(picks)}
    gc.collect()
    with GcPauses() as pauses:
        if args.store == "memory":
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        await _fill(store, args.store, args.size, None, chosen)
        result["fill_seconds"] = time.perf_counter() - started
        result["fill_per_second"] = args.size / max(result["fill_seconds"], 1e-9)
        if args.store == "memory":
            result["bytes_per_token"] = (tracemalloc.get_traced_memory()[0] - base) / args.size
            tracemalloc.stop()
        else:
            on_disk = sum(p.stat().st_size for p in directory.glob("login_tokens.db*"))
            result["disk_bytes_per_token"] = on_disk / args.size
        result["held_tokens"] = await store.count_tokens()

        real = list(chosen.values())
        random.Random(args.size).shuffle(real)
        store_sample, module_sample = real[0::2], real[1::2]
        result.update(await _sample_latencies(store, store_sample, module_sample))
    result["gc"] = pauses.report()
    await store.close()
    return result


async def _sample_latencies(
    store: TokenStore, store_sample: list[str], module_sample: list[str]
) -> dict[str, Any]:
    add_ms: list[float] = []
    for i in range(len(store_sample)):
        token_hash = secrets.token_bytes(32)
        when = _now_ms() + LIFETIME_MS
        t0 = time.perf_counter()
        await store.add_token(token_hash, _user(i), when)
        add_ms.append((time.perf_counter() - t0) * 1000)

    consume_ms: list[float] = []
    misses = 0
    for token in store_sample:
        token_hash, now = tokens.hash_token(token), _now_ms()
        t0 = time.perf_counter()
        user = (await store.spend_token(token_hash, now)).user_id_if_spent()
        consume_ms.append((time.perf_counter() - t0) * 1000)
        misses += user is None

    module_ms: list[float] = []
    for token in module_sample:
        t0 = time.perf_counter()
        # What LoginTokenModule.check_login_token does before and around the store.
        if not tokens.is_well_formed(token):
            raise AssertionError("a generated token is not well formed")
        user = (await store.spend_token(tokens.hash_token(token), _now_ms())).user_id_if_spent()
        module_ms.append((time.perf_counter() - t0) * 1000)
        misses += user is None
    return {
        "add": summarize_ms(add_ms),
        "consume": summarize_ms(consume_ms),
        "consume_module_path": summarize_ms(module_ms),
        "consume_misses": misses,
    }


async def sweep(reactor: Any, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    store = _make_store(args.store, reactor, directory)
    past = _now_ms() - 1_000
    started = time.perf_counter()
    await _fill(store, args.store, args.size, past)
    fill_seconds = time.perf_counter() - started
    idle = await probe_idle(reactor, 0.5)
    removed, hold = await measure_hold(reactor, lambda: store.delete_expired(_now_ms()))
    left = await store.count_tokens()
    await store.close()
    return {
        "store": args.store,
        "size": args.size,
        "fill_seconds": fill_seconds,
        "removed": removed,
        "left": left,
        "idle": idle,
        "sweep": hold,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stores")
    parser.add_argument("mode", choices=["scale", "sweep"])
    parser.add_argument("--store", choices=["memory", "sqlite"], required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--sample", type=int, default=2_000)
    args = parser.parse_args()

    # Latencies are compared across sizes on one CPU; the sweep keeps both, as a server has.
    pinned = pin_to_one_cpu() if args.mode == "scale" else None

    async def run(reactor: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
            work = scale if args.mode == "scale" else sweep
            result = await work(reactor, args, Path(tmp))
        result["pinned_cpu"] = pinned
        print("RESULT " + json.dumps(result), flush=True)

    run_reactor(run)
    return 0


# -- the driver: run.py calls it, and it runs this file once per measurement ---------


def bench_stores(settings: Settings, report: Report) -> None:
    scaling: dict[str, dict[str, Any]] = {"memory": {}, "sqlite": {}}
    sweeps: dict[str, Any] = {}
    for store in ("memory", "sqlite"):
        for size in settings.store_sizes:
            log(f"#4 stores: {store} store with {size:,} outstanding tokens")
            args = ["scale", "--store", store, "--size", str(size), "--sample", str(settings.store_sample)]
            scaling[store][str(size)] = worker_result("benchmarks.stores", args)
        log(f"#4 stores: {store} store sweeping {settings.sweep_size:,} expired tokens")
        sweeps[store] = worker_result(
            "benchmarks.stores", ["sweep", "--store", store, "--size", str(settings.sweep_size)]
        )
    report.sections["stores"] = {"scaling": scaling, "sweep": sweeps}


if __name__ == "__main__":
    sys.exit(main())
