"""Benchmark 6: scale-out. One worker against two, SQLite against PostgreSQL, in one run.

Each configuration is the reference host as an operator runs it (``serve -c
FILE``, or ``serve -c FILE --workers 2``), on a fresh database, driven by the
same load generator flow as #1 (password login, get_token with one UIA round,
token login; N users, one operation each, at concurrency 16):

- SQLite, 1 worker: the default (UIA sessions and rate limits in memory);
- SQLite, 1 worker, shared state: the same with them in the SQLite file, to
  show what sharing costs on its own;
- SQLite, 2 workers: one port, state shared through the file;
- PostgreSQL, 1 worker and 2 workers: host and module on one database of a
  throwaway cluster (tests/pgcluster.py) started for the run.

The machine has 2 cores, shared by the load generator, the workers and
PostgreSQL, so requests per second say more about the machine than about the
code. Beside them the run reports CPU time per operation, read from the
processes' own kernel counters (``CpuSampler``): the server's (its workers
summed) and PostgreSQL's (the postmaster and its backends), which stays
comparable when throughput does not. The configurations run in turn, ``rounds``
times over (interleaved, so a slow minute hits all of them), and each number
is the median over rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import servers
from benchmarks.harness import Report, Settings, loadgen, log, phase_summary

# A benchmark cluster keeps fsync on (unlike the tests') and commits without
# waiting for the disk, like the SQLite store (WAL, synchronous=NORMAL): a
# crash of the machine can lose the newest commits, a crash of a process cannot.
PG_SETTINGS = {"fsync": "on", "synchronous_commit": "off", "full_page_writes": "on"}

PHASES = [("get_token_uia", "get_token + UIA"), ("token_login", "token login")]


@dataclass(frozen=True)
class ScaleConfig:
    key: str
    label: str
    store: str
    workers: int


CONFIGS = [
    ScaleConfig("sqlite-1", "SQLite, 1 worker", "sqlite", 1),
    ScaleConfig("sqlite-shared-1", "SQLite, 1 worker, shared state", "sqlite-shared", 1),
    ScaleConfig("sqlite-2", "SQLite, 2 workers", "sqlite", 2),
    ScaleConfig("postgres-1", "PostgreSQL, 1 worker", "postgres", 1),
    ScaleConfig("postgres-2", "PostgreSQL, 2 workers", "postgres", 2),
]

Loadgen = Callable[[dict[str, Any]], dict[str, Any]]
Summarize = Callable[[dict[str, Any], "servers.ServerProcess | None"], dict[str, Any]]
Log = Callable[[str], None]


def _start_cluster(log: Log) -> tuple[Any, str | None]:
    """A throwaway PostgreSQL cluster, or None and why not."""
    try:
        from tests.pgcluster import ClusterUnavailableError, PostgresCluster, driver_missing_reason
    except ImportError as error:
        return None, f"tests.pgcluster cannot be imported: {error}"
    reason = driver_missing_reason()
    if reason is not None:
        return None, reason
    log("#6 scale-out: starting a throwaway PostgreSQL cluster")
    try:
        return PostgresCluster.create(settings=PG_SETTINGS), None
    except (ClusterUnavailableError, OSError) as error:
        return None, str(error)


def _measure(
    config: ScaleConfig,
    directory: Path,
    cluster: Any,
    *,
    users: int,
    warmup: int,
    concurrency: int,
    bcrypt_rounds: int,
    loadgen: Loadgen,
    summarize: Summarize,
) -> dict[str, Any]:
    database = cluster.create_database("bench") if config.store == "postgres" else None
    path = servers.host_config(directory, bcrypt_rounds=bcrypt_rounds, store=config.store, postgres=database)
    password = servers.new_password()
    names = [f"scale{i}" for i in range(users)]
    warm = [f"warm{i}" for i in range(warmup)]
    servers.create_host_users(path, names + warm, password, bcrypt_rounds)
    server = servers.start_host(path, name=config.key, workers=config.workers)
    roots = {"server": server.pid}
    postmaster = cluster.postmaster_pid() if database is not None else None
    if postmaster is not None:
        roots["postgres"] = postmaster
    sampler = servers.CpuSampler(roots)
    try:
        raw = loadgen(
            {
                "kind": "flow",
                "base_url": server.base_url,
                "users": names,
                "warmup_users": warm,
                "password": password,
                "concurrency": concurrency,
            }
        )
    finally:
        sampler.stop()
        server.stop()
    if "fatal" in raw:
        raise RuntimeError(f"{config.label}: {raw['fatal']}: {raw['phases'][0]['error_samples']}")
    result: dict[str, Any] = {}
    for phase in raw["phases"]:
        summary = summarize(phase, None)
        ops = max(1, int(phase["ops"]))
        for group in ("server", "postgres"):
            seconds = (
                sampler.seconds_between(group, phase["t_start"], phase["t_end"]) if group in roots else 0.0
            )
            summary[f"{group}_cpu_ms_per_op"] = 1000 * seconds / ops
        result[phase["name"]] = summary
    return result


def measure(
    *,
    users: int,
    warmup: int,
    concurrency: int,
    bcrypt_rounds: int,
    rounds: int,
    work: Path,
    loadgen: Loadgen,
    summarize: Summarize,
    log: Log,
) -> dict[str, Any]:
    cluster, why_not = _start_cluster(log)
    configs = [c for c in CONFIGS if cluster is not None or c.store != "postgres"]
    section: dict[str, Any] = {
        "users": users,
        "concurrency": concurrency,
        "bcrypt_rounds": bcrypt_rounds,
        "rounds": rounds,
        "postgres_settings": PG_SETTINGS if cluster is not None else None,
        "postgres_skipped": why_not,
        "configs": [],
    }
    runs: dict[str, list[dict[str, Any]]] = {c.key: [] for c in configs}
    try:
        if cluster is not None:
            section["postgres_version"] = cluster.query("postgres", "SHOW server_version")[0][0]
        for round_number in range(rounds):
            for config in configs:
                log(f"#6 scale-out, round {round_number + 1}/{rounds}: {config.label}, {users} users")
                runs[config.key].append(
                    _measure(
                        config,
                        work / f"scale-{config.key}-{round_number}",
                        cluster,
                        users=users,
                        warmup=warmup,
                        concurrency=concurrency,
                        bcrypt_rounds=bcrypt_rounds,
                        loadgen=loadgen,
                        summarize=summarize,
                    )
                )
    finally:
        if cluster is not None:
            cluster.destroy()
    for config in configs:
        phases: dict[str, Any] = {}
        for key, _ in PHASES:
            per_round = [run[key] for run in runs[config.key]]
            phases[key] = {
                metric: statistics.median(r[metric] for r in per_round)
                for metric in (
                    "ops_per_s",
                    "p50_ms",
                    "p99_ms",
                    "server_cpu_ms_per_op",
                    "postgres_cpu_ms_per_op",
                )
            } | {"errors": sum(r["errors"] for r in per_round), "rounds": per_round}
        section["configs"].append(
            {"key": config.key, "label": config.label, "store": config.store, "workers": config.workers}
            | {"phases": phases}
        )
    return section


def bench_scaleout(settings: Settings, work: Path, report: Report) -> None:
    section = measure(
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


def _config(section: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((c for c in section["configs"] if c["key"] == key), None)


def ratios(section: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(comparison, phase, ops/s ratio, CPU per op ratio), CPU counting PostgreSQL's too."""
    pairs = [
        ("SQLite: 2 workers / 1", "sqlite-2", "sqlite-1"),
        ("SQLite: shared / memory state", "sqlite-shared-1", "sqlite-1"),
        ("PostgreSQL: 2 workers / 1", "postgres-2", "postgres-1"),
        ("1 worker: PostgreSQL / SQLite", "postgres-1", "sqlite-1"),
        ("2 workers: PostgreSQL / SQLite", "postgres-2", "sqlite-2"),
    ]
    rows = []
    for name, top, bottom in pairs:
        a, b = _config(section, top), _config(section, bottom)
        if a is None or b is None:
            continue
        for key, label in PHASES:
            pa, pb = a["phases"][key], b["phases"][key]
            cpu_a = pa["server_cpu_ms_per_op"] + pa["postgres_cpu_ms_per_op"]
            cpu_b = pb["server_cpu_ms_per_op"] + pb["postgres_cpu_ms_per_op"]
            rows.append(
                (name, label, pa["ops_per_s"] / pb["ops_per_s"], cpu_a / cpu_b if cpu_b else float("nan"))
            )
    return rows


def plot(section: dict[str, Any], path: Path) -> Path:
    """Requests per second and CPU per operation, per configuration, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = section["configs"]
    labels = [c["label"].replace(", ", "\n", 1) for c in configs]
    colours = ["#4c72b0", "#8fa8d8", "#2a4d8f", "#dd8452", "#a8521c"][: len(configs)]
    figure, axes = plt.subplots(2, len(PHASES), figsize=(12, 8), constrained_layout=True)
    for column, (key, title) in enumerate(PHASES):
        top, bottom = axes[0][column], axes[1][column]
        ops = [c["phases"][key]["ops_per_s"] for c in configs]
        bars = top.bar(range(len(configs)), ops, color=colours)
        top.bar_label(bars, fmt="%.0f", fontsize=8)
        top.set_title(f"{title}: operations per second (higher is better)", fontsize=10)
        server = [c["phases"][key]["server_cpu_ms_per_op"] for c in configs]
        database = [c["phases"][key]["postgres_cpu_ms_per_op"] for c in configs]
        bottom.bar(range(len(configs)), server, color=colours, label="server workers")
        stacked = bottom.bar(
            range(len(configs)), database, bottom=server, color="#cccccc", hatch="//", label="PostgreSQL"
        )
        bottom.bar_label(
            stacked, labels=[f"{s + d:.2f}" for s, d in zip(server, database, strict=True)], fontsize=8
        )
        bottom.set_title(f"{title}: CPU ms per operation (lower is better)", fontsize=10)
        bottom.legend(fontsize=8, loc="upper left")
        for axis in (top, bottom):
            axis.set_xticks(range(len(configs)), labels, fontsize=8)
            axis.grid(axis="y", alpha=0.3)
            axis.margins(y=0.15)
    figure.suptitle(
        f"Scale-out: {section['users']} users, concurrency {section['concurrency']},"
        f" median of {section['rounds']} rounds (2 shared cores: read CPU per operation)",
        fontsize=11,
    )
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
