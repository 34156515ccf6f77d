"""Inside Synapse, Synapse's PostgreSQL going away: get_token answers 503 with Retry-After, then heals.

Synapse on PostgreSQL (a throwaway cluster of this test's own, which it stops and
starts): while the server is down, every get_token request (the UIA challenge,
which writes the module's session table; the answer, which reads it) is refused
with 503 ``M_UNKNOWN`` and ``Retry-After``, never a 500; once the server is back
Synapse's pool reconnects by itself and the next requests mint a token.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.helpers import Response
from tests.pgcluster import PostgresCluster
from tests.synapse_helpers import MODULE_STABLE, Client, start_synapse


def _assert_unavailable(response: Response) -> None:
    assert response.code == 503, response
    assert response.json["errcode"] == "M_UNKNOWN", response
    assert int(response.headers["retry-after"]) > 0, response.headers


def _answer(client: Client, access: str, session: str, password: str) -> Response:
    auth = {"type": "m.login.password", "session": session, "password": password}
    return client.post(MODULE_STABLE, {"auth": auth}, access)


def test_get_token_answers_503_while_synapses_postgresql_is_down_and_heals(
    own_pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    database = own_pg_cluster.create_database("synapse")
    synapse = start_synapse(
        tmp_path,
        {"ratelimit": {"per_second": 10, "burst_count": 20}},
        {"database": {"name": "psycopg2", "args": {**database.args, "cp_min": 1, "cp_max": 3}}},
    )
    try:
        client = synapse.direct
        password = "outage password"
        synapse.register("outage", password)
        access = client.access_token("outage", password)
        # Before the outage: a token, and a session begun for after it.
        assert client.get_login_token(access, password, MODULE_STABLE)
        begun = client.challenge(access, MODULE_STABLE)

        own_pg_cluster.stop("fast")
        try:
            # The challenge (a new session in the module's table), the answer to the session
            # begun before (read from it), again: every one refused with 503, none with 500.
            _assert_unavailable(client.post(MODULE_STABLE, {}, access))
            _assert_unavailable(_answer(client, access, begun, password))
            _assert_unavailable(client.post(MODULE_STABLE, {}, access))
        finally:
            own_pg_cluster.start()

        # Back: Synapse reconnects by itself; the session begun before the outage is still
        # there, and gets its token (a first request may still find a dead connection of
        # Synapse's pool: that one is a 503 too, never a 500).
        deadline = time.monotonic() + 20
        while True:
            done = _answer(client, access, begun, password)
            if done.code != 503:
                break
            assert time.monotonic() < deadline, "Synapse's pool never reconnected"
            time.sleep(0.5)
        assert done.code == 200, done
        assert client.token_login(done.json["login_token"]).code == 200
        assert client.get_login_token(access, password, MODULE_STABLE)
        log = synapse.log_once_it_shows("Synapse's database is unavailable")
        assert password not in log
    finally:
        synapse.stop()
