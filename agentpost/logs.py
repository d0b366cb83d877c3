"""Logging: stdlib logging and Twisted's logger both go to stderr (journald reads it)."""

from __future__ import annotations

import logging
import sys

from twisted.logger import globalLogBeginner, textFileLogObserver


def configure_logging(level: str, *, twisted_to_stderr: bool = True) -> None:
    """One stream, one format. Under twistd, Twisted's own logging is already set up."""
    numeric = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
               "error": logging.ERROR}[level]
    logging.basicConfig(
        level=numeric, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if twisted_to_stderr:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                         redirectStandardIO=False)
