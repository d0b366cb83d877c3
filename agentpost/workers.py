"""Worker processes: one AgentPost process per core, sharing ports with SO_REUSEPORT.

The first process (the one systemd or `agentpost serve` started) serves too, and
keeps ``workers - 1`` copies of itself running, restarting any that die. They share
nothing but the listening addresses, PostgreSQL and the blob store — exactly like
several nodes of a cluster, which every queue, timer and fan-out already handles.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol, task

from agentpost.stopping import stop_reactor

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


class ParentWatch(service.Service):
    """In a worker: stop once the first process is gone, and never outlive it by more
    than ``grace_s``, even if a graceful stop hangs.

    PDEATHSIG covers the usual case; this covers the rest (the signal lost in the
    window before ``prctl``, a SIGTERM handler stuck behind a dead database): a worker
    must never keep serving a node that was stopped.
    """

    name = "parent-watch"

    def __init__(self, reactor: Any, parent_pid: int, *, interval_s: float = 1.0,
                 grace_s: float = 10.0, getppid: Callable[[], int] = os.getppid,
                 hard_exit: Callable[[int], Any] = os._exit) -> None:
        self.reactor = reactor
        self.parent_pid = parent_pid
        self.interval_s = interval_s
        self.grace_s = grace_s
        self._getppid = getppid
        self._hard_exit = hard_exit
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._check)
        self._loop.clock = self.reactor
        self._loop.start(self.interval_s, now=False)
        # However this worker is asked to stop, it is gone within the grace period.
        self.reactor.addSystemEventTrigger("before", "shutdown", self._deadline)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _deadline(self) -> None:
        self.reactor.callLater(self.grace_s, self._hard_exit, 0)

    def _check(self) -> None:
        if self._getppid() == self.parent_pid:
            return
        log.warning("worker: the first process (pid %d) is gone; stopping", self.parent_pid)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        stop_reactor(self.reactor, "the first process is gone")


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


#: Young-generation threshold once serving, unless ``server.gc_young_threshold`` says
#: otherwise (CPython's default is 700). A request allocates and frees thousands of
#: container objects; with 32 in flight the net count crosses 700 several times a second,
#: so the collector kept scanning objects that reference counting was about to free
#: anyway. Cyclic garbage still goes, a little later.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc(freeze: bool = True, young_threshold: int = GC_YOUNG_THRESHOLD) -> None:
    """Once the service is up: move everything start-up made (modules, routes, config,
    pools: ~100,000 objects) out of the collector's sight, and collect young objects
    less often (``young_threshold``; 0 keeps CPython's).

    Without it every full collection walked those objects again: 60-100 ms with the
    reactor stopped, several times a minute under load (the p99 of the API benchmark,
    issue 12). ``gc.freeze`` is meant for exactly this; those objects live as long as
    the process anyway. Both are settings (``server.gc_freeze``,
    ``server.gc_young_threshold``) so an operator can measure without them.
    """
    if freeze:
        gc.collect()
        gc.freeze()
    if young_threshold > 0:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(young_threshold, gen1, gen2)


class HeapTuning(service.Service):
    """Applies :func:`tune_gc` once the sibling service (started before this one) has
    finished starting. Only for a real serving process (``make_service``), never in
    tests that run a server inside the test process."""

    name = "heap-tuning"

    def __init__(self, main: service.Service, *, freeze: bool = True,
                 young_threshold: int = GC_YOUNG_THRESHOLD) -> None:
        self._main = main
        self._freeze = freeze
        self._young_threshold = young_threshold

    def startService(self) -> None:
        super().startService()
        started = getattr(self._main, "_started", None)
        if isinstance(started, defer.Deferred):
            started.addBoth(self._tuned)
        else:
            self._tuned(None)

    def _tuned(self, result: Any) -> Any:
        tune_gc(self._freeze, self._young_threshold)
        return result
