"""What keeps mutation testing's side-by-side runs independent (docs/mutation.md, "Settings, and why").

mutmut forks each mutant's test run from one server process. Anything that
process made before the fork is shared by every run at once; a Twisted reactor
made there is one epoll instance and one waker pipe for all of them, and runs
side by side then steal each other's socket events (false kills). So the fork
server must not start pytest (which installs pytest-twisted's reactor) and must
not import anything that installs a reactor.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import mutation_test_durations, pytest_collection_modifyitems
from tests.helpers import ROOT

PRELOAD = ROOT / "scripts" / "mutation_preload.txt"


def mutmut_config() -> dict[str, object]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert isinstance(config, dict)
    return config


def test_the_fork_server_imports_a_list_and_does_not_start_pytest() -> None:
    config = mutmut_config()
    assert config["process_isolation"] == "forkserver"
    # mutmut's default warm-up, "collect", runs pytest in the fork server.
    assert config["forkserver_warmup"] == "import"
    assert ROOT / str(config["preload_modules_file"]) == PRELOAD


def test_nothing_the_fork_server_imports_installs_a_reactor() -> None:
    modules = [
        line.strip() for line in PRELOAD.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert modules
    # mutmut skips a module that fails to import; here each must import, so the list stays true.
    check = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "made = sorted(name for name in sys.modules if name.startswith('twisted.internet.')"
        " and name.endswith('reactor'))\n"
        "print(made)\n"
        "sys.exit(1 if 'twisted.internet.reactor' in sys.modules else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert not any(name.startswith("login_token_module") or name.startswith("tests") for name in modules)


class _Item:
    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid


def test_a_mutants_tests_run_fastest_first_by_mutmuts_recorded_durations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mutmut-stats.json").write_text(
        '{"duration_by_test": {"t::slow": 9.0, "t::fast": 0.1, "t::middle": 2, "t::bad": "x"}}'
    )
    monkeypatch.chdir(tmp_path)
    names = ["t::slow", "t::unknown", "t::middle", "t::fast"]
    items = [_Item(name) for name in names]

    monkeypatch.delenv("MUTANT_UNDER_TEST", raising=False)
    pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]
    assert [i.nodeid for i in items] == names  # an ordinary run keeps its order

    monkeypatch.setenv("MUTANT_UNDER_TEST", "login_token_module.tokens.x_f__mutmut_1")
    pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]
    assert [i.nodeid for i in items] == ["t::fast", "t::middle", "t::slow", "t::unknown"]


def test_no_or_broken_stats_file_means_no_durations(tmp_path: Path) -> None:
    assert mutation_test_durations(tmp_path / "missing.json") == {}
    (tmp_path / "broken.json").write_text("{not json")
    assert mutation_test_durations(tmp_path / "broken.json") == {}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert mutation_test_durations(tmp_path / "list.json") == {}
    (tmp_path / "ok.json").write_text('{"duration_by_test": {"a": 1}}')
    assert mutation_test_durations(tmp_path / "ok.json") == {"a": 1.0}
