"""Several worker processes share one node's ports (SO_REUSEPORT) and one database."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from twisted.internet import task

from tests.test_cli import _free_port

ROOT = Path(__file__).resolve().parent.parent


def _listening_pids(port: int, pids: list[int]) -> set[int]:
    """Which of ``pids`` hold a listening TCP socket on ``port`` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "0A":
                inodes.add(fields[9])
    owners = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    owners.add(pid)
        except OSError:
            continue
    return owners


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _kill_leftovers(config: Path) -> list[int]:
    """Kill any process still serving ``config``; return their pids (tests must not leak)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if str(config).encode() in cmdline:
            found.append(int(entry))
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass
    return found


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return predicate()


def test_two_workers_share_ports_and_are_kept_alive(db_dsn, tmp_path):
    """workers = 2: both processes listen on the HTTP and SMTP ports; a killed worker is
    replaced; SIGTERM to the first process stops them all."""
    http_port, mx_port = _free_port(), _free_port()
    config = tmp_path / "agentpost.toml"
    config.write_text(
        f'[server]\nworkers = 2\n[database]\nurl = "{db_dsn}"\n'
        f'[http]\nport = {http_port}\n[smtp]\nmx_bind = "127.0.0.1"\nmx_port = {mx_port}\n'
        f'[storage]\npath = "{tmp_path / "blobs"}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "agentpost.cli", "--config", str(config),
                             "serve"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        children = _wait(lambda: _children(proc.pid))
        assert len(children) == 1, children
        everyone = [proc.pid, *children]
        assert _wait(lambda: _listening_pids(http_port, everyone) == set(everyone))
        assert _wait(lambda: _listening_pids(mx_port, everyone) == set(everyone))
        for _ in range(10):  # the kernel spreads connections; every answer is right
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz",
                                        timeout=5) as resp:
                assert json.loads(resp.read()) == {"status": "ok"}

        os.kill(children[0], signal.SIGKILL)
        replaced = _wait(lambda: [c for c in _children(proc.pid) if c != children[0]])
        assert len(replaced) == 1
        assert _wait(lambda: _listening_pids(http_port, replaced) == set(replaced))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert _wait(lambda: not _children(proc.pid), timeout=10)
    assert _kill_leftovers(config) == []
    assert "Traceback" not in out, out


def test_workers_exit_when_the_first_process_is_killed(db_dsn, tmp_path):
    """Even a SIGKILLed parent leaves no orphan serving (PR_SET_PDEATHSIG)."""
    http_port = _free_port()
    config = tmp_path / "agentpost.toml"
    config.write_text(
        f'[server]\nworkers = 2\n[database]\nurl = "{db_dsn}"\n[http]\nport = {http_port}\n'
        f'[smtp]\nmx_enabled = false\n[storage]\npath = "{tmp_path / "blobs"}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "agentpost.cli", "--config", str(config),
                             "serve"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        children = _wait(lambda: _children(proc.pid))
        assert len(children) == 1
        proc.kill()
        proc.wait(timeout=10)
        assert _wait(lambda: not Path(f"/proc/{children[0]}").exists()
                     or "Z" in Path(f"/proc/{children[0]}/stat").read_text().split()[2], 15)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        _wait(lambda: not _kill_leftovers(config), timeout=5)


class _FakeReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.stopped = 0
        self.triggers: list = []

    def stop(self) -> None:
        self.stopped += 1

    def addSystemEventTrigger(self, phase, event, fn, *args):
        self.triggers.append((phase, event, fn))


def test_parent_watch_stops_an_orphan_and_bounds_any_stop():
    """A worker whose first process vanished stops itself (on the injected clock), and
    any stop is followed by a hard exit after the grace period."""
    from agentpost.workers import ParentWatch

    reactor = _FakeReactor()
    parent = [4242]
    exits: list[int] = []
    watch = ParentWatch(reactor, 4242, interval_s=1.0, grace_s=10.0,
                        getppid=lambda: parent[0], hard_exit=exits.append)
    watch.startService()
    reactor.advance(5)
    assert reactor.stopped == 0
    parent[0] = 1  # re-parented: the first process is gone
    reactor.advance(1)
    assert reactor.stopped == 1
    reactor.advance(5)
    assert reactor.stopped == 1  # checked once, not every second
    [(phase, event, deadline)] = reactor.triggers
    assert (phase, event) == ("before", "shutdown")
    deadline()  # the reactor began shutting down
    reactor.advance(9.9)
    assert exits == []
    reactor.advance(0.2)
    assert exits == [0]
    watch.stopService()
