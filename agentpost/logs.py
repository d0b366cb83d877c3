"""Logging: stdlib logging and Twisted's logger both go to stderr (journald reads it).

The line format is part of an interface: the shipped fail2ban filter
(etc/fail2ban/filter.d/agentpost.conf) parses the ``agentpost.auth`` failure lines
written with it, and a test checks the two together. Change them together.
"""

from __future__ import annotations

import logging
import sys

from twisted.logger import globalLogBeginner, textFileLogObserver

#: Every stdlib log line: ``<date> <time,ms> <LEVEL> <logger>: <message>``.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The logger of the authentication-failure lines (core/login_guard.py).
AUTH_LOGGER = "agentpost.auth"


def configure_logging(level: str, *, twisted_to_stderr: bool = True) -> None:
    """One stream, one format. Under twistd, Twisted's own logging is already set up."""
    numeric = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
               "error": logging.ERROR}[level]
    logging.basicConfig(
        level=numeric, stream=sys.stderr,
        format=LOG_FORMAT,
    )
    # Authentication failures feed fail2ban: they are written whatever the level.
    logging.getLogger(AUTH_LOGGER).setLevel(min(numeric, logging.WARNING))
    if twisted_to_stderr:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                         redirectStandardIO=False)
