"""``python -m benchmarks``: run every benchmark, print a table with targets, write JSON.

Each benchmark is a module of its own that starts real servers on 127.0.0.1
and runs its measurements as separate processes (flow.py: #1 and #2, storm.py:
#3, stores.py: #4, bookkeeping.py: #5, scaleout.py: #6); report.py judges every
target, prints the table and writes the JSON. This command runs them in turn.
See README.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from benchmarks import bookkeeping, flow, scaleout, stores, storm
from benchmarks.harness import Report, Settings, log
from benchmarks.report import judge, render, write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
        ("1", lambda: flow.bench_ours(settings, work, report)),
        ("1", lambda: flow.bench_synapse(settings, work, report)),
        ("3", lambda: storm.bench_storm(settings, work, report)),
        ("4", lambda: stores.bench_stores(settings, report)),
        ("5", lambda: bookkeeping.bench_bookkeeping(settings, report)),
        ("6", lambda: scaleout.bench_scaleout(settings, work, report)),
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
