"""Running one homeserver process: its logging, its run loop until a signal, and how
it reports a problem (one line, exit 1). Shared by the CLI (one process) and the
worker parent (each worker), which both import it; it imports neither."""

from __future__ import annotations

import logging
import logging.config
import signal
import sys
from collections.abc import Callable
from typing import Any

from login_token_module.config import ConfigError
from login_token_module.host.config import HomeserverConfig, ListenerConfig

PROG = "login-token-module"


class CliError(Exception):
    """A problem to report as one line and exit 1."""


LOG_FORMAT = "%(asctime)s {who}%(levelname)s %(name)s: %(message)s"


# Whether logging follows the config's log_config (whose formatters are then left alone).
_configured_by_file = False


def setup_logging(level: str, log_config: str | None = None, *, twisted: bool = True) -> None:
    """Plain lines on stderr at ``level``, or, with a ``log_config`` file (Synapse's key), that
    file's Python logging config (``logging.config.dictConfig``'s YAML shape)."""
    global _configured_by_file
    if log_config is not None:
        import yaml

        try:
            with open(log_config, encoding="utf-8") as handle:
                logging.config.dictConfig(yaml.safe_load(handle))
        except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError, ImportError) as error:
            raise CliError(f"cannot use log_config {log_config}: {error}") from None
        _configured_by_file = True
    else:
        logging.basicConfig(
            level=getattr(logging, level.upper()),
            format=LOG_FORMAT.format(who=""),
            stream=sys.stderr,
        )
    if twisted:
        from twisted.logger import STDLibLogObserver, globalLogBeginner

        globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)


def name_log_lines(who: str) -> None:
    """Start every log line with ``who`` (which worker process wrote it); a log_config's
    formatters are kept (the JSON formatter adds a ``process`` field instead)."""
    if _configured_by_file:
        return
    formatter = logging.Formatter(LOG_FORMAT.format(who=f"[{who}] "))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


def run_homeserver(
    config: HomeserverConfig,
    config_path: str,
    *,
    workers: int = 1,
    worker_addresses: list[tuple[ListenerConfig, str, int]] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Build, start and run the homeserver in this process until SIGTERM or SIGINT."""
    from twisted.internet import reactor

    from login_token_module.host.server import Homeserver

    r: Any = reactor
    try:
        hs = Homeserver(config, r, workers=workers, worker_addresses=worker_addresses)
        hs.start()
    except ConfigError as error:
        raise CliError(f"config error in {config_path}: {error}") from None
    except Exception as error:  # e.g. the port is taken
        raise CliError(f"cannot start: {error}") from None
    if on_ready is not None:
        on_ready()

    stopping = False

    def shut_down(signum: int, frame: Any) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        logging.getLogger(__name__).info("Signal %d received, stopping", signum)

        from twisted.internet import defer

        d = defer.ensureDeferred(hs.stop())
        d.addBoth(lambda _: r.stop())

    signal.signal(signal.SIGTERM, lambda s, f: r.callFromThread(shut_down, s, f))
    signal.signal(signal.SIGINT, lambda s, f: r.callFromThread(shut_down, s, f))
    r.run(installSignalHandlers=False)
    return 0


def print_error(error: CliError) -> None:
    print(f"{PROG}: {error}", file=sys.stderr, flush=True)
