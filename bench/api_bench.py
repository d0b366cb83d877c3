#!/usr/bin/env python3
"""Throughput and latency of the AgentPost JSON API, with the audit trail on.

What it does, start to finish:

1. creates a throw-away PostgreSQL cluster (``agentpost.dev.embedded_pg``) in a temp
   folder, fsync on by default, and applies the migrations;
2. writes a config (rate limiter disabled, mail listeners off, everything else at its
   defaults, plus any ``--set section.key=value``), runs
   ``agentpost bootstrap`` for an API key and starts ``agentpost serve`` as a separate
   process, so the server's CPU is measured apart from the load generator's;
3. drives ``GET /api/v1/inboxes`` and ``POST /api/v1/inboxes`` at 1 and 32 concurrent
   keep-alive connections from a small asyncio HTTP/1.1 client (stdlib only), with a
   warm-up before each measured window: closed loop (each connection sends its next
   request as soon as the previous answer is in) and, with ``--rate R``, open loop too;
4. prints req/s, p50/p90/p99/max latency, errors, CPU used by the server, PostgreSQL
   and this client, how long the server and this client waited runnable for a CPU (the
   run-queue wait: on a shared machine the usual cause of a long tail), and the audit
   rows written, as a table or (``--json``) as JSON;
5. stops the server and deletes the cluster and the temp folder, also on Ctrl-C.

Closed loop, the latency is mostly queueing: at saturation p50 is just
concurrency / throughput, so a closed loop cannot say what a client sees at a given
load. ``--rate R`` adds open-loop runs: R requests per second in all, spread over the
N connections on a fixed timetable (connection c sends its k-th request at
``start + (k*N + c) / R``). A request's latency is counted from its *scheduled* send
time, so a server that stalls cannot hide the stall by holding back the requests that
would have queued behind it (no coordinated omission); a connection still waiting for
an answer sends its next request late, and that lateness is in the figure.

Timing never makes it fail: the exit status is 0 unless setup failed (1) or some
request got a non-2xx answer or no answer (1), which means something is broken.

Usage: ``.venv/bin/python bench/api_bench.py [--duration 5] [--rate 1000] [--json]``
(see ``--help``).  Network traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

import psycopg2  # noqa: E402 - after the sys.path fix above

from agentpost.dev.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError  # noqa: E402
from agentpost.storage.migrations import MigrationError, migrate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pg_stats  # noqa: E402 - bench/pg_stats.py, beside this script

API = "/api/v1/inboxes"
DBNAME = "agentpost_bench"
TARGET_RPS = 1000.0
TARGET_P99_MS = 25.0
TARGET_CONCURRENCY = 32
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    """Progress goes to stderr so that ``--json`` output on stdout stays clean."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class SetupError(RuntimeError):
    """The benchmark could not get a server to measure."""


# --------------------------------------------------------------------------- HTTP client


class Response:
    """One parsed HTTP response."""

    __slots__ = ("body", "close", "framing", "status")

    def __init__(self, status: int, body: bytes, close: bool, framing: str) -> None:
        self.status = status
        self.body = body
        self.close = close
        self.framing = framing  # "content-length", "chunked" or "close"


class HTTPConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time.

    The parser knows just enough HTTP for this server: a status line, headers,
    then a body framed by Content-Length or chunked transfer coding (1xx, 204 and
    304 have none; anything else without framing is read until the server closes).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        self._reset_parser()

    def _reset_parser(self) -> None:
        self._status = 0
        self._head_done = False
        self._length: int | None = None  # Content-Length, when given
        self._chunked = False
        self._close = False
        self._pos = 0  # where parsing continues in _buf
        self._chunks: list[bytes] = []

    # asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is not None:
            try:
                self._parse()
            except ValueError as exc:  # e.g. a Content-Length that is not a number
                self._fail(ConnectionError(f"unparsable response: {exc}"))
                self.close()

    def eof_received(self) -> bool:
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and self._head_done and self._length is None \
                and not self._chunked:
            # Body delimited by connection close.
            self._finish(bytes(self._buf[self._pos:]))
            return
        self._fail(ConnectionError(f"connection lost: {exc or 'closed by server'}"))

    # public -------------------------------------------------------------------
    def request(self, payload: bytes, timeout_s: float) -> asyncio.Future[Response]:
        """Send one request; the future resolves with its response."""
        if self.closed or self._transport is None:
            raise ConnectionError("connection is closed")
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._reset_parser()
        self._timer = self._loop.call_later(timeout_s, self._on_timeout)
        self._transport.write(payload)
        if self._buf:
            self._parse()
        return waiter

    def close(self) -> None:
        """Drop the connection (after an error or when the server asks to)."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # internals ----------------------------------------------------------------
    def _on_timeout(self) -> None:
        self._timer = None
        self._fail(TimeoutError("no response in time"))
        self.close()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _finish(self, body: bytes) -> None:
        waiter, self._waiter = self._waiter, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if waiter is not None and not waiter.done():
            framing = ("chunked" if self._chunked else
                       "content-length" if self._length is not None else "close")
            waiter.set_result(Response(self._status, body, self._close, framing))

    def _parse(self) -> None:
        buf = self._buf
        if not self._head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            try:
                self._status = int(lines[0].split(b" ", 2)[1])
            except (IndexError, ValueError):
                self._fail(ConnectionError(f"bad status line {lines[0][:80]!r}"))
                self.close()
                return
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self._length = int(value.strip())
                elif name == b"transfer-encoding":
                    self._chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    self._close = b"close" in value.lower()
            self._head_done = True
            self._pos = end + 4
            if 100 <= self._status < 200:  # interim response: skip it, wait for the real one
                del buf[: self._pos]
                self._reset_parser()
                self._parse()
                return
            if self._status in (204, 304):
                self._length = 0
                self._chunked = False
        if self._chunked:
            self._parse_chunks()
        elif self._length is not None:
            end = self._pos + self._length
            if len(buf) >= end:
                body = bytes(buf[self._pos:end])
                del buf[:end]
                self._finish(body)
        # else: delimited by close, handled in connection_lost

    def _parse_chunks(self) -> None:
        buf = self._buf
        while True:
            line_end = buf.find(b"\r\n", self._pos)
            if line_end < 0:
                return
            try:
                size = int(bytes(buf[self._pos:line_end]).split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._fail(ConnectionError("bad chunk size"))
                self.close()
                return
            if size == 0:
                # Last chunk, then optional trailers, then an empty line.
                trailer_start = line_end + 2
                if buf[trailer_start:trailer_start + 2] == b"\r\n":
                    end = trailer_start + 2
                else:
                    found = buf.find(b"\r\n\r\n", trailer_start)
                    if found < 0:
                        return
                    end = found + 4
                del buf[:end]
                self._finish(b"".join(self._chunks))
                return
            data_start = line_end + 2
            data_end = data_start + size
            if len(buf) < data_end + 2:
                return
            self._chunks.append(bytes(buf[data_start:data_end]))
            self._pos = data_end + 2


async def open_connection(port: int) -> HTTPConnection:
    """A new keep-alive connection to the server (asyncio sets TCP_NODELAY itself)."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: HTTPConnection(loop), "127.0.0.1", port)
    return proto


def build_get(port: int, key: str, path: str = API) -> bytes:
    """The bytes of an authenticated GET."""
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key}\r\nAccept: application/json\r\n\r\n").encode()


def build_post(port: int, key: str, body: dict[str, Any], path: str = API) -> bytes:
    """The bytes of an authenticated JSON POST."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key}\r\nAccept: application/json\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n")
    return head.encode() + raw


async def one_request(port: int, payload: bytes, timeout_s: float = 10.0) -> Response:
    """A single request on its own connection (setup and checks, not load)."""
    conn = await open_connection(port)
    try:
        return await conn.request(payload, timeout_s)
    finally:
        conn.close()


# --------------------------------------------------------------------------- CPU accounting


def proc_stat(pid: int) -> tuple[int, float, float]:
    """(ppid, own CPU seconds, reaped children's CPU seconds) of a process."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        raw = handle.read()
    fields = raw[raw.rindex(b")") + 2:].split()
    # After "pid (comm) ": state ppid ... utime(11) stime(12) cutime(13) cstime(14)
    own = (int(fields[11]) + int(fields[12])) / CLK_TCK
    children = (int(fields[13]) + int(fields[14])) / CLK_TCK
    return int(fields[1]), own, children


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far."""
    try:
        return proc_stat(pid)[1]
    except (OSError, ValueError, IndexError):
        return float("nan")


def tree_cpu(root_pid: int | None) -> float:
    """CPU seconds of a PostgreSQL postmaster, its live backends and its reaped ones."""
    if root_pid is None:
        return float("nan")
    total = 0.0
    try:
        _, own, reaped = proc_stat(root_pid)
        total += own + reaped
    except (OSError, ValueError, IndexError):
        return float("nan")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid, own, _ = proc_stat(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
        if ppid == root_pid:
            total += own
    return total


def run_wait(pid: int | None) -> float:
    """Seconds a process's threads have been runnable but not running (the run-queue
    wait in /proc/PID/task/*/schedstat): on a shared machine this, not our code, is
    often the latency tail. NaN where the kernel has no schedstat."""
    if pid is None:
        return float("nan")
    total = 0
    try:
        for entry in os.scandir(f"/proc/{pid}/task"):
            with open(f"{entry.path}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return total / 1e9


def self_cpu() -> float:
    """CPU seconds this benchmark process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- load


@dataclass
class Scenario:
    """One measured run."""

    name: str  # "GET" or "POST"
    concurrency: int
    expect: int  # the 2xx status a request should get
    rate: float | None = None  # open loop: requests/s over all connections; None: closed


@dataclass
class Run:
    """What one scenario measured (times in seconds unless noted)."""

    scenario: Scenario
    latencies: list[float] = field(default_factory=list)  # 2xx answers in the window
    statuses: dict[str, int] = field(default_factory=dict)  # every answer in the window
    errors: dict[str, int] = field(default_factory=dict)  # non-2xx / no answer, whole run
    total_answers: int = 0  # including warm-up, for the audit check
    elapsed: float = 0.0
    server_cpu: float = 0.0
    postgres_cpu: float = 0.0
    client_cpu: float = 0.0
    server_wait: float = 0.0  # run-queue wait (runnable, no CPU) of the serving process
    client_wait: float = 0.0  # the same for this load generator
    audit_rows: int = 0
    audit_complete: bool = False
    timed_out: bool = False
    late_sends: int = 0  # open loop: window requests sent > 1 ms after their scheduled time
    send_lags: list[float] = field(default_factory=list)  # open loop: sent minus due, window


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class Window:
    """When the measured window opens and closes (perf_counter); inf until known."""

    def __init__(self) -> None:
        self.start = math.inf
        self.end = math.inf


def _count(table: dict[str, int], key: str) -> None:
    table[key] = table.get(key, 0) + 1


async def worker(wid: int, port: int, next_payload: Any, run: Run, window: Window,
                 stop_at: float, timeout_s: float) -> None:
    """Send requests back to back on one keep-alive connection until the window closes."""
    clock = time.perf_counter
    latencies = run.latencies
    expect = run.scenario.expect
    conn: HTTPConnection | None = None
    try:
        while True:
            t0 = clock()
            if t0 >= window.end or t0 >= stop_at:
                return
            if conn is None or conn.closed:
                try:
                    conn = await open_connection(port)
                except OSError as exc:
                    _count(run.errors, f"connect: {type(exc).__name__}")
                    await asyncio.sleep(0.05)
                    continue
                t0 = clock()
            payload = next_payload(wid)
            try:
                response = await conn.request(payload, timeout_s)
            except (ConnectionError, TimeoutError, OSError) as exc:
                _count(run.errors, f"no answer: {type(exc).__name__}")
                conn.close()
                conn = None
                continue
            t1 = clock()
            run.total_answers += 1
            status = response.status
            if status != expect:  # non-2xx, or a 2xx other than the one expected
                _count(run.errors, f"HTTP {status}")
            if t0 >= window.start:
                _count(run.statuses, str(status))
                if 200 <= status < 300:
                    latencies.append(t1 - t0)
            if response.close:
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()


async def paced_worker(wid: int, port: int, next_payload: Any, run: Run, window: Window,
                       stop_at: float, timeout_s: float, origin: float) -> None:
    """Open loop: send on this connection's share of a fixed timetable.

    Request k of connection ``wid`` is due at ``origin + (k * N + wid) / rate``. Its
    latency runs from that due time, not from when it could be sent: if the previous
    answer is late the next request goes out late and carries the delay (no coordinated
    omission). Requests due in the window are counted; the run ends once they are
    answered (or the hard stop)."""
    clock = time.perf_counter
    rate = run.scenario.rate
    assert rate is not None
    step = run.scenario.concurrency / rate
    latencies = run.latencies
    expect = run.scenario.expect
    conn: HTTPConnection | None = None
    due = origin + wid / rate
    try:
        while due < window.end and due < stop_at:
            now = clock()
            if due > now:
                await asyncio.sleep(due - now)
            if conn is None or conn.closed:
                try:
                    conn = await open_connection(port)
                except OSError as exc:
                    _count(run.errors, f"connect: {type(exc).__name__}")
                    due += step
                    continue
            in_window = due >= window.start
            if in_window:
                lag = clock() - due
                run.send_lags.append(lag)
                if lag > 0.001:
                    run.late_sends += 1
            try:
                response = await conn.request(next_payload(wid), timeout_s)
            except (ConnectionError, TimeoutError, OSError) as exc:
                _count(run.errors, f"no answer: {type(exc).__name__}")
                conn.close()
                conn = None
                due += step
                continue
            t1 = clock()
            run.total_answers += 1
            status = response.status
            if status != expect:
                _count(run.errors, f"HTTP {status}")
            if in_window:
                _count(run.statuses, str(status))
                if 200 <= status < 300:
                    latencies.append(t1 - due)
            if response.close:
                conn.close()
                conn = None
            due += step
    finally:
        if conn is not None:
            conn.close()


async def run_scenario(scenario: Scenario, port: int, next_payload: Any, warmup_s: float,
                       duration_s: float, timeout_s: float, server_pid: int,
                       postmaster_pid: int | None, workers: int = 1) -> Run:
    """Warm up, then measure for ``duration_s``; never runs much past the planned end."""
    server_cpu = tree_cpu if workers > 1 else process_cpu
    run = Run(scenario)
    window = Window()
    hard_stop = time.perf_counter() + warmup_s + duration_s + timeout_s + 5.0
    if scenario.rate is None:
        tasks = [asyncio.ensure_future(worker(wid, port, next_payload, run, window, hard_stop,
                                              timeout_s))
                 for wid in range(scenario.concurrency)]
    else:  # one timetable for all: the first request is due a little after now
        origin = time.perf_counter() + 0.01
        tasks = [asyncio.ensure_future(paced_worker(wid, port, next_payload, run, window,
                                                    hard_stop, timeout_s, origin))
                 for wid in range(scenario.concurrency)]
    all_done = asyncio.gather(*tasks)
    # On Ctrl-C asyncio.run cancels the workers; read the outcome so that asyncio does
    # not complain that the gathering future's CancelledError "was never retrieved".
    all_done.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        await asyncio.wait_for(asyncio.shield(all_done), warmup_s)
    except TimeoutError:
        pass  # the usual case: warm-up is over, workers keep going
    srv0, pg0, me0 = server_cpu(server_pid), tree_cpu(postmaster_pid), self_cpu()
    wait0 = run_wait(server_pid), run_wait(os.getpid())
    window.start = time.perf_counter()
    window.end = window.start + duration_s
    try:
        await asyncio.wait_for(all_done, duration_s + timeout_s + 5.0)
    except TimeoutError:
        run.timed_out = True  # wait_for cancelled the workers
    finish = time.perf_counter()
    run.elapsed = finish - window.start
    run.server_cpu = server_cpu(server_pid) - srv0
    run.postgres_cpu = tree_cpu(postmaster_pid) - pg0
    run.client_cpu = self_cpu() - me0
    run.server_wait = run_wait(server_pid) - wait0[0]
    run.client_wait = run_wait(os.getpid()) - wait0[1]
    for task in tasks:  # surface unexpected worker crashes
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return run


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    """An unused loopback port (tiny race until the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def toml_str(value: str) -> str:
    """A TOML basic string."""
    return json.dumps(value)


def write_config(path: Path, dsn: str, port: int, pool_size: int | None, log_level: str,
                 workers: int = 1, key_cache: bool = True,
                 settings: list[str] | None = None) -> None:
    """The server's config: defaults, except a private port and no rate limiting, plus
    ``settings`` (``--set section.key=toml-value``) each under its own section."""
    lines = [
        "# Written by bench/api_bench.py",
        "[server]",
        'hostname = "bench.localhost"',
        'environment = "development"',
        f"workers = {workers}",
        *([] if key_cache else ['key_cache_ttl = "0s"  # --no-key-cache']),
        "",
        "[database]",
        f"url = {toml_str(dsn)}",
    ]
    if pool_size is not None:
        lines.append(f"pool_size = {pool_size}")
    lines += [
        "",
        "[http]",
        'bind = "127.0.0.1"',
        f"port = {port}",
        "",
        "# Only the API listens: a mail port another server on this machine holds would",
        "# stop this one from starting (and idle listeners cost nothing per request).",
        "[smtp]",
        "mx_enabled = false",
        "submission_enabled = false",
        "",
        "[imap]",
        "enabled = false",
        "",
        "# Disabled so that the token bucket (50/s per key by default) does not throttle",
        "# the benchmark's single API key.",
        "[rate_limit]",
        "enabled = false",
        "",
        "[logging]",
        f"level = {toml_str(log_level)}",
        "",
    ]
    for setting in settings or []:
        name, _, value = setting.partition("=")
        section, _, key = name.strip().partition(".")
        if not (section and key and value.strip()):
            raise SetupError(f"--set {setting!r}: expected section.key=value")
        header = f"[{section}]"
        if header not in lines:
            lines += [header, ""]
        lines.insert(lines.index(header) + 1, f"{key} = {value.strip()}  # --set")
    path.write_text("\n".join(lines), encoding="utf-8")


def agentpost_exe() -> str:
    """The console script next to the running interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / "agentpost"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("agentpost")
    if not found:
        raise SetupError("the `agentpost` console script is not installed in this venv")
    return found


def bootstrap(config_path: Path) -> str:
    """Create an organization and return its owner API key."""
    result = subprocess.run(
        [agentpost_exe(), "--config", str(config_path), "bootstrap", "--org", "bench", "--json"],
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise SetupError(f"agentpost bootstrap failed ({result.returncode}):\n{result.stderr}")
    for line in reversed(result.stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and "api_key" in data:
                return str(data["api_key"])
    raise SetupError(f"no api_key in bootstrap output: {result.stdout!r}")


def tail(path: Path, limit: int = 4000) -> str:
    """The end of a log file, for error messages."""
    try:
        return path.read_bytes()[-limit:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def wait_healthy(proc: subprocess.Popen[bytes], port: int, log_path: Path,
                 timeout_s: float = 60.0) -> None:
    """Poll GET /healthz until it answers 200; fail early if the server exits."""
    payload = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError(f"agentpost serve exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            response = asyncio.run(one_request(port, payload, 2.0))
            if response.status == 200:
                return
            last = f"HTTP {response.status}"
        except (OSError, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    raise SetupError(f"/healthz did not answer within {timeout_s:.0f}s ({last}):\n"
                     f"{tail(log_path)}")


def listening_sockets(port: int) -> int:
    """How many sockets listen on ``port`` (each worker holds its own, SO_REUSEPORT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def wait_listeners(proc: subprocess.Popen[bytes], port: int, count: int, log_path: Path,
                   timeout_s: float = 60.0) -> None:
    """With ``server.workers = N``, wait until all N processes listen.

    /healthz answers as soon as the first process listens; the others are still
    importing for a second or more. Keep-alive connections opened meanwhile all land
    in the first process and stay there, so the run measured one busy process and an
    idle one (every one of the 32 connections in one process, seen with ``ss -tnp``)."""
    deadline = time.monotonic() + timeout_s
    while listening_sockets(port) < count:
        if proc.poll() is not None:
            raise SetupError(f"agentpost serve exited with {proc.returncode}:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise SetupError(f"only {listening_sockets(port)} of {count} worker processes "
                             f"listen after {timeout_s:.0f}s:\n{tail(log_path)}")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, wait for the clean shutdown (it flushes the audit buffer), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        log("server ignored SIGTERM for 20 s; killing it")
        proc.kill()
        proc.wait(timeout=10)


def postmaster_pid(cluster: EmbeddedPostgres) -> int | None:
    """The postmaster's pid, from its pid file."""
    try:
        return int((cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def processes_using(path: Path) -> list[int]:
    """Pids whose command line names *path*: initdb, pg_ctl or a postmaster of our cluster.

    The cluster's folder is named after this run's private temp folder, so anything
    naming it was started by this run (typically an initdb or a postmaster that a
    Ctrl-C during setup left running on its own).
    """
    needle = str(path).encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found


def destroy_cluster(cluster: EmbeddedPostgres) -> None:
    """Stop and delete the cluster, even when setup was interrupted half way."""
    base = cluster.data_dir.parent
    problem: Exception | None = None
    for attempt in range(15):
        try:
            cluster.destroy()
            problem = None
        except Exception as exc:  # e.g. an orphaned initdb still writing files
            problem = exc
        stragglers = processes_using(base)
        if problem is None and not stragglers and not base.exists():
            return
        for pid in stragglers:  # fast shutdown first, then no more patience
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGINT if attempt < 5 else signal.SIGKILL)
        time.sleep(1.0)
    log(f"could not delete the PostgreSQL cluster in {base}: {problem or 'still in use'}")


def audit_count(conn: Any) -> int:
    """Rows in the audit trail."""
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_log")
        return int(cur.fetchone()[0])


def settled_audit_count(conn: Any, before: int, expected: int) -> tuple[int, bool]:
    """Rows written since ``before``, after the buffered flush had its chance (~0.5 s).

    Waits a little longer (at most 5 s) while rows are still arriving, because under
    load the flush can lag one interval behind.
    """
    time.sleep(0.5)
    deadline = time.monotonic() + 5.0
    written = audit_count(conn) - before
    while written < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        written = audit_count(conn) - before
    return written, written >= expected


# --------------------------------------------------------------------------- reporting


def machine_line(m: dict[str, Any]) -> str:
    """The report's machine line, from :func:`machine_info` (every bench script's)."""
    return (f"  machine : {m['nproc']} CPUs (nproc) {m['cpu_model']}, Linux {m['kernel']}, "
            f"Python {m['python']}, Twisted {m['twisted']}, load avg at start "
            f"{' '.join(str(x) for x in m['loadavg_at_start'])}, code {m['code']}")


def machine_info() -> dict[str, Any]:
    """Who ran this, on what."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    import twisted

    code = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        described = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10, check=False, stdin=subprocess.DEVNULL)
        if described.returncode == 0:
            code = described.stdout.strip()
    return {
        "code": code,
        "nproc": nproc,
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def summarize(run: Run, duration_s: float) -> dict[str, Any]:
    """The figures of one run, as plain data."""
    lat = sorted(run.latencies)
    ok = len(lat)
    elapsed = run.elapsed or duration_s
    ms = 1000.0

    def pct(v: float) -> float | None:
        return round(100.0 * v / elapsed, 1) if elapsed and not math.isnan(v) else None

    def ms_or_none(v: float) -> float | None:
        return None if math.isnan(v) else round(v * ms, 2)

    return {
        "method": run.scenario.name,
        "path": API,
        "concurrency": run.scenario.concurrency,
        "mode": "closed" if run.scenario.rate is None else "open",
        "target_rate": run.scenario.rate,
        "late_sends": run.late_sends,
        "send_lag_ms": None if not run.send_lags else {
            "p50": ms_or_none(percentile(sorted(run.send_lags), 50)),
            "p99": ms_or_none(percentile(sorted(run.send_lags), 99))},
        "requests_ok": ok,
        "requests_per_s": round(ok / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {
            "p50": ms_or_none(percentile(lat, 50)),
            "p90": ms_or_none(percentile(lat, 90)),
            "p99": ms_or_none(percentile(lat, 99)),
            "max": ms_or_none(lat[-1]) if lat else None,
            "mean": ms_or_none(sum(lat) / ok) if ok else None,
        },
        "statuses": run.statuses,
        "errors": sum(run.errors.values()),
        "error_kinds": run.errors,
        "elapsed_s": round(elapsed, 3),
        "server_cpu_ms_per_request": round(1000.0 * run.server_cpu / ok, 3) if ok else None,
        "cpu_pct_of_one_core": {
            "server": pct(run.server_cpu),
            "postgres": pct(run.postgres_cpu),
            "client": pct(run.client_cpu),
        },
        "run_queue_wait_pct_of_window": {  # runnable but not running (first process only)
            "server": pct(run.server_wait),
            "client": pct(run.client_wait),
        },
        "audit_rows_written": run.audit_rows,
        "answers_incl_warmup": run.total_answers,
        "audit_complete": run.audit_complete,
        "timed_out": run.timed_out,
    }


def target_verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare the GET run at the target concurrency against the target (informational)."""
    verdict: dict[str, Any] = {
        "description": f"GET {API} at {TARGET_CONCURRENCY} clients: >= {TARGET_RPS:,.0f} req/s "
                       f"and p99 < {TARGET_P99_MS:.0f} ms",
        "requests_per_s": None, "p99_ms": None, "met": None,
    }
    for res in results:
        if (res["method"] == "GET" and res["concurrency"] == TARGET_CONCURRENCY
                and res.get("mode", "closed") == "closed"):
            verdict["requests_per_s"] = res["requests_per_s"]
            verdict["p99_ms"] = res["latency_ms"]["p99"]
            verdict["met"] = (res["requests_per_s"] >= TARGET_RPS
                              and res["latency_ms"]["p99"] < TARGET_P99_MS
                              and res["errors"] == 0)
    return verdict


def open_loop_verdict(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's target read as an open loop: every GET run at >= TARGET_RPS scheduled
    requests/s, whether it kept that rate (99%) with p99 < TARGET_P99_MS (informational)."""
    verdicts = []
    for res in results:
        if res["method"] != "GET" or res.get("mode") != "open" \
                or (res["target_rate"] or 0) < TARGET_RPS:
            continue
        p99 = res["latency_ms"]["p99"]
        verdicts.append({
            "concurrency": res["concurrency"], "rate": res["target_rate"],
            "requests_per_s": res["requests_per_s"], "p99_ms": p99,
            "met": (res["requests_per_s"] >= 0.99 * res["target_rate"]
                    and p99 is not None and p99 < TARGET_P99_MS and res["errors"] == 0),
        })
    return verdicts


def fmt(value: float, digits: int = 1) -> str:
    """A number for the table ('-' when unknown)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:,.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    """The human-readable report."""
    m, s = report["machine"], report["setup"]
    out = [
        "",
        "AgentPost API benchmark",
        machine_line(m),
        "  server  : `agentpost serve` in its own process"
        + (f" ({s['workers']} workers)" if s.get("workers", 1) > 1 else "")
        + ", HTTP/1.1 on 127.0.0.1, "
        f"db pool_size {s['pool_size']}, rate limiter DISABLED, audit trail ON, key cache "
        f"{'ON' if s.get('key_cache', True) else 'OFF'}"
        + (f", --set {' '.join(s['settings'])}" if s.get("settings") else ""),
        f"  database: PostgreSQL {s['postgres_version']}, embedded cluster, "
        f"fsync={'on' if s['fsync'] else 'off'} synchronous_commit="
        f"{'on' if s['fsync'] else 'off'}",
        f"  load    : asyncio keep-alive clients, warm-up {s['warmup_s']} s + "
        f"{s['duration_s']} s measured per scenario; {s['seeded_inboxes']} inboxes seeded, "
        f"GET returns {s['get_page_items']} per page ({s['get_page_bytes']} bytes, "
        f"{s['get_response_framing']} framing)",
        "",
    ]
    header = (f"{'scenario':<22}{'rate/s':>7}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}"
              f"{'p99 ms':>9}{'max ms':>9}{'errors':>8}{'srv CPU':>9}{'pg CPU':>8}"
              f"{'cli CPU':>9}{'srv ms/req':>11}{'audit rows':>14}")
    out.append(header)
    out.append("-" * len(header))
    for r in report["results"]:
        lat, cpu = r["latency_ms"], r["cpu_pct_of_one_core"]
        audit = f"{r['audit_rows_written']}/{r['answers_incl_warmup']}"
        if not r["audit_complete"]:
            audit += "!"
        out.append(
            f"{r['method'] + ' ' + r['path']:<22}"
            f"{'closed' if r.get('target_rate') is None else fmt(r['target_rate'], 0):>7}"
            f"{r['concurrency']:>5}"
            f"{fmt(r['requests_per_s'], 0):>9}{fmt(lat['p50'], 2):>9}{fmt(lat['p90'], 2):>9}"
            f"{fmt(lat['p99'], 2):>9}{fmt(lat['max'], 1):>9}{r['errors']:>8}"
            f"{fmt(cpu['server'], 0) + '%':>9}{fmt(cpu['postgres'], 0) + '%':>8}"
            f"{fmt(cpu['client'], 0) + '%':>9}{fmt(r['server_cpu_ms_per_request'], 3):>11}"
            f"{audit:>14}"
        )
    out.append("")
    out.append("  CPU = % of one core during the measured window (server: the agentpost process; "
               "pg: postmaster + backends; cli: this load generator);")
    out.append("  srv ms/req = server CPU time per successful request (less noisy than req/s "
               "on a shared machine).")
    out.append("  audit rows = rows added to audit_log during the scenario / answers received "
               "(incl. warm-up); '!' = fewer rows than answers.")
    for r in report["results"]:
        wait = r.get("run_queue_wait_pct_of_window") or {}
        if wait.get("server") is not None:
            out.append(f"  run-queue wait, {r['method']} c={r['concurrency']}: server "
                       f"{fmt(wait['server'], 0)}%, client {fmt(wait.get('client'), 0)}% of the "
                       "window (runnable but not running: other load on the machine)")
    if any(r.get("mode") == "open" for r in report["results"]):
        out.append("  rate/s = open loop: requests scheduled per second over all connections on a "
                   "fixed timetable, latency from the")
        out.append("  scheduled send time (no coordinated omission), req/s = achieved; "
                   "'closed' = each connection sends as soon as it has its answer.")
        for r in report["results"]:
            if r.get("mode") == "open" and r["late_sends"]:
                lag = r["send_lag_ms"] or {}
                out.append(f"  {r['method']} c={r['concurrency']} @{fmt(r['target_rate'], 0)}/s: "
                           f"{r['late_sends']} requests went out > 1 ms after their due time "
                           f"(send lag p50 {fmt(lag.get('p50'), 2)} ms, p99 "
                           f"{fmt(lag.get('p99'), 2)} ms: the connection's previous answer "
                           "was still pending, or this client was slow)")
    for r in report["results"]:
        if r["error_kinds"]:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(r["error_kinds"].items()))
            out.append(f"  errors in {r['method']} c={r['concurrency']}: {kinds}")
        if r["timed_out"]:
            out.append(f"  {r['method']} c={r['concurrency']}: stopped by the hard time limit")
    v = report["target"]
    if v["met"] is None:
        out.append(f"  target  : {v['description']} -> not measured in this run")
    else:
        out.append(f"  target  : {v['description']} -> measured {fmt(v['requests_per_s'], 0)} "
                   f"req/s, p99 {fmt(v['p99_ms'], 2)} ms: "
                   f"{'MET' if v['met'] else 'NOT MET'} (informational, never fails the run)")
    for o in report.get("target_open", []):
        out.append(f"  open    : GET at {fmt(o['rate'], 0)} req/s scheduled over "
                   f"{o['concurrency']} connections -> achieved "
                   f"{fmt(o['requests_per_s'], 0)} req/s, p99 "
                   f"{fmt(o['p99_ms'], 2)} ms: {'MET' if o['met'] else 'NOT MET'} "
                   "(p99 < 25 ms at >= 99% of the rate)")
    out.append("")
    print("\n".join(out), flush=True)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=float, default=5.0,
                        help="measured seconds per scenario (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="warm-up seconds before each measured window (default 1)")
    parser.add_argument("--concurrency", default="1,32",
                        help="comma-separated client counts (default 1,32)")
    parser.add_argument("--scenarios", default="get,post",
                        help="comma-separated subset of get,post (default both)")
    parser.add_argument("--rate", default="", metavar="R[,R...]",
                        help="also run each scenario open loop at R requests/s in all (over "
                             "the --concurrency connections, on a fixed timetable; latency "
                             "from the scheduled send time), e.g. --rate 1000")
    parser.add_argument("--only-rate", action="store_true",
                        help="with --rate: skip the closed-loop runs")
    parser.add_argument("--seed", type=int, default=50,
                        help="inboxes created before the GET runs (default 50)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="per-request timeout in seconds (default 10)")
    parser.add_argument("--no-fsync", action="store_true",
                        help="run PostgreSQL with fsync/synchronous_commit off (not durable)")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="database.pool_size for the server (default: the server default)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="server.workers: N processes share the port (default 1; server "
                             "CPU is then the whole process tree's)")
    parser.add_argument("--no-key-cache", action="store_true",
                        help="server.key_cache_ttl = 0: every request reads its API key from "
                             "PostgreSQL (the behaviour before the key cache, for comparison)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other server setting, VALUE in TOML (repeatable), e.g. "
                             "--set server.gc_freeze=false --set server.gc_young_threshold=0")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"],
                        help="server logging.level (default info, as in production)")
    parser.add_argument("--py-spy", metavar="FILE", default=None,
                        help="record the server with py-spy (must be installed) during the "
                             "measured window of the GET run at the highest concurrency; "
                             "writes collapsed stacks (flamegraph.pl and speedscope read "
                             "them). Skews that run's figures.")
    parser.add_argument("--py-spy-native", action="store_true",
                        help="with --py-spy: also sample C frames (py-spy --native), to see "
                             "the time inside psycopg2, libpq and system calls")
    parser.add_argument("--py-spy-args", default="", metavar="ARGS",
                        help="extra py-spy record options, e.g. '--gil' (only the thread "
                             "holding the GIL: closer to CPU time than wall-clock samples), "
                             "'--idle'")
    parser.add_argument("--cprofile", metavar="FILE", default=None,
                        help="run the server under cProfile (CPU clock) and write its stats "
                             "here when it stops (pstats format; the whole run, setup "
                             "included). py-spy samples wall time; this counts CPU only, but "
                             "slows every call.")
    parser.add_argument("--server-log", metavar="FILE", default=None,
                        help="keep a copy of the server's log here (it is deleted otherwise)")
    parser.add_argument("--pg-stats", action="store_true",
                        help="load pg_stat_statements with track_planning and print, after "
                             "each run (warm-up included), plans, calls, planning and "
                             "execution time per statement, top by planning time (stderr)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout instead of the table")
    args = parser.parse_args(argv)
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        parser.error("--concurrency takes integers, e.g. 1,32")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency values must be >= 1")
    args.scenarios = [s.strip().lower() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenarios or set(args.scenarios) - {"get", "post"}:
        parser.error("--scenarios takes get, post or get,post")
    try:
        args.rate = sorted({float(r) for r in args.rate.split(",") if r.strip()})
    except ValueError:
        parser.error("--rate takes numbers, e.g. 1000 or 500,1000")
    if any(r <= 0 for r in args.rate):
        parser.error("--rate values must be > 0")
    if args.only_rate and not args.rate:
        parser.error("--only-rate needs --rate")
    if args.duration <= 0 or args.warmup < 0 or args.timeout <= 0 or args.seed < 0:
        parser.error("--duration and --timeout must be > 0, --warmup and --seed >= 0")
    return args


# The server under cProfile with a CPU clock: on a busy machine a wall clock would
# charge other processes' time slices to whatever call was running (argv: out, script...).
_CPROFILE = """
import cProfile, runpy, sys, time
out = sys.argv[1]
sys.argv = sys.argv[2:]
prof = cProfile.Profile(time.thread_time)
try:
    prof.runcall(runpy.run_path, sys.argv[0], run_name="__main__")
except SystemExit:
    pass
finally:
    prof.dump_stats(out)
"""


class Bench:
    """Owns every resource the benchmark creates, so that cleanup can release them all."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="agentpost-bench-"))
        self.cluster: EmbeddedPostgres | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.server_log: Any = None
        self.db: Any = None
        self.port = 0
        self.key = ""
        self.counter = itertools.count()

    # setup ---------------------------------------------------------------------
    def setup(self) -> dict[str, Any]:
        args = self.args
        fsync = not args.no_fsync
        log(f"starting PostgreSQL (fsync={'on' if fsync else 'off'}) under {self.tmp}")
        self.cluster = EmbeddedPostgres(self.tmp / "var", fsync=fsync, name="bench")
        self.cluster.start()
        admin = psycopg2.connect(self.cluster.dsn("postgres"), connect_timeout=10)
        try:
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f"CREATE DATABASE {DBNAME}")
                cur.execute("SHOW server_version")
                pg_version = cur.fetchone()[0]
        finally:
            admin.close()
        dsn = self.cluster.dsn(DBNAME)
        if args.pg_stats:
            pg_stats.enable(self.cluster, [DBNAME])
        migrate(dsn)
        self.db = psycopg2.connect(dsn, connect_timeout=10)
        self.db.autocommit = True

        self.port = free_port()
        config = self.tmp / "agentpost.toml"
        write_config(config, dsn, self.port, args.pool_size, args.log_level, args.workers,
                     not args.no_key_cache, args.set)
        log("bootstrapping an organization")
        self.key = bootstrap(config)

        log_path = self.tmp / "server.log"
        self.server_log = open(log_path, "wb")  # closed in cleanup()
        log(f"starting agentpost serve on 127.0.0.1:{self.port} (log: {log_path})")
        profile = ([sys.executable, "-c", _CPROFILE, str(Path(args.cprofile).resolve())]
                   if args.cprofile else [])
        self.server = subprocess.Popen(
            [*profile, agentpost_exe(), "--config", str(config), "serve"],
            stdin=subprocess.DEVNULL, stdout=self.server_log, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the server ourselves
        )
        wait_healthy(self.server, self.port, log_path)
        if args.workers > 1:
            wait_listeners(self.server, self.port, args.workers, log_path)
        from agentpost.config import load_config

        pool_size = load_config(config).database.pool_size
        return {"fsync": fsync, "postgres_version": pg_version, "pool_size": pool_size,
                "duration_s": args.duration, "warmup_s": args.warmup,
                "seeded_inboxes": 0, "get_page_items": None, "get_page_bytes": None,
                "get_response_framing": None,
                "rate_limit_enabled": False, "audit_enabled": True,
                "log_level": args.log_level, "workers": args.workers,
                "key_cache": not args.no_key_cache, "settings": args.set}

    # load ----------------------------------------------------------------------
    def post_payload(self, wid: int) -> bytes:
        n = next(self.counter)
        return build_post(self.port, self.key, {"username": f"bench-{wid}-{n}",
                                                "display_name": "Bench"})

    async def seed(self, count: int) -> None:
        conn = await open_connection(self.port)
        try:
            for i in range(count):
                payload = build_post(self.port, self.key,
                                     {"username": f"seed-{i}", "display_name": "Bench seed"})
                response = await conn.request(payload, self.args.timeout)
                if response.status != 201:
                    raise SetupError(f"seeding inbox {i}: HTTP {response.status} "
                                     f"{response.body[:300]!r}")
                if response.close:
                    conn.close()
                    conn = await open_connection(self.port)
        finally:
            conn.close()

    async def check_get(self) -> tuple[int, int, str]:
        response = await one_request(self.port, build_get(self.port, self.key),
                                     self.args.timeout)
        if response.status != 200:
            raise SetupError(f"GET {API}: HTTP {response.status} {response.body[:300]!r}")
        data = json.loads(response.body)
        return len(data["data"]), len(response.body), response.framing

    async def run_all(self, setup: dict[str, Any]) -> list[dict[str, Any]]:
        args = self.args
        results = []
        get_payload = build_get(self.port, self.key)
        plans: list[tuple[Scenario, Any]] = []
        rates: list[float | None] = [*([] if args.only_rate else [None]), *args.rate]
        if "get" in args.scenarios:
            plans += [(Scenario("GET", c, 200, r), lambda wid: get_payload)
                      for c in args.concurrency for r in rates]
        if "post" in args.scenarios:
            plans += [(Scenario("POST", c, 201, r), self.post_payload)
                      for c in args.concurrency for r in rates]
        if "get" in args.scenarios:
            log(f"seeding {args.seed} inboxes")
            await self.seed(args.seed)
            setup["seeded_inboxes"] = args.seed
            (setup["get_page_items"], setup["get_page_bytes"],
             setup["get_response_framing"]) = await self.check_get()
        await asyncio.sleep(0.5)  # let the buffered audit rows of the checks be written
        pm_pid = postmaster_pid(self.cluster) if self.cluster else None
        assert self.server is not None
        for scenario, payload in plans:
            pace = ("" if scenario.rate is None
                    else f" open loop at {scenario.rate:,.0f} req/s")
            log(f"{scenario.name} {API} with {scenario.concurrency} client(s){pace}: "
                f"{args.warmup} s warm-up + {args.duration} s")
            profiler = None
            if (args.py_spy and scenario.name == "GET" and scenario.rate == rates[0]
                    and scenario.concurrency == max(args.concurrency)):
                profiler = self.start_profiler(args.warmup + args.duration)
            before = audit_count(self.db)
            if args.pg_stats:
                pg_stats.reset(self.db)
            run = await run_scenario(scenario, self.port, payload, args.warmup, args.duration,
                                     args.timeout, self.server.pid, pm_pid, args.workers)
            if profiler is not None:
                self.finish_profiler(profiler)
            if args.pg_stats:
                log(pg_stats.report(self.db))
            run.audit_rows, run.audit_complete = await asyncio.to_thread(
                settled_audit_count, self.db, before, run.total_answers)
            summary = summarize(run, args.duration)
            results.append(summary)
            log(f"  -> {summary['requests_per_s']:,.0f} req/s, p50 "
                f"{summary['latency_ms']['p50']} ms, p99 {summary['latency_ms']['p99']} ms, "
                f"errors {summary['errors']}")
            if self.server.poll() is not None:
                raise SetupError(f"the server exited ({self.server.returncode}) during "
                                 f"{scenario.name} c={scenario.concurrency}:\n"
                                 f"{tail(self.tmp / 'server.log')}")
        return results

    def start_profiler(self, seconds: float) -> subprocess.Popen[bytes]:
        exe = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if exe is None:
            raise SetupError("--py-spy needs py-spy (pip install py-spy)")
        assert self.server is not None
        log(f"  recording the server with py-spy into {self.args.py_spy}")
        return subprocess.Popen(
            [exe, "record", "--pid", str(self.server.pid), "--duration",
             str(max(1, math.ceil(seconds))), "--rate", "200", "--format", "raw",
             "--output", str(Path(self.args.py_spy).resolve()),
             # --native needs to stop the process for each sample (py-spy refuses
             # --nonblocking with it); the plain profile does not.
             *(["--native"] if self.args.py_spy_native else ["--nonblocking"]),
             *shlex.split(self.args.py_spy_args)],
            stdin=subprocess.DEVNULL, stdout=self.server_log, stderr=subprocess.STDOUT,
        )

    @staticmethod
    def finish_profiler(proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    # teardown ------------------------------------------------------------------
    def cleanup(self) -> None:
        """Release everything, each step on its own so one failure does not skip the rest."""
        with contextlib.suppress(Exception):
            stop_server(self.server)
        if self.server is not None and self.server.poll() is None:
            with contextlib.suppress(Exception):
                self.server.kill()
                self.server.wait(timeout=10)
        if self.server_log is not None:
            with contextlib.suppress(Exception):
                self.server_log.close()
            if self.args.server_log:
                try:
                    shutil.copyfile(self.tmp / "server.log", self.args.server_log)
                except OSError as exc:
                    log(f"could not copy the server log: {exc}")
        if self.db is not None:
            with contextlib.suppress(Exception):
                self.db.close()
        if self.cluster is not None:
            destroy_cluster(self.cluster)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, so each
    benchmark's cleanup (server, cluster, temp folder) runs whichever stopped it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    args = parse_args(argv)
    # Started in the background by a shell, SIGINT may arrive ignored; Ctrl-C must work.
    stop_on_signals()
    machine = machine_info()
    bench = Bench(args)
    try:
        setup = bench.setup()
        results = asyncio.run(bench.run_all(setup))
        # A clean server stop flushes the audit buffer; done here, before the report.
        stop_server(bench.server)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except (SetupError, EmbeddedPostgresError, MigrationError, psycopg2.Error, OSError) as exc:
        log(f"failed: {type(exc).__name__}: {str(exc).strip()}")
        return 1
    finally:
        bench.cleanup()
    report = {"machine": machine, "setup": setup, "results": results,
              "target": target_verdict(results), "target_open": open_loop_verdict(results)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 1 if any(r["errors"] or r["timed_out"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
