"""User-Interactive Auth for the get_token endpoints, always re-prompting.

A session is created for one user and one endpoint, lives for a fixed time,
and is spent by the request that completes it: a completed session presented
again starts over instead of minting a second token. Each user holds a bounded
number of live sessions, so a client looping on ``{}`` cannot grow memory.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

MAX_SESSIONS_PER_USER = 8
# Sessions checked per reactor turn while sweeping (each check may also unlink).
SWEEP_SLICE = 1_000


@dataclass(slots=True)
class UiaSession:
    session_id: str
    user_id: str
    endpoint: str
    expires_at: float


class UiaSessions:
    def __init__(self, lifetime_seconds: float) -> None:
        self._lifetime = lifetime_seconds
        self._sessions: dict[str, UiaSession] = {}
        # Each user's live session ids, oldest first (dicts keep insertion order).
        self._by_user: dict[str, dict[str, None]] = {}

    def create(self, user_id: str, endpoint: str, now: float) -> UiaSession:
        session = UiaSession(secrets.token_urlsafe(24), user_id, endpoint, now + self._lifetime)
        self.restore(session)
        return session

    def restore(self, session: UiaSession) -> None:
        """Hold ``session`` (new, or given back after a spend that came to nothing)."""
        self._sessions[session.session_id] = session
        mine = self._by_user.setdefault(session.user_id, {})
        mine[session.session_id] = None
        while len(mine) > MAX_SESSIONS_PER_USER:
            oldest = next(iter(mine))
            del mine[oldest]
            self._sessions.pop(oldest, None)

    def get(self, session_id: str, now: float) -> UiaSession | None:
        session = self._sessions.get(session_id)
        if session is None or session.expires_at <= now:
            return None
        return session

    def spend(self, session_id: str) -> UiaSession | None:
        """Remove the session and return it; None if it was already gone (spent by a racer)."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return None
        mine = self._by_user.get(session.user_id)
        if mine is not None:
            mine.pop(session_id, None)
            if not mine:
                del self._by_user[session.user_id]
        return session

    def sweep(self, now: float) -> Iterator[None]:
        """Drop expired sessions; yields between slices so the caller can pause."""
        ids = list(self._sessions)
        for start in range(0, len(ids), SWEEP_SLICE):
            for session_id in ids[start : start + SWEEP_SLICE]:
                session = self._sessions.get(session_id)
                if session is not None and session.expires_at <= now:
                    self.spend(session_id)
            yield None

    def __len__(self) -> int:
        return len(self._sessions)
