"""What every benchmark's driver shares: the settings, the report, child processes.

Each benchmark is a module of its own (``flow.py`` #1 and #2, ``storm.py`` #3,
``stores.py`` #4, ``bookkeeping.py`` #5, ``scaleout.py`` #6), with a driver that
``run.py`` calls; the drivers start servers and ``python -m benchmarks.X`` child
processes through what is here. This file imports only the standard library
and ``stats.py``, so a measuring child that imports its own module stays lean.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from benchmarks.stats import summarize_ms

if TYPE_CHECKING:
    from benchmarks.servers import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
GET_TOKEN_PATH = "/_matrix/client/v1/login/get_token"
PHASES = [
    ("password_login", "password login"),
    ("get_token_uia", "get_token + UIA"),
    ("token_login", "token login"),
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


def phase_summary(phase: dict[str, Any], server: ServerProcess | None) -> dict[str, Any]:
    return parts_summary([phase], server)


def parts_summary(parts: list[dict[str, Any]], server: ServerProcess | None) -> dict[str, Any]:
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


def worker_result(module: str, args: list[str], timeout: float = 1800) -> dict[str, Any]:
    return Worker(module, args).result(timeout)
