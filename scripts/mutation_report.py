"""Mutation score per file from the last mutmut run (``mutants/``), for scripts/mutation.

The files are those in ``[tool.mutmut] only_mutate`` in pyproject.toml. A
surviving mutant named in docs/mutation.md (equivalent to the original, or
changing nothing a test can observe) is "accepted" and left out of the score;
any other survivor is listed as new, and the exit status is 1 while there are
any, so each run only asks about mutants nobody has looked at yet.

Code that runs only inside another process (the Synapse adapter, which imports
Synapse and so runs only in Synapse's process) has no in-process test for mutmut
to link. A glob in docs/mutation.md ending in ``*`` (for example
``login_token_module.synapse.adapter.*``) counts such "no tests" mutants as
"elsewhere": shown in a column of their own and left out of the score, since
mutation testing did not measure them. A mutant the tests did reach and let
survive is never covered by a glob.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCEPTED_DOC = ROOT / "docs" / "mutation.md"
MUTANT_NAME = re.compile(r"`(login_token_module\.[^`\s]+__mutmut_\d+)`")
ELSEWHERE_GLOB = re.compile(r"`(login_token_module\.[^`\s*]+)\*`")

# mutmut's exit codes for a mutant's test run, as its own `mutmut results` names them.
STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "timeout",
    37: "type check",
    -11: "crashed",
    -9: "crashed",
    None: "not run",
}
# A mutant the tests noticed: they failed, hung, or crashed on it.
DETECTED = {"killed", "timeout", "crashed", "type check"}

# The self-check (scripts/mutation runs it after every run): mutants that are
# equivalent to the original code, each with the text its function must hold.
# No test can fail on them, so each must survive every run. One recorded as
# killed means a test failed for a reason that was not the mutant (in the past:
# two mutants' test runs at once sharing one Twisted reactor), and then any
# other kill of the run may be false too. They live in tokens.py's minting and
# hashing, which nearly every test reaches: a run that can go wrong goes wrong
# there first. If tokens.py is edited and mutmut renumbers them, the check says
# so; find the new names with `.venv/bin/mutmut show`.
SELF_CHECK = {
    "login_token_module.tokens.x__checksum__mutmut_8": 'zlib.crc32(text.encode("ASCII"))',
    "login_token_module.tokens.x_generate_token__mutmut_10": "secrets.token_bytes(_RANDOM_BYTES), )",
    "login_token_module.tokens.x_generate_token__mutmut_11": 'secrets.token_bytes(None), "big")',
    "login_token_module.tokens.x_hash_token__mutmut_4": 'token.encode("UTF-8")',
}


def target_files() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(config["only_mutate"])


def read_accepted_doc() -> tuple[set[str], tuple[str, ...]]:
    """The accepted mutants' names, and the "elsewhere" globs' prefixes, from docs/mutation.md."""
    text = ACCEPTED_DOC.read_text() if ACCEPTED_DOC.exists() else ""
    return set(MUTANT_NAME.findall(text)), tuple(ELSEWHERE_GLOB.findall(text))


def load_results(path: str) -> dict[str, str]:
    meta = ROOT / "mutants" / f"{path}.meta"
    if not meta.exists():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: STATUS.get(code, "suspicious") for name, code in codes.items()}


def mutant_source(name: str) -> str | None:
    """The source of mutant ``name``'s function in mutants/, or None if there is no such mutant."""
    module, _, function = name.rpartition(".")
    path = ROOT / "mutants" / (module.replace(".", "/") + ".py")
    if not path.exists():
        return None
    match = re.search(
        rf"^ *(?:async )?def {re.escape(function)}\(.*?(?=^\S|^ *(?:async )?def )",
        path.read_text(),
        re.M | re.S,
    )
    return match.group(0) if match else None


def self_check() -> int:
    """0 when every SELF_CHECK mutant survived; otherwise says which did not, and why that matters."""
    stale = [name for name, text in SELF_CHECK.items() if text not in (mutant_source(name) or "")]
    if stale:
        print("\nMUTATION SELF-CHECK CANNOT RUN: these mutants no longer make the change it expects")
        print("(their file was edited and mutmut renumbered them); update SELF_CHECK in")
        print("scripts/mutation_report.py with the new names (.venv/bin/mutmut show NAME):")
        for name in stale:
            print(f"  {name}  (expected: {SELF_CHECK[name]})")
        return 2
    results: dict[str, str] = {}
    for name in SELF_CHECK:
        path = name.rpartition(".")[0].replace(".", "/") + ".py"
        results[name] = load_results(path).get(name, "not run")
    wrong = {name: status for name, status in results.items() if status != "survived"}
    if not wrong:
        print(f"\nSelf-check passed: the {len(SELF_CHECK)} equivalent mutants all survived.")
        return 0
    print("\nMUTATION SELF-CHECK FAILED: these mutants are equivalent to the original code, so no")
    print("test can fail on them, yet this run did not record them as survivors:")
    for name, status in sorted(wrong.items()):
        print(f"  {name}  ({status})")
    print("A test failed (or was not run) for a reason that was not the mutant, so other kills")
    print("of this run may be false too. See docs/mutation.md, 'Settings, and why'. To run one")
    print("mutant at a time: MUTATION_JOBS=1 bash scripts/mutation ...")
    return 3


def percent(score: float | None) -> str:
    return "      -" if score is None else f"{score:6.1f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, help="also write the per-file numbers to this file")
    parser.add_argument(
        "--self-check-names", action="store_true", help="print the self-check's mutant names and stop"
    )
    parser.add_argument(
        "--self-check", action="store_true", help="check that the self-check's mutants survived, and stop"
    )
    args = parser.parse_args()
    if args.self_check_names:
        print("\n".join(SELF_CHECK))
        return 0
    if args.self_check:
        return self_check()

    accepted, elsewhere_prefix = read_accepted_doc()
    rows: list[dict[str, object]] = []
    new_survivors: list[tuple[str, str]] = []
    seen_survivors: set[str] = set()
    not_run_names: set[str] = set()
    header = (
        f"{'file':44} {'mutants':>7} {'killed':>7} {'survived':>8} {'accepted':>8} {'new':>5}"
        f" {'not run':>7} {'elsewhere':>9} {'score':>7}"
    )
    print(header)
    print("-" * len(header))
    totals: Counter[str] = Counter()
    for path in target_files():
        results = load_results(path)
        if not results:
            print(f"{path:44} (no results: run scripts/mutation first)")
            continue
        counts = Counter(results.values())
        detected = sum(counts[status] for status in DETECTED)
        not_run = counts["not run"]
        not_run_names.update(name for name, status in results.items() if status == "not run")
        elsewhere = {
            name
            for name, status in results.items()
            if status == "no tests" and name.startswith(elsewhere_prefix)
        }
        missed = {
            name: status
            for name, status in results.items()
            if status not in DETECTED and status != "not run" and name not in elsewhere
        }
        seen_survivors.update(missed)
        accepted_here = sum(1 for name in missed if name in accepted)
        new_here = sorted((name, status) for name, status in missed.items() if name not in accepted)
        new_survivors.extend(new_here)
        scored = len(results) - not_run - accepted_here - len(elsewhere)
        score = 100.0 * detected / scored if scored else None
        numbers = {
            "mutants": len(results),
            "killed": detected,
            "survived": len(missed),
            "accepted": accepted_here,
            "new": len(new_here),
            "not run": not_run,
            "elsewhere": len(elsewhere),
        }
        totals.update(numbers)
        rows.append({"file": path, **numbers, "score": None if score is None else round(score, 1)})
        print(
            f"{path:44} {len(results):7} {detected:7} {len(missed):8} {accepted_here:8} {len(new_here):5}"
            f" {not_run:7} {len(elsewhere):9} {percent(score)}"
        )
    if rows:
        scored = totals["mutants"] - totals["not run"] - totals["accepted"] - totals["elsewhere"]
        total_score = 100.0 * totals["killed"] / scored if scored else None
        print("-" * len(header))
        print(
            f"{'all':44} {totals['mutants']:7} {totals['killed']:7} {totals['survived']:8}"
            f" {totals['accepted']:8} {totals['new']:5} {totals['not run']:7} {totals['elsewhere']:9}"
            f" {percent(total_score)}"
        )
        print(
            "score = killed / (mutants - not run - accepted - elsewhere); killed counts time-outs and"
            " crashes too"
        )
        if totals["elsewhere"]:
            print(
                f"{totals['elsewhere']} mutant(s) of code that runs only in another process were not"
                " measured (docs/mutation.md says where that code is tested)"
            )
        if totals["not run"]:
            print(f"{totals['not run']} mutant(s) not run yet: bash scripts/mutation --resume")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")

    # Accepted mutants that were run and killed, or that no longer exist (an edit renumbered them).
    # Those of code measured elsewhere (scripts/mutation_synapse.py) are that runner's to check.
    stale = sorted(
        name
        for name in accepted - seen_survivors - not_run_names
        if not (elsewhere_prefix and name.startswith(elsewhere_prefix))
    )
    if stale:
        print(
            f"\n{len(stale)} mutant(s) in docs/mutation.md no longer survive (killed, or renamed by edits):"
        )
        for name in stale:
            print(f"  {name}")
    if new_survivors:
        print(f"\n{len(new_survivors)} surviving mutant(s) not in docs/mutation.md:")
        for name, status in new_survivors:
            print(f"  {name}  ({status})")
        print(
            "See one with: .venv/bin/mutmut show NAME. Kill it with a test, or explain it in docs/mutation.md"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
