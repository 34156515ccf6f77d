"""Benchmarks 1 and 2: the whole flow (password login, get_token with UIA, token
login) against the reference host and, side by side in one Synapse process,
Synapse's built-in get_token and the module's; and the GET /versions ceiling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import servers
from benchmarks.harness import (
    GET_TOKEN_PATH,
    PHASES,
    Report,
    Settings,
    loadgen,
    log,
    parts_summary,
    phase_summary,
)

# Where Synapse serves the module's get_token (the reverse proxy's rewrite target).
MODULE_IN_SYNAPSE_PATH = "/_synapse/client/login_token/v1/login/get_token"


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
