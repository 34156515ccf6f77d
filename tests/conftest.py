from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import pytest_twisted

from login_token_module import audit
from login_token_module.config import StoreConfig
from login_token_module.stores import StateBackend, make_state
from tests.helpers import (
    REACTOR,
    AuditRecords,
    ChildServer,
    InProcessServer,
    Launcher,
    start_child,
    start_in_process,
)
from tests.pgcluster import ClusterUnavailableError, Database, PostgresCluster, driver_missing_reason


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """A homeserver with the module (SQLite store) and one user, alice."""
    srv = await start_in_process(tmp_path)
    await srv.register("alice")
    yield srv
    await srv.stop()


@pytest.fixture
def launch() -> Iterator[Launcher]:
    """start_child, with every child (and its workers) killed at the end whatever happens."""
    children: list[ChildServer] = []

    def start(config: Path, log_name: str = "server.log", *extra_args: str) -> ChildServer:
        child = start_child(config, log_name, extra_args=extra_args)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill_all()


def postgres_unavailable(reason: str) -> NoReturn:
    """Under CI a missing PostgreSQL is a failure; elsewhere the test is skipped, saying why."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required under CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests need a PostgreSQL server: {reason}")


def new_cluster() -> PostgresCluster:
    reason = driver_missing_reason()
    if reason is not None:
        postgres_unavailable(reason)
    try:
        return PostgresCluster.create()
    except (ClusterUnavailableError, OSError) as error:
        postgres_unavailable(str(error))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster for the whole session (tests get fresh databases)."""
    cluster = new_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_database(pg_cluster: PostgresCluster) -> Database:
    """A fresh, empty database in the session's cluster."""
    if not pg_cluster.running:  # a test that stopped it failed before starting it again
        pg_cluster.start()
    return pg_cluster.create_database()


@pytest.fixture
def own_pg_cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own, for tests that stop and start the server."""
    cluster = new_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def audit_log() -> Iterator[AuditRecords]:
    """Every audit record the module writes during the test."""
    handler = AuditRecords()
    logger = logging.getLogger(audit.AUDIT_LOGGER)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


# -- state backends, for the tests of the state Protocols ---------------------------


BackendFactory = Callable[[], StateBackend]


def _state_opener(request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    if request.param == "memory":
        config = StoreConfig(type="memory")
    elif request.param == "sqlite":
        config = StoreConfig(type="sqlite", path=str(tmp_path / "state.db"), shared_state=True)
    else:
        database: Database = request.getfixturevalue("pg_database")
        config = StoreConfig(type="postgres", dsn=database.dsn)
    return lambda: make_state(config, REACTOR, str(tmp_path))


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    """Opens backends on one place (each call: another process's view of it)."""
    return _state_opener(request, tmp_path)


@pytest.fixture(params=["sqlite", "postgres"])
def open_shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    """The backends whose state other processes see."""
    return _state_opener(request, tmp_path)


@pytest_twisted.async_yield_fixture
async def backend(open_backend: BackendFactory) -> AsyncIterator[StateBackend]:
    """A state backend of each kind: memory, SQLite (a real file, shared state), PostgreSQL."""
    opened = open_backend()
    yield opened
    await opened.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutation testing, run a mutant's tests fastest first.

    mutmut passes each mutant's tests as an unordered set and stops at the first
    failure (`-x`), so a mutant that only a slow test kills often ran most of the
    others first. Sorting by the durations mutmut recorded in its first full run
    (`mutmut-stats.json`, in the directory it runs the tests from) ends a killed
    mutant's run as early as it can end, and the same mutant's tests always run
    in the same order. Outside mutmut, or before that file exists, nothing changes.
    """
    if not os.environ.get("MUTANT_UNDER_TEST"):
        return
    durations = mutation_test_durations(Path("mutmut-stats.json"))
    if durations:
        items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))


def mutation_test_durations(stats_file: Path) -> dict[str, float]:
    """Each test's duration from mutmut's stats file; empty if there is none yet."""
    try:
        data = json.loads(stats_file.read_text())
    except (OSError, ValueError):
        return {}
    durations = data.get("duration_by_test") if isinstance(data, dict) else None
    if not isinstance(durations, dict):
        return {}
    return {str(k): float(v) for k, v in durations.items() if isinstance(v, (int, float))}
