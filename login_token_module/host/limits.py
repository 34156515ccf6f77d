"""The process's open-files limit, set at start from the ``soft_file_limit`` key.

Every client connection, database file and log file takes a file descriptor.
Shells and service managers commonly start programs with a soft limit of 1,024
under a far higher hard limit, so a server left at the soft limit refuses
connections (``EMFILE``) long before the machine is busy. Like Synapse, the
host raises the soft limit to the hard limit unless told a figure.
"""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger(__name__)


def set_open_files_limit(wanted: int) -> int:
    """Set the soft RLIMIT_NOFILE to ``wanted`` (0: the hard limit; never above the hard
    limit) and return the soft limit now in force.

    Silent when it works: :func:`log_open_files_limit` says the figure once the server
    serves (a config the server then refuses must stop it with one line only).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted == 0 else wanted
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            # e.g. an unlimited hard limit the kernel will not give as a soft one
            logger.warning("Could not set the open-files limit to %d: %s", target, error)
    return soft


def log_open_files_limit(limit: int) -> None:
    logger.info("Open-files limit: %s", "unlimited" if limit == resource.RLIM_INFINITY else limit)
