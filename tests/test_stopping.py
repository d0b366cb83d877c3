"""A process asked to stop twice (systemd's SIGTERM to the whole unit, then the first
process's own; PDEATHSIG; a second Ctrl-C) stops once and logs no traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from agentpost.stopping import stop_reactor

# The second and third signals arrive while a shutdown trigger is still flushing.
_SCRIPT = textwrap.dedent("""
    import logging, os, signal, sys
    from twisted.internet import reactor, task
    from twisted.python import log
    log.startLogging(sys.stdout)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    if sys.argv[1] == "ours":
        from agentpost.stopping import StopOnSignals
        StopOnSignals(reactor).startService()
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: task.deferLater(reactor, 0.5, lambda: None))
    def ask_again():
        os.kill(os.getpid(), signal.SIGTERM)
        reactor.callLater(0.05, os.kill, os.getpid(), signal.SIGINT)
    def ask():
        os.kill(os.getpid(), signal.SIGTERM)
        reactor.callLater(0.05, ask_again)
    reactor.callWhenRunning(reactor.callLater, 0.05, ask)
    reactor.run()
    print("exited cleanly")
""")


def _run(handlers: str) -> str:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, handlers], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_repeated_stop_signals_stop_once_without_a_traceback():
    twisted_only = _run("twisted")  # the race is real: Twisted's handlers trip on it
    assert "ReactorNotRunning" in twisted_only, twisted_only
    out = _run("ours")
    assert "Traceback" not in out, out
    assert out.count("received SIGTERM: shutting down") == 1, out
    assert "already shutting down" in out, out
    assert "exited cleanly" in out


class _Reactor:
    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        from twisted.internet.error import ReactorNotRunning

        self.stops += 1
        if self.stops > 1:
            raise ReactorNotRunning()


def test_stop_reactor_reports_whether_it_stopped():
    reactor = _Reactor()
    assert stop_reactor(reactor, "first") is True
    assert stop_reactor(reactor, "second") is False
    assert reactor.stops == 2
