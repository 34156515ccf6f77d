"""UIA session bookkeeping at the unit: the per-user cap, spending and the sweep.

The clock is the ``now`` each call is given, so nothing here depends on timing.
These are the rules any session backend must keep; the HTTP-level view of the
same rules is in test_uia.py.
"""

from __future__ import annotations

from login_token_module.uia import MAX_SESSIONS_PER_USER, SWEEP_SLICE, UiaSessions

LIFETIME = 300.0
NOW = 1_700_000_000.0
ENDPOINT = "/_matrix/client/v1/login/get_token"


def open_sessions(sessions: UiaSessions, user_id: str, count: int, now: float = NOW) -> list[str]:
    return [sessions.create(user_id, ENDPOINT, now).session_id for _ in range(count)]


def live(sessions: UiaSessions, session_ids: list[str], now: float = NOW) -> list[bool]:
    return [sessions.get(session_id, now) is not None for session_id in session_ids]


def test_a_session_belongs_to_its_user_and_endpoint_and_expires() -> None:
    sessions = UiaSessions(LIFETIME)
    session = sessions.create("@alice:test", ENDPOINT, NOW)
    assert (session.user_id, session.endpoint) == ("@alice:test", ENDPOINT)
    assert session.expires_at == NOW + LIFETIME
    assert sessions.get(session.session_id, NOW + LIFETIME - 0.001) is session
    # Expiry is exclusive: at expires_at the session is already gone.
    assert sessions.get(session.session_id, NOW + LIFETIME) is None
    assert sessions.get("no such session", NOW) is None


def test_each_user_holds_at_most_the_cap_and_the_oldest_go_first() -> None:
    sessions = UiaSessions(LIFETIME)
    ids = open_sessions(sessions, "@alice:test", MAX_SESSIONS_PER_USER)
    # Exactly the cap: every one is still there.
    assert live(sessions, ids) == [True] * MAX_SESSIONS_PER_USER
    assert len(sessions) == MAX_SESSIONS_PER_USER

    newer = open_sessions(sessions, "@alice:test", 3)
    # The three oldest were pushed out, and are really gone (not merely unlisted).
    assert live(sessions, ids) == [False] * 3 + [True] * (MAX_SESSIONS_PER_USER - 3)
    assert live(sessions, newer) == [True] * 3
    assert len(sessions) == MAX_SESSIONS_PER_USER
    for pushed_out in ids[:3]:
        assert sessions.spend(pushed_out) is None


def test_the_cap_is_per_user() -> None:
    sessions = UiaSessions(LIFETIME)
    alice = open_sessions(sessions, "@alice:test", MAX_SESSIONS_PER_USER)
    bob = open_sessions(sessions, "@bob:test", MAX_SESSIONS_PER_USER)
    assert live(sessions, alice + bob) == [True] * (2 * MAX_SESSIONS_PER_USER)
    assert len(sessions) == 2 * MAX_SESSIONS_PER_USER


def test_spending_a_session_keeps_the_cap_on_the_rest() -> None:
    """Spending one session must not lose track of the user's others."""
    sessions = UiaSessions(LIFETIME)
    ids = open_sessions(sessions, "@alice:test", MAX_SESSIONS_PER_USER)
    spent = sessions.spend(ids[-1])
    assert spent is not None and spent.session_id == ids[-1]
    assert sessions.spend(ids[-1]) is None  # once only
    assert len(sessions) == MAX_SESSIONS_PER_USER - 1

    # Two more: one fills the cap again, the second pushes out the oldest.
    newer = open_sessions(sessions, "@alice:test", 2)
    assert len(sessions) == MAX_SESSIONS_PER_USER
    assert live(sessions, ids[:-1]) == [False] + [True] * (MAX_SESSIONS_PER_USER - 2)
    assert live(sessions, newer) == [True, True]

    # However many more are asked for, the user never holds more than the cap.
    for _ in range(3 * MAX_SESSIONS_PER_USER):
        sessions.create("@alice:test", ENDPOINT, NOW)
    assert len(sessions) == MAX_SESSIONS_PER_USER


def test_spending_every_session_then_starting_again() -> None:
    sessions = UiaSessions(LIFETIME)
    ids = open_sessions(sessions, "@alice:test", 3)
    for session_id in ids:
        assert sessions.spend(session_id) is not None
    assert len(sessions) == 0
    again = open_sessions(sessions, "@alice:test", MAX_SESSIONS_PER_USER + 1)
    assert live(sessions, again) == [False] + [True] * MAX_SESSIONS_PER_USER


def test_a_restored_session_counts_against_the_cap_again() -> None:
    sessions = UiaSessions(LIFETIME)
    first = sessions.create("@alice:test", ENDPOINT, NOW)
    spent = sessions.spend(first.session_id)
    assert spent is first
    sessions.restore(spent)
    assert sessions.get(first.session_id, NOW) is first
    # The restored session is now the newest: the next cap's worth pushes it out last.
    others = open_sessions(sessions, "@alice:test", MAX_SESSIONS_PER_USER)
    assert sessions.get(first.session_id, NOW) is None
    assert live(sessions, others) == [True] * MAX_SESSIONS_PER_USER


def test_sweep_drops_only_expired_sessions() -> None:
    sessions = UiaSessions(LIFETIME)
    old = [sessions.create(f"@old{i}:test", ENDPOINT, NOW).session_id for i in range(5)]
    new = [sessions.create(f"@new{i}:test", ENDPOINT, NOW + 10).session_id for i in range(5)]
    for _ in sessions.sweep(NOW + LIFETIME):  # the old ones expire exactly now
        pass
    assert len(sessions) == len(new)
    assert live(sessions, new, NOW + LIFETIME) == [True] * len(new)
    assert [sessions.spend(session_id) for session_id in old] == [None] * len(old)

    # A swept user can hold a full cap's worth again.
    again = open_sessions(sessions, "@old0:test", MAX_SESSIONS_PER_USER, NOW + 20)
    assert live(sessions, again, NOW + 20) == [True] * MAX_SESSIONS_PER_USER


def test_sweep_covers_every_slice_and_yields_between_them() -> None:
    """More sessions than two slices: all of them are swept, one yield per slice."""
    sessions = UiaSessions(LIFETIME)
    count = 2 * SWEEP_SLICE + 7
    # One session per user, so the per-user cap pushes none out.
    for i in range(count):
        sessions.create(f"@user{i}:test", ENDPOINT, NOW)
    survivor = sessions.create("@late:test", ENDPOINT, NOW + LIFETIME)
    assert len(sessions) == count + 1

    yields = sum(1 for _ in sessions.sweep(NOW + LIFETIME))
    assert yields == 3  # ceil((count + 1) / SWEEP_SLICE)
    assert len(sessions) == 1
    assert sessions.get(survivor.session_id, NOW + LIFETIME) is survivor


def test_sweep_with_nothing_to_do() -> None:
    sessions = UiaSessions(LIFETIME)
    assert list(sessions.sweep(NOW)) == []
    sessions.create("@alice:test", ENDPOINT, NOW)
    assert len(list(sessions.sweep(NOW))) == 1
    assert len(sessions) == 1


def test_sessions_that_change_between_slices_are_judged_as_they_are_then() -> None:
    sessions = UiaSessions(LIFETIME)
    ids = [sessions.create(f"@user{i}:test", ENDPOINT, NOW).session_id for i in range(SWEEP_SLICE + 2)]
    sweep = sessions.sweep(NOW + LIFETIME)
    next(sweep)  # the first slice is done
    assert len(sessions) == 2
    assert sessions.spend(ids[-1]) is not None  # spent before the sweep reaches it
    assert list(sweep) == [None]
    assert len(sessions) == 0
