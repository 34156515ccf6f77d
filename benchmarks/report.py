"""The benchmarks' report: each target judged, the table printed, the JSON written."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import scaleout
from benchmarks.harness import PHASES, Report, Settings, Target
from benchmarks.stats import ratio

# (phase, label, wanted, lowest ratio that meets it): the module inside Synapse
# against Synapse's built-in version in the same process.
MODULE_IN_SYNAPSE_TARGETS = [
    ("get_token_uia", "get_token+UIA", ">= 1x", 1.0),
    ("token_login", "token login", ">= 0.9x", 0.9),
]


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
