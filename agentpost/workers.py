"""Worker processes: one AgentPost process per core, sharing ports with SO_REUSEPORT.

The first process (the one systemd or `agentpost serve` started) serves too, and
keeps ``workers - 1`` copies of itself running, restarting any that die. They share
nothing but the listening addresses, PostgreSQL and the blob store — exactly like
several nodes of a cluster, which every queue, timer and fan-out already handles.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from twisted.application import service
from twisted.internet import protocol

log = logging.getLogger(__name__)

WORKER_ENV = "AGENTPOST_WORKER"
PARENT_ENV = "AGENTPOST_WORKER_PARENT"


def is_worker() -> bool:
    """Whether this process was started by a WorkerPool (and must not start more)."""
    return os.environ.get(WORKER_ENV) == "1"


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if its parent dies, even by SIGKILL, so no
    orphan keeps serving a node that was stopped."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: workers are stopped by the parent only
        pass
    # The parent may have died before the request above was made.
    if os.environ.get(PARENT_ENV) and str(os.getppid()) != os.environ[PARENT_ENV]:
        raise SystemExit(0)


class _Worker(protocol.ProcessProtocol):
    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index

    def processEnded(self, reason: Any) -> None:
        self.pool.ended(self)


class WorkerPool(service.Service):
    """Keeps ``count`` extra copies of this process alive while the service runs."""

    name = "workers"

    def __init__(self, reactor: Any, count: int, argv: list[str],
                 restart_delay_s: float = 1.0) -> None:
        self.reactor = reactor
        self.count = count
        self.argv = argv
        self.restart_delay_s = restart_delay_s
        self.processes: dict[int, Any] = {}

    def _spawn(self, index: int) -> None:
        env = dict(os.environ, **{WORKER_ENV: "1", PARENT_ENV: str(os.getpid())})
        env.pop("NOTIFY_SOCKET", None)  # only the main process talks to systemd
        proto = _Worker(self, index)
        self.processes[index] = self.reactor.spawnProcess(
            proto, sys.executable, [sys.executable, *self.argv], env=env,
            childFDs={0: "w", 1: 1, 2: 2})
        log.info("started worker %d (pid %s)", index, self.processes[index].pid)

    def ended(self, worker: _Worker) -> None:
        """Restart a worker that died while we are running."""
        self.processes.pop(worker.index, None)
        if self.running:
            log.warning("worker %d exited; restarting", worker.index)
            self.reactor.callLater(self.restart_delay_s, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if self.running and index not in self.processes:
            self._spawn(index)

    def startService(self) -> None:
        """Start the extra workers."""
        super().startService()
        for index in range(1, self.count + 1):
            self._spawn(index)

    def signal_all(self, signum: int) -> None:
        """Pass a signal (SIGHUP: reload TLS) on to every worker."""
        for transport in list(self.processes.values()):
            try:
                transport.signalProcess(signum)
            except Exception:  # noqa: S110 - already gone
                pass

    def stopService(self) -> Any:
        """Ask every worker to stop (SIGTERM); they flush and close like the parent."""
        super().stopService()
        for transport in list(self.processes.values()):
            try:
                transport.signalProcess(signal.SIGTERM)
            except Exception:  # noqa: S110 - already gone
                pass
        return None
