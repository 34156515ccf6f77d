"""The benchmark command's smoke mode still works end to end.

This is not a timed test: it only checks that ``python -m benchmarks --smoke``
(real servers, the load generator, the store and bookkeeping workers) runs to
the end and prints its table with numbers, so the benchmarks cannot rot.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERDICT = re.compile(r"\s(MET|MISSED|SKIPPED)$")
NUMBER = re.compile(r"\d[\d,]*\.\d+")


@pytest.mark.timeout(120)
def test_smoke_mode_prints_a_table_of_measurements_and_targets(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout

    flow_rows = [line for line in out.splitlines() if line.startswith("token login ") and " ours " in line]
    assert flow_rows and NUMBER.search(flow_rows[0]), out
    targets = [line for line in out.splitlines() if line.startswith("#") and VERDICT.search(line)]
    measured = [line for line in targets if not line.endswith("SKIPPED")]
    assert len(targets) >= 10, out
    assert len(measured) >= 10, out
    assert all(NUMBER.search(line) or re.search(r"\s\d+\s", line) for line in measured), out
    assert "Synapse comparison skipped (smoke mode)" in out

    # Tokens never reach the output (login tokens start mlt_, access tokens mat_).
    assert "mlt_" not in out + result.stderr
    assert "mat_" not in out + result.stderr

    written = list(tmp_path.glob("smoke-*.json"))
    assert len(written) == 1
    payload = json.loads(written[0].read_text())
    assert payload["targets"] and all("result" in target for target in payload["targets"])

    # #6, scale-out: every configuration measured (PostgreSQL's too, where it can run), and the plot.
    scale = payload["sections"]["scaleout"]
    configured = {config["key"] for config in scale["configs"]}
    assert {"sqlite-1", "sqlite-shared-1", "sqlite-2"} <= configured
    if os.environ.get("CI"):
        assert {"postgres-1", "postgres-2"} <= configured, scale["postgres_skipped"]
    for config in scale["configs"]:
        for phase in config["phases"].values():
            assert phase["errors"] == 0 and phase["ops_per_s"] > 0, config
            # Too few operations in smoke mode for a steady figure, but it is read.
            assert isinstance(phase["server_cpu_ms_per_op"], float), config
    assert "#6 Scale-out" in out
    picture = written[0].with_suffix(".png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(120)
def test_the_attack_benchmark_runs_in_smoke_mode() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.attack", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for heading in ("1. another user's login", "2. lone surrogates", "3. path spellings", "4. file modes"):
        assert heading in result.stdout, result.stdout
    assert re.search(r"bob's password login, idle: +p50 \d", result.stdout), result.stdout
    assert re.search(r"\.demo-password +0[0-7]{3}", result.stdout), result.stdout
    assert "mlt_" not in result.stdout + result.stderr and "mat_" not in result.stdout + result.stderr


@pytest.mark.timeout(240)
def test_the_synapse_postgresql_benchmark_runs_small(tmp_path: Path) -> None:
    """Synapse on PostgreSQL with a worker: the module and the built-in, every way, no errors."""
    from tests.synapse_helpers import synapse_python

    synapse_python()  # skips (or fails under CI) without the pinned Synapse
    numbers = tmp_path / "synapse_pg.json"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.synapse_pg"),
            *("--users", "4", "--warmup-users", "2", "--rounds", "1", "--json", str(numbers)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ways = json.loads(numbers.read_text())["ways"]
    assert set(ways) == {"builtin main", "module main", "module main+worker", "builtin main+worker"}
    for way in ways.values():
        for phase in ("password_login", "get_token_uia", "token_login"):
            assert way[phase]["ops"] == 4 and way[phase]["errors"] == 0, way
    assert re.search(r"get_token \+ UIA +module main\+worker +\d", result.stdout), result.stdout
