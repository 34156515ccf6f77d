"""The module's YAML config block, parsed once into frozen objects.

Every problem is raised as one :class:`ConfigError` whose ``path`` names the
offending key, so an operator sees ``ratelimit.per_second: must be ...`` rather
than a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

StoreType = Literal["memory", "sqlite", "postgres"]


class ConfigError(Exception):
    """A config value is wrong. ``path`` is the key path, outermost first."""

    def __init__(self, path: list[str | int], reason: str) -> None:
        self.path = list(path)
        self.reason = reason
        super().__init__(f"{format_path(self.path)}: {reason}")

    def within(self, *outer: str | int) -> ConfigError:
        """The same error, seen from an enclosing config section."""
        return ConfigError([*outer, *self.path], self.reason)


def format_path(path: list[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "<top level>"


@dataclass(frozen=True)
class RatelimitConfig:
    per_second: float
    burst_count: int


@dataclass(frozen=True)
class StoreConfig:
    type: StoreType = "sqlite"
    # Relative paths are resolved by the module against the host's config
    # directory, so the same file works from any working directory.
    path: str = "login_tokens.db"
    # postgres: a libpq connection URI, postgresql://user:password@host:port/dbname
    dsn: str = ""
    # Whether UIA sessions and rate limits live in the store's database (seen
    # by every process using it) or in this process's memory. None: decided at
    # start-up (postgres: shared; sqlite: shared only under several workers).
    shared_state: bool | None = None
    # postgres: the connection pool's size (Synapse's names).
    cp_min: int = 1
    cp_max: int = 5


@dataclass(frozen=True)
class PairingConfig:
    """Signing in a device by code (``pairing.py``); off unless the operator turns it on."""

    enabled: bool = False
    # How long a started pairing waits for approval, and how often its new device may poll.
    lifetime_ms: int = 600_000
    interval_ms: int = 5_000


@dataclass(frozen=True)
class LoginTokenConfig:
    token_lifetime_ms: int = 120_000
    require_ui_auth: bool = True
    # Spec: "stricter than normal rate limiting ... such as maximum of 1
    # request per minute".
    ratelimit: RatelimitConfig = field(
        default_factory=lambda: RatelimitConfig(per_second=1 / 60, burst_count=1)
    )
    # Wrong passwords in the UIA stage, per user (Synapse's
    # rc_login.failed_attempts defaults), so the endpoint is no password oracle.
    failed_auth_ratelimit: RatelimitConfig = field(
        default_factory=lambda: RatelimitConfig(per_second=0.17, burst_count=3)
    )
    ui_auth_session_lifetime_ms: int = 300_000
    sweep_interval_ms: int = 60_000
    store: StoreConfig = field(default_factory=StoreConfig)
    # Revoke a device's outstanding tokens when it logs out (Synapse's
    # on_logged_out callback), so a token cannot outlive the session that minted it.
    revoke_on_logout: bool = True
    # How long each token's history (minted by, spent into) is kept for lineage
    # queries; Synapse keeps its used login tokens for a week as well.
    history_retention_ms: int = 7 * 24 * 60 * 60 * 1000
    # Whether the block named a store (a host that keeps the tokens itself
    # refuses one rather than ignore it).
    store_configured: bool = False
    pairing: PairingConfig = field(default_factory=PairingConfig)


MAX_LIFETIME_MS = 24 * 60 * 60 * 1000
MAX_HISTORY_MS = 366 * MAX_LIFETIME_MS


def _mapping(value: Any, path: list[str | int]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, "must be a mapping")
    return value


def reject_unknown(section: Mapping[str, Any], known: set[str], path: list[str | int]) -> None:
    for key in section:
        if key not in known:
            expected = ", ".join(sorted(known))
            raise ConfigError([*path, str(key)], f"unknown option (expected one of: {expected})")


def whole_number(value: Any, path: list[str | int], low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(path, f"must be a whole number from {low} to {high}, got {value!r}")
    return value


def parse_ratelimit(value: Any, path: list[str | int], default: RatelimitConfig) -> RatelimitConfig:
    """A ``{per_second, burst_count}`` block (Synapse's names), defaults from ``default``."""
    section = _mapping(value, path)
    reject_unknown(section, {"per_second", "burst_count"}, path)
    per_second = section.get("per_second", default.per_second)
    if (
        isinstance(per_second, bool)
        or not isinstance(per_second, (int, float))
        or not math.isfinite(per_second)
        or per_second <= 0
    ):
        raise ConfigError([*path, "per_second"], f"must be a positive number, got {per_second!r}")
    burst = whole_number(
        section.get("burst_count", default.burst_count), [*path, "burst_count"], 1, 1_000_000
    )
    return RatelimitConfig(per_second=float(per_second), burst_count=burst)


def _store(value: Any, path: list[str | int]) -> StoreConfig:
    section = _mapping(value, path)
    store_type = section.get("type", StoreConfig.type)
    if store_type not in ("memory", "sqlite", "postgres"):
        raise ConfigError([*path, "type"], f"must be 'memory', 'sqlite' or 'postgres', got {store_type!r}")
    known = {"memory": {"type", "shared_state"}, "sqlite": {"type", "path", "shared_state"}}.get(
        store_type, {"type", "dsn", "shared_state", "cp_min", "cp_max"}
    )
    for key in section:
        if key in {"path", "dsn", "cp_min", "cp_max"} and key not in known:
            owner = "the sqlite store" if key == "path" else "the postgres store"
            raise ConfigError([*path, str(key)], f"only applies to {owner}")
    reject_unknown(section, known, path)
    shared_state = section.get("shared_state")
    if shared_state is not None and not isinstance(shared_state, bool):
        raise ConfigError([*path, "shared_state"], f"must be true or false, got {shared_state!r}")
    if store_type == "memory":
        if shared_state:
            raise ConfigError(
                [*path, "shared_state"], "the memory store cannot share state between processes"
            )
        return StoreConfig(type="memory", path="", shared_state=False)
    if store_type == "postgres":
        dsn = section.get("dsn")
        if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
            # The value is not echoed: it may hold a password.
            raise ConfigError(
                [*path, "dsn"], "must be a URI such as postgresql://user:password@host:5432/dbname"
            )
        cp_min = whole_number(section.get("cp_min", StoreConfig.cp_min), [*path, "cp_min"], 0, 100)
        cp_max = whole_number(section.get("cp_max", StoreConfig.cp_max), [*path, "cp_max"], 1, 100)
        if cp_min > cp_max:
            raise ConfigError([*path, "cp_min"], f"must not be more than cp_max ({cp_max})")
        return StoreConfig(
            type="postgres", path="", dsn=dsn, shared_state=shared_state, cp_min=cp_min, cp_max=cp_max
        )
    store_path = section.get("path", StoreConfig.path)
    if not isinstance(store_path, str) or not store_path.strip():
        raise ConfigError([*path, "path"], "must be a non-empty file path")
    return StoreConfig(type="sqlite", path=store_path, shared_state=shared_state)


def _pairing(value: Any, path: list[str | int]) -> PairingConfig:
    section = _mapping(value, path)
    reject_unknown(section, {"enabled", "lifetime_ms", "interval_ms"}, path)
    enabled = section.get("enabled", PairingConfig.enabled)
    if not isinstance(enabled, bool):
        raise ConfigError([*path, "enabled"], f"must be true or false, got {enabled!r}")
    lifetime_ms = whole_number(
        section.get("lifetime_ms", PairingConfig.lifetime_ms), [*path, "lifetime_ms"], 1_000, MAX_LIFETIME_MS
    )
    interval_ms = whole_number(
        section.get("interval_ms", PairingConfig.interval_ms), [*path, "interval_ms"], 10, 60_000
    )
    if interval_ms >= lifetime_ms:
        raise ConfigError([*path, "interval_ms"], f"must be less than lifetime_ms ({lifetime_ms})")
    return PairingConfig(enabled=enabled, lifetime_ms=lifetime_ms, interval_ms=interval_ms)


def parse_config(raw: Any) -> LoginTokenConfig:
    """Validate the module's ``config:`` block; raises :class:`ConfigError`."""
    section = _mapping(raw, [])
    defaults = LoginTokenConfig()
    reject_unknown(
        section,
        {
            "token_lifetime_ms",
            "require_ui_auth",
            "ratelimit",
            "failed_auth_ratelimit",
            "ui_auth_session_lifetime_ms",
            "sweep_interval_ms",
            "store",
            "revoke_on_logout",
            "history_retention_ms",
            "pairing",
        },
        [],
    )
    require_ui_auth = section.get("require_ui_auth", defaults.require_ui_auth)
    if not isinstance(require_ui_auth, bool):
        raise ConfigError(["require_ui_auth"], f"must be true or false, got {require_ui_auth!r}")
    revoke_on_logout = section.get("revoke_on_logout", defaults.revoke_on_logout)
    if not isinstance(revoke_on_logout, bool):
        raise ConfigError(["revoke_on_logout"], f"must be true or false, got {revoke_on_logout!r}")
    return LoginTokenConfig(
        token_lifetime_ms=whole_number(
            section.get("token_lifetime_ms", defaults.token_lifetime_ms),
            ["token_lifetime_ms"],
            1,
            MAX_LIFETIME_MS,
        ),
        require_ui_auth=require_ui_auth,
        ratelimit=parse_ratelimit(section.get("ratelimit"), ["ratelimit"], defaults.ratelimit),
        failed_auth_ratelimit=parse_ratelimit(
            section.get("failed_auth_ratelimit"),
            ["failed_auth_ratelimit"],
            defaults.failed_auth_ratelimit,
        ),
        ui_auth_session_lifetime_ms=whole_number(
            section.get("ui_auth_session_lifetime_ms", defaults.ui_auth_session_lifetime_ms),
            ["ui_auth_session_lifetime_ms"],
            1_000,
            MAX_LIFETIME_MS,
        ),
        sweep_interval_ms=whole_number(
            section.get("sweep_interval_ms", defaults.sweep_interval_ms),
            ["sweep_interval_ms"],
            10,
            MAX_LIFETIME_MS,
        ),
        store=_store(section.get("store"), ["store"]),
        revoke_on_logout=revoke_on_logout,
        history_retention_ms=whole_number(
            section.get("history_retention_ms", defaults.history_retention_ms),
            ["history_retention_ms"],
            60_000,
            MAX_HISTORY_MS,
        ),
        store_configured="store" in section,
        pairing=_pairing(section.get("pairing"), ["pairing"]),
    )
