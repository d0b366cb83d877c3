"""Logging: stdlib logging and Twisted's logger both go to stderr (journald reads it)."""

from __future__ import annotations

import logging
import sys

from twisted.logger import globalLogBeginner, textFileLogObserver


def configure_logging(level: str) -> None:
    """One stream, one format; systemd adds timestamps of its own."""
    numeric = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
               "error": logging.ERROR}[level]
    logging.basicConfig(
        level=numeric, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
