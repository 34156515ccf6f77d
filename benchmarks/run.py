"""``python -m benchmarks``: run every benchmark, print a table with targets, write JSON.

The orchestrator starts real servers on 127.0.0.1, runs the load generator
(benchmarks/loadgen.py) and the store and bookkeeping measurements
(benchmarks/stores.py, benchmarks/bookkeeping.py) as separate processes, samples
each server's resident memory, and judges every target. See README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from benchmarks import scaleout, servers
from benchmarks.stats import ratio, summarize_ms

ROOT = servers.BENCH_DIR.parent
GET_TOKEN_PATH = "/_matrix/client/v1/login/get_token"
# Where Synapse serves the module's get_token (the reverse proxy's rewrite target).
MODULE_IN_SYNAPSE_PATH = "/_synapse/client/login_token/v1/login/get_token"
RESULTS_DIR = servers.BENCH_DIR / "results"
PHASES = [
    ("password_login", "password login"),
    ("get_token_uia", "get_token + UIA"),
    ("token_login", "token login"),
]
# (phase, label, wanted, lowest ratio that meets it): the module inside Synapse
# against Synapse's built-in version in the same process.
MODULE_IN_SYNAPSE_TARGETS = [
    ("get_token_uia", "get_token+UIA", ">= 1x", 1.0),
    ("token_login", "token login", ">= 0.9x", 0.9),
]


@dataclass
class Settings:
    smoke: bool
    users: int
    warmup_users: int
    concurrency: int
    bcrypt_rounds: int
    ceiling_requests: int
    storm_bcrypt_rounds: int
    storm_clients: int
    storm_seconds: float
    probe_interval: float
    store_sizes: list[int]
    store_sample: int
    sweep_size: int
    bookkeeping_users: list[int]
    scaleout_users: int
    scaleout_rounds: int
    synapse: bool
    results_dir: Path

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        if args.smoke:
            return cls(
                smoke=True,
                users=args.users or 24,
                warmup_users=4,
                concurrency=args.concurrency,
                bcrypt_rounds=args.bcrypt_rounds,
                ceiling_requests=300,
                storm_bcrypt_rounds=4,
                storm_clients=4,
                storm_seconds=1.0,
                probe_interval=0.005,
                store_sizes=[100, 1_000],
                store_sample=100,
                sweep_size=1_000,
                bookkeeping_users=[100, 1_000],
                scaleout_users=args.scaleout_users or 24,
                scaleout_rounds=1,
                synapse=False,
                results_dir=args.results_dir,
            )
        return cls(
            smoke=False,
            users=args.users or 2_000,
            warmup_users=50,
            concurrency=args.concurrency,
            bcrypt_rounds=args.bcrypt_rounds,
            ceiling_requests=20_000,
            storm_bcrypt_rounds=args.storm_bcrypt_rounds,
            storm_clients=16,
            storm_seconds=10.0,
            probe_interval=0.005,
            store_sizes=[1_000, 100_000, 1_000_000],
            store_sample=5_000,
            sweep_size=100_000,
            bookkeeping_users=[1_000, 100_000],
            scaleout_users=args.scaleout_users or 2_000,
            scaleout_rounds=args.scaleout_rounds,
            synapse=not args.no_synapse,
            results_dir=args.results_dir,
        )


@dataclass
class Target:
    name: str
    measured: float
    wanted: str
    met: bool | None  # None: could not be measured (skipped)
    unit: str = ""
    note: str = ""

    def status(self) -> str:
        return "SKIPPED" if self.met is None else ("MET" if self.met else "MISSED")


@dataclass
class Report:
    settings: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- child processes -------------------------------------------------------------


class Worker:
    """A ``python -m benchmarks.X`` child speaking lines and a final ``RESULT {json}``."""

    def __init__(self, module: str, args: list[str], job: dict[str, Any] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(job) if job is not None else "")
        self.process.stdin.close()
        self._result: dict[str, Any] | None = None

    def _stdout(self) -> IO[str]:
        assert self.process.stdout is not None
        return self.process.stdout

    def wait_for(self, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for line in self._stdout():
            if line.strip() == marker:
                return
            if line.startswith("RESULT "):
                self._result = json.loads(line[7:])
                break
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"worker never said {marker}: {self._stderr_tail()}")

    def result(self, timeout: float) -> dict[str, Any]:
        if self._result is None:
            for line in self._stdout():
                if line.startswith("RESULT "):
                    self._result = json.loads(line[7:])
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        if self._result is None:
            raise RuntimeError(f"worker failed (exit {self.process.returncode}): {self._stderr_tail()}")
        return self._result

    def _stderr_tail(self) -> str:
        assert self.process.stderr is not None
        if self.process.poll() is None:
            return "(still running)"
        return " | ".join(self.process.stderr.read().strip().splitlines()[-5:])


def loadgen(job: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    return Worker("benchmarks.loadgen", [], job).result(timeout)


def phase_summary(phase: dict[str, Any], server: servers.ServerProcess | None) -> dict[str, Any]:
    return parts_summary([phase], server)


def parts_summary(parts: list[dict[str, Any]], server: servers.ServerProcess | None) -> dict[str, Any]:
    """One phase's numbers over one or more runs of it (throughput over their summed time)."""
    ops = sum(int(part["ops"]) for part in parts)
    seconds = max(sum(float(part["seconds"]) for part in parts), 1e-9)
    summary = {
        "ops": ops,
        "errors": sum(int(part["errors"]) for part in parts),
        "error_samples": [sample for part in parts for sample in part["error_samples"]][:5],
        "http_requests": sum(int(part["http_requests"]) for part in parts),
        "seconds": seconds,
        "ops_per_s": ops / seconds,
        **summarize_ms([value for part in parts for value in part["latencies_ms"]]),
    }
    if server is not None:
        summary["peak_rss_mb"] = max(server.sampler.peak_mb(part["t_start"], part["t_end"]) for part in parts)
    return summary


# -- benchmarks 1 and 2: the flow, and the ceiling ---------------------------------


def flow_job(
    server: servers.ServerProcess,
    users: list[str],
    warmup: list[str],
    password: str,
    c: int,
    get_token_path: str = GET_TOKEN_PATH,
) -> Any:
    return {
        "kind": "flow",
        "base_url": server.base_url,
        "users": users,
        "warmup_users": warmup,
        "password": password,
        "concurrency": c,
        "get_token_path": get_token_path,
    }


def run_flow_phases(
    settings: Settings,
    server: servers.ServerProcess,
    users: list[str],
    warmup: list[str],
    password: str,
    get_token_path: str = GET_TOKEN_PATH,
) -> list[dict[str, Any]]:
    raw = loadgen(flow_job(server, users, warmup, password, settings.concurrency, get_token_path))
    if "fatal" in raw:
        raise RuntimeError(f"{server.name}: {raw['fatal']}: {raw['phases'][0]['error_samples']}")
    phases: list[dict[str, Any]] = raw["phases"]
    return phases


def run_flow(
    settings: Settings, server: servers.ServerProcess, users: list[str], warmup: list[str], password: str
) -> dict[str, Any]:
    phases = run_flow_phases(settings, server, users, warmup, password)
    return {phase["name"]: phase_summary(phase, server) for phase in phases}


def run_ceiling(settings: Settings, server: servers.ServerProcess) -> dict[str, Any]:
    raw = loadgen(
        {
            "kind": "get",
            "base_url": server.base_url,
            "path": "/_matrix/client/versions",
            "concurrency": settings.concurrency,
            "requests": settings.ceiling_requests,
        }
    )
    return phase_summary(raw["phases"][0], server)


def bench_ours(settings: Settings, work: Path, report: Report) -> None:
    log("#1/#2 reference host: creating users")
    password = servers.new_password()
    users = [f"bench{i}" for i in range(settings.users)]
    warmup = [f"warm{i}" for i in range(settings.warmup_users)]
    config = servers.host_config(work / "ours", bcrypt_rounds=settings.bcrypt_rounds)
    servers.create_host_users(config, users + warmup, password, settings.bcrypt_rounds)
    server = servers.start_host(config)
    try:
        log(f"#1 reference host: flow for {len(users)} users at concurrency {settings.concurrency}")
        report.sections["flow"] = {"ours": run_flow(settings, server, users, warmup, password)}
        log(f"#2 reference host: GET /versions ceiling, {settings.ceiling_requests} requests")
        report.sections["ceiling"] = {"ours": run_ceiling(settings, server)}
    finally:
        server.stop()


def bench_synapse(settings: Settings, work: Path, report: Report) -> None:
    """Synapse's built-in get_token and the module inside the same Synapse process, side by side."""
    flow = report.sections.setdefault("flow", {})
    if not settings.synapse:
        why = "smoke mode" if settings.smoke else "--no-synapse"
        report.notes.append(f"Synapse comparison skipped ({why}).")
        flow["synapse"] = None
        flow["module_in_synapse"] = None
        return
    log("#1 Synapse: checking its virtualenv")
    python, detail = servers.ensure_synapse(log)
    if python is None:
        report.notes.append(f"Synapse comparison skipped: {detail}")
        log(f"Synapse comparison skipped: {detail}")
        flow["synapse"] = None
        flow["module_in_synapse"] = None
        return
    report.sections["synapse_version"] = detail
    port = servers.free_port()
    generous = {"per_second": 1000, "burst_count": 1000}
    config, secret = servers.synapse_config(
        python,
        work / "synapse",
        bcrypt_rounds=settings.bcrypt_rounds,
        port=port,
        # The module beside the built-in version (Synapse's login_via_existing_session).
        module_config={
            "token_lifetime_ms": 120_000,
            "ratelimit": generous,
            "failed_auth_ratelimit": generous,
        },
    )
    log(f"#1 Synapse {detail}: starting on 127.0.0.1:{port}, with the module loaded")
    server = servers.start_synapse(python, config, port)
    try:
        password = servers.new_password()
        # Both versions run in the same process, alternating built-in, module,
        # module, built-in (twice), each time with a quarter of their users, so
        # neither always runs first or last while the database grows and the
        # machine's load comes and goes. Every run has warm-up users of its own:
        # the built-in limit is one token a minute per user.
        builtin = ("synapse", GET_TOKEN_PATH, "bench")
        module = ("module_in_synapse", MODULE_IN_SYNAPSE_PATH, "mod")
        order = [builtin, module, module, builtin] * 2
        quarters = [range(settings.users * q // 4, settings.users * (q + 1) // 4) for q in range(4)]
        next_quarter = {"bench": iter(quarters), "mod": iter(quarters)}
        runs = [(name, path, prefix, next(next_quarter[prefix])) for name, path, prefix in order]
        plans = [
            (
                name,
                path,
                [f"{prefix}{i}" for i in numbers],
                [f"warm{run}_{i}" for i in range(settings.warmup_users)],
            )
            for run, (name, path, prefix, numbers) in enumerate(runs)
        ]
        everyone = [user for _, _, users, warmup in plans for user in users + warmup]
        log(f"#1 Synapse: registering {len(everyone)} users (admin API, shared secret)")
        registered = loadgen(
            {
                "kind": "register_synapse",
                "base_url": server.base_url,
                "users": everyone,
                "password": password,
                "shared_secret": secret,
                "concurrency": 8,
            }
        )["phases"][0]
        if registered["errors"]:
            raise RuntimeError(f"Synapse registration failed: {registered['error_samples']}")
        waited = server.wait_until_idle()
        log(f"#1 Synapse: idle again {waited:.0f}s after registering")
        phases: dict[str, list[list[dict[str, Any]]]] = {"synapse": [], "module_in_synapse": []}
        for name, path, users, warmup in plans:
            log(f"#1 Synapse: {name} flow for {len(users)} users at concurrency {settings.concurrency}")
            phases[name].append(run_flow_phases(settings, server, users, warmup, password, path))
        for name, results in phases.items():
            flow[name] = {}
            for key, _ in PHASES:
                parts = [next(p for p in run if p["name"] == key) for run in results]
                flow[name][key] = parts_summary(parts, server)
                # Each run on its own, in the order they ran, to show drift between runs.
                flow[name][key]["runs_ops_per_s"] = [p["ops"] / max(p["seconds"], 1e-9) for p in parts]
        log("#2 Synapse: GET /versions ceiling (for context)")
        report.sections.setdefault("ceiling", {})["synapse"] = run_ceiling(settings, server)
    finally:
        server.stop()


# -- benchmark 3: the reactor stays free -------------------------------------------


def probe_job(server: servers.ServerProcess, settings: Settings) -> dict[str, Any]:
    return {
        "kind": "get",
        "base_url": server.base_url,
        "path": "/_matrix/client/versions",
        "concurrency": 1,
        "duration": settings.storm_seconds,
        "interval": settings.probe_interval,
    }


def bench_storm(settings: Settings, work: Path, report: Report) -> None:
    rounds = settings.storm_bcrypt_rounds
    log(f"#3 reactor: host with bcrypt_rounds {rounds}, {settings.storm_clients} storm users")
    password = servers.new_password()
    users = [f"storm{i}" for i in range(settings.storm_clients)]
    config = servers.host_config(work / "storm", bcrypt_rounds=rounds)
    servers.create_host_users(config, users, password, rounds)
    server = servers.start_host(config, name="ours-storm")
    try:
        log(f"#3 reactor: idle GET /versions probe, {settings.storm_seconds:.0f}s")
        idle = loadgen(probe_job(server, settings))["phases"][0]
        storm = Worker(
            "benchmarks.loadgen",
            [],
            {
                "kind": "storm",
                "base_url": server.base_url,
                "users": users,
                "password": password,
                "duration": settings.storm_seconds + 2,
            },
        )
        storm.wait_for("READY", timeout=300)
        log(f"#3 reactor: GET /versions probe during the get_token+UIA storm, {settings.storm_seconds:.0f}s")
        busy = loadgen(probe_job(server, settings))["phases"][0]
        stormed = storm.result(timeout=300)["phases"][0]
        report.sections["reactor"] = {
            "bcrypt_rounds": rounds,
            "idle": phase_summary(idle, server),
            "during_storm": phase_summary(busy, server),
            "storm": phase_summary(stormed, server),
        }
    finally:
        server.stop()


# -- benchmarks 4 and 5: stores and bookkeeping ------------------------------------


def worker_result(module: str, args: list[str], timeout: float = 1800) -> dict[str, Any]:
    return Worker(module, args).result(timeout)


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


def bench_bookkeeping(settings: Settings, report: Report) -> None:
    results: dict[str, Any] = {}
    for users in settings.bookkeeping_users:
        log(f"#5 bookkeeping: Ratelimiter and UiaSessions with {users:,} users")
        results[str(users)] = worker_result("benchmarks.bookkeeping", ["--users", str(users)])
    report.sections["bookkeeping"] = results


def bench_scaleout(settings: Settings, work: Path, report: Report) -> None:
    section = scaleout.bench_scaleout(
        users=settings.scaleout_users,
        warmup=settings.warmup_users,
        concurrency=settings.concurrency,
        bcrypt_rounds=settings.bcrypt_rounds,
        rounds=settings.scaleout_rounds,
        work=work,
        loadgen=loadgen,
        summarize=phase_summary,
        log=log,
    )
    if section["postgres_skipped"]:
        report.notes.append(f"#6 PostgreSQL configurations skipped: {section['postgres_skipped']}")
    report.sections["scaleout"] = section


# -- judging and printing ------------------------------------------------------------


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def judge(settings: Settings, report: Report) -> None:
    s = report.sections
    t = report.targets
    ours_token = _get(s, "flow", "ours", "token_login")
    syn_token = _get(s, "flow", "synapse", "token_login")
    if ours_token is not None and syn_token is not None:
        r = ratio(ours_token["ops_per_s"], syn_token["ops_per_s"])
        t.append(Target("#1 token login throughput, ours / Synapse", r, ">= 5x", r >= 5, "x"))
    else:
        t.append(Target("#1 token login throughput, ours / Synapse", math.nan, ">= 5x", None))
    for key, label, wanted, floor in MODULE_IN_SYNAPSE_TARGETS:
        name = f"#1 {label} throughput, module in Synapse / Synapse built-in"
        module_phase = _get(s, "flow", "module_in_synapse", key)
        builtin_phase = _get(s, "flow", "synapse", key)
        if module_phase is None or builtin_phase is None:
            t.append(Target(name, math.nan, wanted, None))
            continue
        r = ratio(module_phase["ops_per_s"], builtin_phase["ops_per_s"])
        t.append(Target(name, r, wanted, r >= floor, "x"))
    if ours_token is not None:
        p99 = ours_token["p99_ms"]
        t.append(
            Target(
                f"#1 token login p99 at concurrency {settings.concurrency}", p99, "< 50 ms", p99 < 50, "ms"
            )
        )
        ceiling = _get(s, "ceiling", "ours")
        if ceiling is not None:
            r = ratio(ours_token["ops_per_s"], ceiling["ops_per_s"])
            t.append(Target("#2 token login / GET /versions ceiling", 100 * r, ">= 40 %", r >= 0.4, "%"))
    reactor = s.get("reactor")
    if reactor is not None:
        r = ratio(reactor["during_storm"]["p99_ms"], reactor["idle"]["p99_ms"])
        t.append(Target("#3 /versions p99 during UIA storm / idle p99", r, "<= 2x", r <= 2, "x"))
    stores = s.get("stores")
    if stores is not None:
        small, large = str(settings.store_sizes[0]), str(settings.store_sizes[-1])
        for store, results in stores["scaling"].items():
            r = ratio(results[large]["consume"]["p50_ms"], results[small]["consume"]["p50_ms"])
            t.append(
                Target(
                    f"#4 {store} store consume p50, {int(large):,} / {int(small):,} tokens",
                    r,
                    "<= 1.5x",
                    r <= 1.5,
                    "x",
                )
            )
        worst = max(results["bytes_per_token"] for results in stores["scaling"]["memory"].values())
        t.append(Target("#4 memory store bytes per token (largest size)", worst, "< 300 B", worst < 300, "B"))
        for store, sweep in stores["sweep"].items():
            hold = sweep["sweep"]["max_gap_wall_ms"]
            name = f"#4 {store} store sweep of {sweep['size']:,} expired: longest reactor hold"
            t.append(Target(name, hold, "<= 10 ms", hold <= 10 and sweep["left"] == 0, "ms"))
    book = s.get("bookkeeping")
    if book is not None:
        small, large = str(settings.bookkeeping_users[0]), str(settings.bookkeeping_users[-1])
        for part, label in (("ratelimiter", "Ratelimiter"), ("uia", "UiaSessions")):
            hold = book[large][part]["sweep"]["max_gap_wall_ms"]
            emptied = book[large][part]["left_after_sweep"] == 0
            name = f"#5 {label} sweep of {int(large):,} users: longest reactor hold"
            t.append(Target(name, hold, "<= 10 ms", hold <= 10 and emptied, "ms"))
            r = ratio(book[large][part]["bytes_per_user"], book[small][part]["bytes_per_user"])
            t.append(
                Target(
                    f"#5 {label} bytes per user, {int(large):,} / {int(small):,} users",
                    r,
                    "<= 1.5x",
                    r <= 1.5,
                    "x",
                )
            )
            lookup_us = 1000 * book[large][part]["lookup"]["p50_ms"]
            t.append(
                Target(
                    f"#5 {label} lookup p50 at {int(large):,} users",
                    lookup_us,
                    "< 10 us",
                    lookup_us < 10,
                    "us",
                )
            )
        held = book[large]["uia"]["one_user_sessions_held"]
        t.append(Target("#5 UIA sessions held by one user after many {} challenges", held, "<= 8", held <= 8))


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def render(settings: Settings, report: Report) -> str:
    s = report.sections
    out: list[str] = []
    flow = s.get("flow", {})
    if flow:
        out.append(
            f"#1 The flow: ours (the reference host), Synapse's built-in get_token, and the module inside"
            f" that same Synapse ({settings.users} users, concurrency {settings.concurrency},"
            f" bcrypt_rounds {settings.bcrypt_rounds} everywhere; get_token ops are UIA rounds of 2 requests)"
        )
        rows = []
        for key, label in PHASES:
            ours = _get(flow, "ours", key)
            syn = _get(flow, "synapse", key)
            module = _get(flow, "module_in_synapse", key)
            for name, data in (("ours", ours), ("synapse", syn), ("module in synapse", module)):
                if data is None:
                    rows.append([label, name, "skipped", "-", "-", "-", "-"])
                    continue
                rows.append(
                    [
                        label,
                        name,
                        _fmt(data["ops_per_s"]),
                        _fmt(data["p50_ms"], 2),
                        _fmt(data["p99_ms"], 2),
                        _fmt(data["peak_rss_mb"]),
                        _fmt(data["errors"]),
                    ]
                )
            for name, top, bottom in (("ours/synapse", ours, syn), ("module/synapse", module, syn)):
                if top is None or bottom is None:
                    continue
                rows.append(
                    [
                        label,
                        name,
                        _fmt(ratio(top["ops_per_s"], bottom["ops_per_s"]), 2) + "x",
                        _fmt(ratio(top["p50_ms"], bottom["p50_ms"]), 2) + "x",
                        _fmt(ratio(top["p99_ms"], bottom["p99_ms"]), 2) + "x",
                        _fmt(ratio(top["peak_rss_mb"], bottom["peak_rss_mb"]), 2) + "x",
                        "",
                    ]
                )
        out.append(_table(["phase", "server", "ops/s", "p50 ms", "p99 ms", "peak RSS MB", "errors"], rows))
        out.append("")
    ceiling = s.get("ceiling", {})
    if ceiling:
        out.append(f"#2 GET /_matrix/client/versions ceiling (concurrency {settings.concurrency})")
        rows = [
            [
                name,
                _fmt(d["ops_per_s"]),
                _fmt(d["p50_ms"], 2),
                _fmt(d["p99_ms"], 2),
                _fmt(d["peak_rss_mb"]),
                _fmt(d["errors"]),
            ]
            for name, d in ceiling.items()
            if d is not None
        ]
        out.append(_table(["server", "req/s", "p50 ms", "p99 ms", "peak RSS MB", "errors"], rows))
        out.append("")
    reactor = s.get("reactor")
    if reactor is not None:
        out.append(
            f"#3 GET /versions probe (one request every {settings.probe_interval * 1000:.0f} ms), idle"
            f" and during {settings.storm_clients} clients doing get_token+UIA"
            f" (bcrypt_rounds {reactor['bcrypt_rounds']})"
        )
        rows = []
        for name, key in (
            ("probe, idle", "idle"),
            ("probe, during storm", "during_storm"),
            ("storm (get_token+UIA)", "storm"),
        ):
            d = reactor[key]
            rows.append(
                [
                    name,
                    _fmt(d["ops"]),
                    _fmt(d["ops_per_s"]),
                    _fmt(d["p50_ms"], 2),
                    _fmt(d["p99_ms"], 2),
                    _fmt(d["max_ms"], 2),
                    _fmt(d["peak_rss_mb"]),
                    _fmt(d["errors"]),
                ]
            )
        out.append(
            _table(
                ["measurement", "ops", "ops/s", "p50 ms", "p99 ms", "max ms", "peak RSS MB", "errors"], rows
            )
        )
        out.append("")
    stores = s.get("stores")
    if stores is not None:
        out.append(
            "#4 Token stores: issue, then consume, with N outstanding unexpired tokens"
            " (latencies in microseconds)"
        )
        rows = []
        for store, results in stores["scaling"].items():
            for size, d in results.items():
                per_token = d.get("bytes_per_token", d.get("disk_bytes_per_token"))
                kind = "RAM" if "bytes_per_token" in d else "disk"
                rows.append(
                    [
                        store,
                        f"{int(size):,}",
                        _fmt(d["fill_per_second"], 0),
                        _fmt(1000 * d["add"]["p50_ms"], 2),
                        _fmt(1000 * d["consume"]["p50_ms"], 2),
                        _fmt(1000 * d["consume"]["p99_ms"], 2),
                        _fmt(1000 * d["consume_module_path"]["p50_ms"], 2),
                        f"{_fmt(per_token, 0)} {kind}",
                    ]
                )
        out.append(
            _table(
                [
                    "store",
                    "tokens",
                    "issue/s",
                    "add p50",
                    "consume p50",
                    "consume p99",
                    "module-path p50",
                    "bytes/token",
                ],
                rows,
            )
        )
        rows = []
        for store, d in stores["sweep"].items():
            rows.append(
                [
                    store,
                    f"{d['size']:,}",
                    _fmt(d["removed"]),
                    _fmt(1000 * d["sweep"]["seconds"], 1),
                    _fmt(d["sweep"]["max_gap_wall_ms"], 2),
                    _fmt(d["sweep"]["max_gap_cpu_ms"], 2),
                    _fmt(d["idle"]["max_gap_wall_ms"], 2),
                ]
            )
        out.append("")
        out.append(
            _table(
                [
                    "sweep",
                    "expired",
                    "removed",
                    "took ms",
                    "longest hold ms (wall)",
                    "(reactor CPU)",
                    "idle gap ms",
                ],
                rows,
            )
        )
        out.append("")
    book = s.get("bookkeeping")
    if book is not None:
        out.append("#5 Per-user bookkeeping (latencies in microseconds)")
        rows = []
        for users, d in book.items():
            for part, label in (("ratelimiter", "Ratelimiter"), ("uia", "UiaSessions")):
                p = d[part]
                rows.append(
                    [
                        label,
                        f"{int(users):,}",
                        _fmt(p["bytes_per_user"], 0),
                        _fmt(1000 * p["lookup"]["p50_ms"], 2),
                        _fmt(1000 * p["lookup"]["p99_ms"], 2),
                        _fmt(p["sweep"]["max_gap_wall_ms"], 2),
                        _fmt(p["sweep"]["max_gap_cpu_ms"], 2),
                        _fmt(p["left_after_sweep"]),
                    ]
                )
        out.append(
            _table(
                [
                    "structure",
                    "users",
                    "bytes/user",
                    "lookup p50",
                    "lookup p99",
                    "sweep hold ms (wall)",
                    "(reactor CPU)",
                    "left after sweep",
                ],
                rows,
            )
        )
        out.append("")
    scale = s.get("scaleout")
    if scale is not None:
        out.extend(render_scaleout(scale))
    out.append("Targets")
    rows = [[t.name, f"{_fmt(t.measured, 2)} {t.unit}".strip(), t.wanted, t.status()] for t in report.targets]
    out.append(_table(["target", "measured", "wanted", "result"], rows))
    for note in report.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def render_scaleout(scale: dict[str, Any]) -> list[str]:
    out = [
        f"#6 Scale-out: 1 worker vs 2, SQLite vs PostgreSQL ({scale['users']} users, concurrency"
        f" {scale['concurrency']}, median of {scale['rounds']} round(s); CPU ms per operation from the"
        " processes' own counters)"
    ]
    rows = []
    for key, label in scaleout.PHASES:
        for config in scale["configs"]:
            d = config["phases"][key]
            rows.append(
                [
                    label,
                    config["label"],
                    _fmt(d["ops_per_s"]),
                    _fmt(d["p50_ms"], 2),
                    _fmt(d["p99_ms"], 2),
                    _fmt(d["server_cpu_ms_per_op"], 3),
                    _fmt(d["postgres_cpu_ms_per_op"], 3) if config["store"] == "postgres" else "-",
                    _fmt(d["errors"]),
                ]
            )
    out.append(
        _table(
            [
                "phase",
                "configuration",
                "ops/s",
                "p50 ms",
                "p99 ms",
                "server CPU ms/op",
                "PostgreSQL CPU ms/op",
                "errors",
            ],
            rows,
        )
    )
    out.append("")
    rows = [
        [name, label, f"{_fmt(ops, 2)}x", f"{_fmt(cpu, 2)}x"]
        for name, label, ops, cpu in scaleout.ratios(scale)
    ]
    if rows:
        out.append(_table(["comparison", "phase", "ops/s", "CPU per op (server + PostgreSQL)"], rows))
        out.append("")
    return out


# -- main ----------------------------------------------------------------------------


def _strip_latencies(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _strip_latencies(v) for k, v in data.items() if k != "latencies_ms"}
    if isinstance(data, list):
        return [_strip_latencies(v) for v in data]
    return data


def write_json(settings: Settings, report: Report) -> Path:
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = settings.results_dir / f"{'smoke' if settings.smoke else 'bench'}-{stamp}.json"
    payload = {
        "settings": report.settings,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
        },
        "sections": _strip_latencies(report.sections),
        "targets": [asdict(t) | {"result": t.status()} for t in report.targets],
        "notes": report.notes,
    }
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny N, no Synapse: a seconds-long check")
    parser.add_argument("--no-synapse", action="store_true", help="skip the Synapse comparison")
    parser.add_argument(
        "--users", type=int, default=0, help="users per server for #1 (default 2000; smoke 24)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="load generator concurrency (default 16)")
    parser.add_argument("--bcrypt-rounds", type=int, default=4, help="bcrypt rounds for #1 on both servers")
    parser.add_argument(
        "--storm-bcrypt-rounds", type=int, default=12, help="bcrypt rounds for #3 (default 12)"
    )
    parser.add_argument("--only", default="1,2,3,4,5,6", help="comma-separated benchmarks to run (2 needs 1)")
    parser.add_argument(
        "--scaleout-users",
        type=int,
        default=0,
        help="users per configuration for #6 (default 2000; smoke 24)",
    )
    parser.add_argument(
        "--scaleout-rounds", type=int, default=3, help="rounds of #6's configurations (default 3)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    parser.add_argument("--keep-work", action="store_true", help="keep the servers' temporary directories")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.from_args(args)
    only = {part.strip() for part in args.only.split(",")}
    report = Report(settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()})
    work = Path(tempfile.mkdtemp(prefix="login-token-bench-"))
    steps: list[tuple[str, Callable[[], None]]] = [
        ("1", lambda: bench_ours(settings, work, report)),
        ("1", lambda: bench_synapse(settings, work, report)),
        ("3", lambda: bench_storm(settings, work, report)),
        ("4", lambda: bench_stores(settings, report)),
        ("5", lambda: bench_bookkeeping(settings, report)),
        ("6", lambda: bench_scaleout(settings, work, report)),
    ]
    failed = False
    try:
        for key, step in steps:
            if key in only or (key == "1" and "2" in only):
                try:
                    step()
                except Exception as error:  # one broken benchmark must not hide the others
                    failed = True
                    report.notes.append(f"benchmark #{key} failed: {type(error).__name__}: {error}")
                    log(f"benchmark #{key} failed: {error}")
    finally:
        if args.keep_work:
            log(f"servers' files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    judge(settings, report)
    print(render(settings, report))
    path = write_json(settings, report)
    print(f"\nJSON written to {path}")
    if "scaleout" in report.sections:
        picture = scaleout.plot(report.sections["scaleout"], path.with_suffix(".png"))
        print(f"Plot written to {picture}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
