"""Mutation testing of the code that runs only inside Synapse (the Synapse adapter).

mutmut runs each mutant's tests in its own process and links a mutant to the
tests that reach its function in that process. The Synapse adapter runs only
in a Synapse process (it imports Synapse, which lives in a virtualenv of its
own), so mutmut finds no test for any of its mutants. This script measures
them the other way round: for one mutant at a time, it runs the tests against
a real Synapse (tests/test_synapse.py and tests/test_synapse_startup.py) with
Synapse loading the module from mutmut's mutated copy (``mutants/``) and that
mutant switched on, and records whether a test failed.

How: Synapse's Python gets ``mutants/`` first on its PYTHONPATH (ahead of the
project's editable install) and ``MUTANT_UNDER_TEST`` in its environment, which
is how mutmut itself switches a mutant on. The mutated code imports mutmut's
trampoline, which is not installed beside Synapse, so a folder with just the
trampoline's few files of mutmut is put on the path too. Before any mutant it
checks that this works: the tests pass with no mutant, and fail with mutmut's
"fail" switch (every mutated function raises) on.

Usage (after any `bash scripts/mutation` run has made ``mutants/``, and with
`.venv/bin/python -m benchmarks.servers ensure-synapse` done once):

    .venv/bin/python scripts/mutation_synapse.py                 # every adapter mutant
    .venv/bin/python scripts/mutation_synapse.py '*check_user_password__mutmut_*'
    .venv/bin/python scripts/mutation_synapse.py --tests 'tests/test_synapse.py -k password' GLOB...

Results go to mutants/synapse-mutants.json (name -> status, seconds), merged
with earlier runs, and a summary is printed; the exit status is 1 if a mutant
survived that docs/mutation.md does not list.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutation_report import read_accepted_doc

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
SOURCE = "login_token_module/synapse/adapter.py"
RESULTS = MUTANTS / "synapse-mutants.json"
DEFAULT_TESTS = ["tests/test_synapse.py", "tests/test_synapse_startup.py"]
# mutmut's files that its trampoline needs at run time (stats mode is never used here).
TRAMPOLINE_FILES = [
    "core.py",
    "mutation/trampoline.py",
    "mutation/trampoline_templates.py",
    "utils/format_utils.py",
]
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
# A mutant's test run ends after this long (a mutant that makes a request hang).
TIMEOUT = 900


def trampoline_folder(into: Path) -> Path:
    """A folder holding only the part of mutmut the mutated code imports."""
    import mutmut

    installed = Path(mutmut.__file__).parent
    package = into / "mutmut"
    for name in TRAMPOLINE_FILES:
        target = package / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(installed / name, target)
    for folder in (package, package / "mutation", package / "utils"):
        (folder / "__init__.py").touch()
    (package / "stats.py").write_text(
        "def record_trampoline_hit(name, caller=None):\n"
        "    raise RuntimeError('mutmut stats are not collected inside Synapse')\n"
    )
    return into


def mutant_names(globs: list[str]) -> list[str]:
    meta = MUTANTS / f"{SOURCE}.meta"
    names = sorted(json.loads(meta.read_text())["exit_code_by_key"])
    if not globs:
        return names
    return [name for name in names if any(fnmatch.fnmatchcase(name, glob) for glob in globs)]


def run_tests(mutant: str, tests: list[str], path: str) -> tuple[str, float, str]:
    """Run ``tests`` with ``mutant`` switched on inside Synapse: (status, seconds, output's tail)."""
    env = {**os.environ, "MUTANT_UNDER_TEST": mutant, "PYTHONPATH": path}
    started = time.monotonic()
    try:
        done = subprocess.run(  # noqa: S603 (our own Python, running pytest on our tests)
            [*PYTEST, *tests],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started, ""
    seconds = time.monotonic() - started
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    # pytest: 0 all passed, 1 some failed; anything else (interrupted, usage, no tests) is not a verdict.
    status = {0: "survived", 1: "killed"}.get(done.returncode, f"error {done.returncode}")
    if status == "survived" and " skipped" in tail and " passed" not in tail:
        status = "error (all skipped)"
    return status, seconds, tail


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("globs", nargs="*", help="mutant names or globs (default: every adapter mutant)")
    parser.add_argument(
        "--tests",
        type=shlex.split,
        default=DEFAULT_TESTS,
        help="pytest's arguments, in one string (default: the two Synapse test files)",
    )
    args = parser.parse_args()

    mutated = MUTANTS / SOURCE
    if not mutated.exists():
        print("No mutants/: run bash scripts/mutation (any run, even one glob) first.", file=sys.stderr)
        return 2
    if (ROOT / SOURCE).stat().st_mtime > mutated.stat().st_mtime:
        print(f"{SOURCE} changed since mutants/ was made: run bash scripts/mutation again.", file=sys.stderr)
        return 2
    names = mutant_names(args.globs)
    if not names:
        print("No adapter mutant matches.", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="ltm-mutmut-") as temp:
        path = os.pathsep.join([str(trampoline_folder(Path(temp))), str(MUTANTS)])
        for check, expected in (("", "survived"), ("fail", "killed")):
            status, seconds, tail = run_tests(check, args.tests, path)
            if status != expected:
                what = "with no mutant" if not check else "with every mutated function raising"
                print(f"Set-up check failed: {what}, the tests gave {status!r}, not {expected!r}:\n{tail}")
                return 2
            print(f"set-up check ({check or 'no mutant'}): {status} in {seconds:.0f} s", flush=True)

        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        started = time.monotonic()
        for index, name in enumerate(names, 1):
            status, seconds, _ = run_tests(name, args.tests, path)
            results[name] = {"status": status, "seconds": round(seconds, 1), "tests": args.tests}
            RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
            print(f"[{index}/{len(names)}] {status:9} {seconds:5.0f} s  {name}", flush=True)
        elapsed = time.monotonic() - started

    accepted, _ = read_accepted_doc()
    ran = {name: results[name]["status"] for name in names}
    killed = sum(1 for status in ran.values() if status in ("killed", "timeout"))
    survivors = sorted(name for name, status in ran.items() if status == "survived")
    errors = sorted(name for name, status in ran.items() if status.startswith("error"))
    new = [name for name in survivors if name not in accepted]
    print(
        f"\n{len(ran)} mutants in {elapsed / 60:.1f} min: {killed} killed, {len(survivors)} survived"
        f" ({len(survivors) - len(new)} accepted in docs/mutation.md), {len(errors)} errors"
    )
    for name in errors:
        print(f"  error: {name} ({ran[name]})")
    for name in new:
        print(f"  survived, not in docs/mutation.md: {name}")
    return 1 if new or errors else 0


if __name__ == "__main__":
    sys.exit(main())
