from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted

from tests.helpers import InProcessServer, start_in_process


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """A homeserver with the module (SQLite store) and one user, alice."""
    srv = await start_in_process(tmp_path)
    await srv.register("alice")
    yield srv
    await srv.stop()
