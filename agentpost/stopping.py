"""Stopping the reactor once, however many times a process is asked to.

A process of a running node is routinely asked to stop more than once: systemd sends
SIGTERM to every process of the unit and the first process passes its own SIGTERM on
to its workers; a worker whose first process exits meanwhile gets PDEATHSIG too; an
operator presses Ctrl-C twice. Twisted's own handlers call ``reactor.stop()`` for each
signal, and every call after the first, while shutdown triggers are still flushing,
raises ``ReactorNotRunning`` and writes a traceback into the log of an orderly stop.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application import service
from twisted.internet.error import ReactorNotRunning

log = logging.getLogger(__name__)

#: The signals that mean "shut down gracefully".
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_reactor(reactor: Any, why: str) -> bool:
    """Stop the reactor unless it is already stopping; whether this call stopped it."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        log.info("%s: already shutting down", why)
        return False
    log.info("%s: shutting down", why)
    return True


def install_stop_handlers(reactor: Any, signals: Iterable[int] = STOP_SIGNALS,
                          install: Callable[[int, Any], Any] = signal.signal) -> None:
    """Make each of ``signals`` stop the reactor once (from the reactor thread, as a
    signal handler may run between any two bytecodes of it)."""
    def handler(number: int, frame: Any) -> None:
        reactor.callFromThread(stop_reactor, reactor,
                               f"received {signal.Signals(number).name}")

    for number in signals:
        install(number, handler)


class StopOnSignals(service.Service):
    """Replaces Twisted's stop handlers once the reactor runs (it installs its own
    during start-up, after services have started)."""

    name = "stop-on-signals"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(install_stop_handlers, self.reactor)
