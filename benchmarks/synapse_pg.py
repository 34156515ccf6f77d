"""Inside Synapse on PostgreSQL: get_token with UIA, one process against main + worker,
the module against Synapse's built-in.

``python -m benchmarks.synapse_pg [--users N] [--concurrency C] [--rounds R]``

Synapse (the pinned release, ``benchmarks/.venv-synapse``) on a throwaway
PostgreSQL cluster (durable settings, as #6), with Redis and one
``synapse.app.generic_worker``, as the worker guide sets them up; the module
loaded with its state in Synapse's database. Four ways, each run R times with
fresh users of its own, in alternating order so neither always runs first:

- ``builtin main``: Synapse's own get_token (``login_via_existing_session``)
  on the main process;
- ``builtin main+worker``: password and token logins sent to the main process
  and the worker in turn, get_token to the main process (Synapse 1.163's
  generic worker does not serve its built-in get_token: 404 ``M_UNRECOGNIZED``);
- ``module main``: the module's get_token (its path in Synapse) on the main process;
- ``module main+worker``: the module's, operations alternating as above.

Every way runs #1's flow (password login, get_token with one UIA round, token
login) at the given concurrency; the table shows each phase's throughput,
latency and the CPU Synapse's processes and PostgreSQL spent per operation.
Prints the table, and with ``--json FILE`` writes the numbers there too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import servers
from benchmarks.flow import MODULE_IN_SYNAPSE_PATH
from benchmarks.harness import GET_TOKEN_PATH, PHASES, loadgen, log, parts_summary

PG_SETTINGS = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
GENEROUS = {"per_second": 1000, "burst_count": 1000}
MODULE_CONFIG = {"token_lifetime_ms": 120_000, "ratelimit": GENEROUS, "failed_auth_ratelimit": GENEROUS}
WAYS = [
    ("builtin main", GET_TOKEN_PATH, False),
    ("module main", MODULE_IN_SYNAPSE_PATH, False),
    ("module main+worker", MODULE_IN_SYNAPSE_PATH, True),
    ("builtin main+worker", GET_TOKEN_PATH, True),
]


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class Deployment:
    """Synapse's main process and one generic worker on PostgreSQL, with Redis."""

    def __init__(
        self, python: Path, directory: Path, database_args: dict[str, Any], bcrypt_rounds: int
    ) -> None:
        self.children: list[subprocess.Popen[bytes]] = []
        self.main: servers.ServerProcess | None = None
        redis_port = servers.free_port()
        redis = subprocess.Popen(
            [
                *(shutil.which("redis-server") or "redis-server", "--port", str(redis_port)),
                *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=directory,
        )
        self.children.append(redis)
        _wait_for_port(redis_port, redis, "redis-server", 20)
        replication_port = servers.free_port()
        self.main_port = servers.free_port()
        config_path, self.secret = servers.synapse_config(
            python,
            directory,
            bcrypt_rounds=bcrypt_rounds,
            port=self.main_port,
            module_config=MODULE_CONFIG,
            extra={
                "database": {"name": "psycopg2", "args": {**database_args, "cp_min": 5, "cp_max": 10}},
                "redis": {"enabled": True, "host": "127.0.0.1", "port": redis_port},
                "instance_map": {"main": {"host": "127.0.0.1", "port": replication_port}},
            },
        )
        config = yaml.safe_load(config_path.read_text())
        config["listeners"].append(
            {
                "port": replication_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "resources": [{"names": ["replication"]}],
            }
        )
        config_path.write_text(yaml.safe_dump(config))
        self.main = servers.start_synapse(python, config_path, self.main_port)
        self.worker_port = servers.free_port()
        log_config = yaml.safe_load(Path(config["log_config"]).read_text())
        log_config["handlers"]["file"]["filename"] = str(directory / "worker1.log")
        (directory / "worker1.log.config").write_text(yaml.safe_dump(log_config))
        worker_config = directory / "worker1.yaml"
        worker_config.write_text(
            yaml.safe_dump(
                {
                    "worker_app": "synapse.app.generic_worker",
                    "worker_name": "worker1",
                    "worker_listeners": [
                        {
                            "type": "http",
                            "port": self.worker_port,
                            "bind_addresses": ["127.0.0.1"],
                            "resources": [{"names": ["client"]}],
                        }
                    ],
                    "worker_log_config": str(directory / "worker1.log.config"),
                }
            )
        )
        self.worker = subprocess.Popen(
            [
                str(python),
                "-m",
                "synapse.app.generic_worker",
                "-c",
                str(config_path),
                "-c",
                str(worker_config),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=directory,
        )
        self.children.append(self.worker)
        _wait_for_port(self.worker_port, self.worker, "the Synapse worker")

    @property
    def main_url(self) -> str:
        return f"http://127.0.0.1:{self.main_port}"

    @property
    def worker_url(self) -> str:
        return f"http://127.0.0.1:{self.worker_port}"

    def stop(self) -> None:
        for process in reversed(self.children[1:]):
            _stop(process)
        if self.main is not None:
            self.main.stop()
        _stop(self.children[0])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.pgcluster import PostgresCluster

    python, detail = servers.ensure_synapse(log)
    if python is None:
        raise SystemExit(f"Synapse is not available: {detail}")
    log(f"Synapse {detail}; starting a throwaway PostgreSQL cluster")
    cluster = PostgresCluster.create(settings=PG_SETTINGS)
    directory = Path(tempfile.mkdtemp(prefix="ltm-synapse-pg-"))
    deployment: Deployment | None = None
    sampler: servers.CpuSampler | None = None
    try:
        database = cluster.create_database("synapse")
        deployment = Deployment(python, directory, database.args, args.bcrypt_rounds)
        assert deployment.main is not None
        roots = {"main": deployment.main.pid, "worker": deployment.worker.pid}
        postmaster = cluster.postmaster_pid()
        if postmaster is not None:
            roots["postgres"] = postmaster
        password = servers.new_password()
        plans: list[tuple[str, str, bool, list[str], list[str]]] = []
        for round_number in range(args.rounds):
            order = WAYS if round_number % 2 == 0 else list(reversed(WAYS))
            for way, path, both in order:
                run_number = len(plans)
                users = [f"u{run_number}_{i}" for i in range(args.users)]
                warmup = [f"w{run_number}_{i}" for i in range(args.warmup_users)]
                plans.append((way, path, both, users, warmup))
        everyone = [user for *_, users, warmup in plans for user in users + warmup]
        log(f"registering {len(everyone)} users")
        registered = loadgen(
            {
                "kind": "register_synapse",
                "base_url": deployment.main_url,
                "users": everyone,
                "password": password,
                "shared_secret": deployment.secret,
                "concurrency": 8,
            }
        )["phases"][0]
        if registered["errors"]:
            raise RuntimeError(f"registration failed: {registered['error_samples']}")
        log(f"idle again after {deployment.main.wait_until_idle():.0f} s")
        sampler = servers.CpuSampler(roots)
        parts: dict[str, list[list[dict[str, Any]]]] = {way: [] for way, _, _ in WAYS}
        for way, path, both, users, warmup in plans:
            urls = [deployment.main_url, deployment.worker_url] if both else [deployment.main_url]
            # Synapse's own get_token is served by the main process only.
            get_token_urls = urls if path == MODULE_IN_SYNAPSE_PATH else [deployment.main_url]
            log(f"{way}: flow for {len(users)} users at concurrency {args.concurrency}")
            raw = loadgen(
                {
                    "kind": "flow",
                    "base_url": urls[0],
                    "base_urls": urls,
                    "get_token_base_urls": get_token_urls,
                    "users": users,
                    "warmup_users": warmup,
                    "password": password,
                    "concurrency": args.concurrency,
                    "get_token_path": path,
                }
            )
            if "fatal" in raw:
                raise RuntimeError(f"{way}: {raw['fatal']}: {raw['phases'][0]['error_samples']}")
            parts[way].append(raw["phases"])
        sampler.stop()
        results: dict[str, Any] = {"synapse": detail, "settings": vars(args), "ways": {}}
        for way, runs in parts.items():
            results["ways"][way] = {}
            for key, _ in PHASES:
                phase_runs = [next(p for p in run if p["name"] == key) for run in runs]
                summary = parts_summary(phase_runs, None)
                for group in roots:
                    cpu = sum(sampler.seconds_between(group, p["t_start"], p["t_end"]) for p in phase_runs)
                    summary[f"{group}_cpu_ms_per_op"] = 1000 * cpu / max(summary["ops"], 1)
                summary["runs_ops_per_s"] = [p["ops"] / max(p["seconds"], 1e-9) for p in phase_runs]
                results["ways"][way][key] = summary
        return results
    finally:
        if sampler is not None:
            sampler.stop()
        if deployment is not None:
            deployment.stop()
        cluster.destroy()
        shutil.rmtree(directory, ignore_errors=True)


def table(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        f"Synapse {results['synapse']} on PostgreSQL (fsync on), {settings['users']} users x "
        f"{settings['rounds']} runs per way, concurrency {settings['concurrency']}, bcrypt_rounds "
        f"{settings['bcrypt_rounds']}; get_token ops are UIA rounds of 2 requests; CPU ms per op: "
        "main / worker / PostgreSQL",
        f"{'phase':<16} {'way':<20} {'ops/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  cpu ms/op",
    ]
    for key, label in PHASES:
        for way, _, _ in WAYS:
            s = results["ways"][way][key]
            cpu = " / ".join(
                f"{s.get(f'{g}_cpu_ms_per_op', 0.0):.1f}" for g in ("main", "worker", "postgres")
            )
            lines.append(
                f"{label:<16} {way:<20} {s['ops_per_s']:7.1f} {s['p50_ms']:8.1f} {s['p99_ms']:8.1f}"
                f" {s['errors']:6d}  {cpu}"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=300, help="users per run (default 300)")
    parser.add_argument("--warmup-users", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each way (default 2)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bcrypt-rounds", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    results = run(args)
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
