"""Benchmark 5: the module's per-user bookkeeping with many distinct users.

``python -m benchmarks.bookkeeping --users 100000`` measures, for the
Ratelimiter (login_token_module.ratelimit) and UiaSessions
(login_token_module.uia), one process per run:

- memory per user (tracemalloc over filling it with that many distinct users),
- lookup cost (the calls the module makes per request, timed one by one),
- how long sweeping every entry holds the reactor, driven the way
  LoginTokenModule.sweep drives it (a reactor turn between slices),
- that a sweep empties it, and that one user hammering ``{}`` holds a bounded
  number of UIA sessions.

Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import tracemalloc
from typing import Any

from benchmarks.harness import Report, Settings, log, worker_result
from benchmarks.reactor_lag import GcPauses, cooperate, measure_hold, probe_idle, run_reactor
from benchmarks.stats import summarize_ms
from login_token_module.ratelimit import Ratelimiter
from login_token_module.resources import STABLE_PATH
from login_token_module.uia import UiaSessions

LIFETIME_SECONDS = 300.0


def _user(i: int) -> str:
    return f"@user{i}:bench.local"


def _sample(users: int, sample: int) -> list[int]:
    return random.Random(users).sample(range(users), min(sample, users))


async def ratelimiter(reactor: Any, users: int, sample: int) -> dict[str, Any]:
    # The module's default: one token a minute per user, no burst.
    limiter = Ratelimiter(per_second=1 / 60, burst_count=1)
    now = time.time()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(users):
        limiter.record(_user(i), now)
    bytes_per_user = (tracemalloc.get_traced_memory()[0] - base) / users
    tracemalloc.stop()

    lookup_ms: list[float] = []
    for i in _sample(users, sample):
        key = _user(i)
        t0 = time.perf_counter()
        # What issue_token does for an allowed request: check, then record.
        if limiter.retry_after_ms(key, now + 120) is None:
            limiter.record(key, now + 120)
        lookup_ms.append((time.perf_counter() - t0) * 1000)

    drained_at = now + 3600  # every bucket has drained by then
    idle = await probe_idle(reactor, 0.3)
    _, hold = await measure_hold(reactor, lambda: cooperate(reactor, limiter.sweep(drained_at)))
    return {
        "users": users,
        "bytes_per_user": bytes_per_user,
        "lookup": summarize_ms(lookup_ms),
        "idle": idle,
        "sweep": hold,
        "left_after_sweep": len(limiter),
    }


async def uia_sessions(reactor: Any, users: int, sample: int) -> dict[str, Any]:
    sessions = UiaSessions(LIFETIME_SECONDS)
    now = time.time()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    ids = [sessions.create(_user(i), STABLE_PATH, now).session_id for i in range(users)]
    bytes_per_user = (tracemalloc.get_traced_memory()[0] - base - sys.getsizeof(ids)) / users
    tracemalloc.stop()

    create_ms: list[float] = []
    lookup_ms: list[float] = []
    for i in _sample(users, sample):
        t0 = time.perf_counter()
        sessions.create(_user(i), STABLE_PATH, now)  # a new challenge ({} with no session)
        create_ms.append((time.perf_counter() - t0) * 1000)
        session_id = ids[i]
        t0 = time.perf_counter()
        found = sessions.get(session_id, now + 1)  # the password round presents the session
        lookup_ms.append((time.perf_counter() - t0) * 1000)
        if found is None:
            raise AssertionError("a live session was not found")

    expired_at = now + LIFETIME_SECONDS + 1
    idle = await probe_idle(reactor, 0.3)
    with GcPauses() as pauses:
        _, hold = await measure_hold(reactor, lambda: cooperate(reactor, sessions.sweep(expired_at)))
    left = len(sessions)

    # One user answering every challenge with another {}: sessions stay capped.
    hammered = UiaSessions(LIFETIME_SECONDS)
    for _ in range(min(users, 100_000)):
        hammered.create(_user(0), STABLE_PATH, now)
    return {
        "users": users,
        "bytes_per_user": bytes_per_user,
        "create": summarize_ms(create_ms),
        "lookup": summarize_ms(lookup_ms),
        "idle": idle,
        "sweep": hold,
        "sweep_gc": pauses.report(),
        "left_after_sweep": left,
        "one_user_challenges": min(users, 100_000),
        "one_user_sessions_held": len(hammered),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bookkeeping")
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--sample", type=int, default=5_000)
    args = parser.parse_args()

    async def run(reactor: Any) -> None:
        result = {
            "ratelimiter": await ratelimiter(reactor, args.users, args.sample),
            "uia": await uia_sessions(reactor, args.users, args.sample),
        }
        print("RESULT " + json.dumps(result), flush=True)

    run_reactor(run)
    return 0


# -- the driver: run.py calls it, and it runs this file once per measurement ---------


def bench_bookkeeping(settings: Settings, report: Report) -> None:
    results: dict[str, Any] = {}
    for users in settings.bookkeeping_users:
        log(f"#5 bookkeeping: Ratelimiter and UiaSessions with {users:,} users")
        results[str(users)] = worker_result("benchmarks.bookkeeping", ["--users", str(users)])
    report.sections["bookkeeping"] = results


if __name__ == "__main__":
    sys.exit(main())
