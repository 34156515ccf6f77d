"""Benchmark 3: the reactor stays free. GET /versions latency, idle and during a
storm of get_token+UIA requests whose bcrypt runs at a realistic cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import servers
from benchmarks.harness import Report, Settings, Worker, loadgen, log, phase_summary


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
