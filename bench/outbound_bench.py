#!/usr/bin/env python3
"""Mail out: submission accept rate, API send accept rate and queue drain rate, fsync on.

What it does, start to finish:

1. creates a throw-away PostgreSQL cluster (fsync on) in a temp folder and migrates it
   (``smtp_bench.Harness``, as the other benches), starts a local SMTP sink in this
   process (a small asyncio server: EHLO with PIPELINING, counts every message and
   recipient it accepts), and starts ``agentpost serve`` with ``server.workers = 2``
   (two processes sharing the ports and the queue), SMTP submission with STARTTLS, and
   the ``smtp`` (smarthost) transport pointed at the sink without TLS -- or, when the
   smarthost transport is not available, the ``log`` transport (said so in the output);
2. (b) submission: 20 concurrent smtplib-like sessions (STARTTLS, AUTH PLAIN with an
   inbox and a ``messages:send`` key, one inbox per session) send 4 KiB messages to one
   remote recipient each, MAIL/RCPT/DATA pipelined, for a warm-up and a measured
   window; only a ``250`` after the end of data counts, and the Sent copies committed
   are checked against the accepted count;
3. (c) the send API (``POST /api/v1/inboxes/{id}/messages``, 4 KiB text body, one
   recipient) at 20 keep-alive connections, if the route exists;
4. both again with send limits on (limits so high that nothing is refused, so every
   send charges its inbox's row and the organization's one shared row): the cost of
   the hot row, with PostgreSQL's lock waits sampled from ``pg_stat_activity``;
5. (a) drain: waits for the queue to empty, stops the server, makes every queue row of
   the run due again (SQL: status ``queued``, blob references taken back), starts the
   two processes again and measures how fast they empty the backlog (rows done per
   second, from the first to the last; the sink must count each recipient exactly once);
6. stops everything and deletes the cluster and the temp folder, also on Ctrl-C.

Figures are printed, never asserted: the exit status is 0 unless setup failed or a
check (committed == accepted, delivered exactly once) did not hold.

Usage: ``.venv/bin/python bench/outbound_bench.py [--duration 8] [--json]``.
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.utils
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import api_bench  # noqa: E402 - after the sys.path fix above; it puts the repo on it too
from api_bench import (  # noqa: E402
    SetupError,
    build_post,
    free_port,
    log,
    machine_info,
    one_request,
    toml_str,
    tree_cpu,
)
from smtp_bench import (  # noqa: E402
    SHARED_DOMAIN,
    Harness,
    PgWaitSampler,
    SMTPProtocolError,
    SMTPSession,
    text_lines,
)

SINK_DOMAIN = "sink.bench.example"
SIZE = 4 * 1024
SESSIONS = 20
TARGET_DRAIN = 500.0
TARGET_SUBMIT = 300.0


# --------------------------------------------------------------------------- the sink


class SinkProtocol(asyncio.Protocol):
    """A minimal SMTP receiver: accepts everything, counts messages and recipients."""

    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink
        self.buf = bytearray()
        self.in_data = False
        self.rcpts = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(b"220 sink.bench.example ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    break
                del self.buf[:end + 5]
                self.in_data = False
                self.sink.delivered(self.rcpts)
                self.rcpts = 0
                out.append(b"250 2.0.0 Ok\r\n")
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                break
            line = bytes(self.buf[:end])
            del self.buf[:end + 2]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(b"250-sink.bench.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                           b"250-SMTPUTF8\r\n250-SIZE 52428800\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"RCPT":
                self.rcpts += 1
                out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                self.in_data = True
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                # The body may start in this very buffer: "\r\n.\r\n" needs a line before.
                self.buf[:0] = b"\r\n"
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            elif verb == b"RSET":
                self.rcpts = 0
                out.append(b"250 2.0.0 Ok\r\n")
            else:  # MAIL, HELO, NOOP, ...
                out.append(b"250 2.0.0 Ok\r\n")
        if out:
            self.transport.write(b"".join(out))


class SMTPSink:
    """The sink on its own event loop in a thread (the load generator has the main one)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.messages = 0
        self.recipients = 0
        self.first = 0.0
        self.last = 0.0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smtp-sink", daemon=True)

    def delivered(self, rcpts: int) -> None:
        now = time.perf_counter()
        if not self.messages:
            self.first = now
        self.last = now
        self.messages += 1
        self.recipients += rcpts

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(self._loop.create_server(
            lambda: SinkProtocol(self), "127.0.0.1", self.port, backlog=256))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- config


def write_config(h: Harness, *, sink_port: int, smarthost: bool, limits: bool,
                 submission_port: int, tls: tuple[str, str],
                 extra_outbound: tuple[str, ...] = (), extra_smtp: tuple[str, ...] = ()) -> None:
    out = ['transport = "smtp"', 'smtp_host = "127.0.0.1"', f"smtp_port = {sink_port}",
           'smtp_tls = "none"', "smtp_tls_verify = false"] if smarthost else [
           'transport = "log"']
    out += extra_outbound
    lines = [
        "# Written by bench/outbound_bench.py", "[server]", 'hostname = "bench.localhost"',
        'environment = "development"', "workers = 2", "", "[database]",
        f"url = {toml_str(h.dsn)}", "", "[http]", 'bind = "127.0.0.1"',
        f"port = {h.http_port}", "", "[smtp]", 'mx_bind = "127.0.0.1"',
        f"mx_port = {h.mx_port}", 'submission_bind = "127.0.0.1"',
        f"submission_port = {submission_port}", "submissions_port = -1",
        "max_connections_per_ip = 1000", *extra_smtp, "", "[tls]", f"cert = {toml_str(tls[0])}",
        f"key = {toml_str(tls[1])}", "",
        "# Not measured here; off so that the default ports (143/993) need not be free.",
        "[imap]", "enabled = false", "", "[storage]", 'backend = "local"',
        f"path = {toml_str(str(h.tmp / 'blobs'))}", "", "[mail]",
        f"shared_domain = {toml_str(SHARED_DOMAIN)}", "", "[rate_limit]", "enabled = false",
        "", "[outbound]", *out, "", "[logging]", 'level = "warn"', "",
    ]
    if limits:  # so high that nothing is refused: every send still charges both rows
        lines += ["[send_limits]", "org_rate = 1000000.0", "org_burst = 1000000",
                  "inbox_rate = 1000000.0", "inbox_burst = 1000000",
                  "daily_quota = 1000000000", "inbox_daily_quota = 1000000000", ""]
    (h.tmp / "agentpost.toml").write_text("\n".join(lines), encoding="utf-8")


def smarthost_available() -> bool:
    try:
        import agentpost.outbound.smarthost  # noqa: F401
        from agentpost.config.loader import parse_config

        parse_config({"outbound": {"transport": "smtp", "smtp_host": "127.0.0.1",
                                   "smtp_tls": "none", "smtp_tls_verify": False},
                      "server": {"environment": "development"}}, environ={})
    except Exception as exc:  # not written yet, or not accepted by the config
        log(f"smarthost transport not available ({type(exc).__name__}: {exc})")
        return False
    return True


# --------------------------------------------------------------------------- (b) submission


class Sender:
    """One session's inbox, and its 4 KiB messages (unique Message-ID per message)."""

    def __init__(self, address: str, body: bytes, n: int) -> None:
        self.address = address
        self.body = body
        self.n = n
        self.date = email.utils.format_datetime(email.utils.localtime())

    def head(self, i: int) -> bytes:
        return (f"From: <{self.address}>\r\nTo: <r{self.n}@{SINK_DOMAIN}>\r\n"
                f"Subject: bench {self.n:03d}-{i:08d}\r\nDate: {self.date}\r\n"
                f"Message-ID: <b{self.n:03d}-{i:08d}-{time.time_ns()}@bench.example>\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
                ).encode()


async def submission_session(port: int, ctx: Any, sender: Sender, key: str, stats: dict,
                             window: list[float]) -> None:
    session = await SMTPSession.open(port, tls_context=ctx)
    try:
        token = base64.b64encode(f"\0{sender.address}\0{key}".encode()).decode()
        session.writer.write(f"AUTH PLAIN {token}\r\n".encode())
        await session.expect(235, "AUTH")
        i = 0
        while time.perf_counter() < window[1]:
            t0 = time.perf_counter()
            i += 1
            head = sender.head(i)
            error = await session.send(sender.address, f"r{sender.n}@{SINK_DOMAIN}", head,
                                       sender.body, len(head) + len(sender.body))
            t1 = time.perf_counter()
            stats["accepted" if error is None else "refused"] += 1
            if error is not None:
                stats.setdefault("errors", {}).setdefault(error, 0)
                stats["errors"][error] += 1
            elif t0 >= window[0] and t1 <= window[1]:
                stats["in_window"] += 1
                stats["latencies"].append(t1 - t0)
    finally:
        await session.quit()


async def run_submission(h: Harness, port: int, ctx: Any, senders: list[Sender], key: str,
                         warmup: float, duration: float) -> dict[str, Any]:
    stats: dict[str, Any] = {"accepted": 0, "refused": 0, "in_window": 0, "latencies": []}
    before = h.count("SELECT count(*) FROM messages WHERE direction = 'outbound'")
    start = time.perf_counter()
    window = [start + warmup, start + warmup + duration]
    sampler = PgWaitSampler(h.dsn, 0.02)
    tasks = [asyncio.ensure_future(submission_session(port, ctx, s, key, stats, window))
             for s in senders]
    await asyncio.sleep(warmup)
    cpu0 = tree_cpu(h.server_pid), tree_cpu(h.pg_pid())
    own0 = own_cpu()
    sampler.start()
    await asyncio.gather(*tasks)
    waits = sampler.stop()
    cpu1 = tree_cpu(h.server_pid), tree_cpu(h.pg_pid())
    own1 = own_cpu()
    committed = h.count("SELECT count(*) FROM messages WHERE direction = 'outbound'") - before
    lat = sorted(stats.pop("latencies"))
    return {"msgs_per_s": stats["in_window"] / duration, "accepted": stats["accepted"],
            "refused": stats["refused"], "errors": stats.get("errors", {}),
            "committed": committed, "committed_ok": committed == stats["accepted"],
            "p50_ms": api_bench.percentile(lat, 50) * 1000,
            "p99_ms": api_bench.percentile(lat, 99) * 1000,
            "server_cpu_s": cpu1[0] - cpu0[0], "postgres_cpu_s": cpu1[1] - cpu0[1],
            "server_ms_per_msg": per_msg(cpu1[0] - cpu0[0], stats["in_window"]),
            "postgres_ms_per_msg": per_msg(cpu1[1] - cpu0[1], stats["in_window"]),
            "bench_ms_per_msg": per_msg(own1 - own0, stats["in_window"]),
            "pg_waits": waits["avg_backends"]}


def own_cpu() -> float:
    """This load generator's CPU seconds (its clients and the sink share the machine's
    two cores with the server and PostgreSQL, so they are reported beside them)."""
    t = os.times()
    return t.user + t.system


def per_msg(cpu_s: float, n: int) -> float:
    """CPU milliseconds per message (what judges a change on a shared, noisy machine)."""
    return cpu_s * 1000 / n if n else float("nan")


# --------------------------------------------------------------------------- (c) send API


async def run_api_send(h: Harness, inboxes: list[dict[str, Any]], key: str, warmup: float,
                       duration: float) -> dict[str, Any] | None:
    text = text_lines(SIZE - 200, api_bench_rng()).decode()
    payloads = [build_post(h.http_port, key, {
        "to": [f"api{n}@{SINK_DOMAIN}"], "subject": f"api bench {n}", "text_body": text},
        f"/api/v1/inboxes/{inbox['id']}/messages") for n, inbox in enumerate(inboxes)]
    probe = await one_request(h.http_port, payloads[0], 30.0)
    if probe.status == 404 and b"No such endpoint" in probe.body:
        log("the send API is not there: skipping (c)")
        return None
    if probe.status != 201:
        raise SetupError(f"send API probe: HTTP {probe.status} {probe.body[:300]!r}")
    scenario = api_bench.Scenario("POST send", SESSIONS, 201)
    run = await api_bench.run_scenario(scenario, h.http_port, lambda wid: payloads[wid],
                                       warmup, duration, 30.0, h.server_pid, h.pg_pid(),
                                       workers=2)
    lat = sorted(run.latencies)
    return {"msgs_per_s": len(lat) / duration, "statuses": run.statuses, "errors": run.errors,
            "p50_ms": api_bench.percentile(lat, 50) * 1000,
            "p99_ms": api_bench.percentile(lat, 99) * 1000,
            "server_cpu_s": run.server_cpu, "postgres_cpu_s": run.postgres_cpu,
            "server_ms_per_msg": per_msg(run.server_cpu, len(lat)),
            "postgres_ms_per_msg": per_msg(run.postgres_cpu, len(lat))}


def api_bench_rng() -> Any:
    import random

    return random.Random(7)


# --------------------------------------------------------------------------- (a) drain


def wait_queue_empty(h: Harness, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    left = -1
    while time.monotonic() < deadline:
        left = h.count("SELECT count(*) FROM outbound_queue WHERE status <> 'done'")
        if left == 0:
            return 0
        time.sleep(0.2)
    return left


def requeue_everything(h: Harness, at_least: int = 0) -> int:
    """Every queue row due again, with its blob reference taken back (the finished
    attempt released it), and copies of them (new ids, same message) until there are
    ``at_least`` rows; returns the recipients queued."""
    with h.db.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("SELECT count(*) FROM outbound_queue")
        have = int(cur.fetchone()[0])
        copies = -(-at_least // have) - 1 if have and at_least > have else 0
        if copies:
            cur.execute(
                "CREATE TEMP TABLE c ON COMMIT DROP AS SELECT q.id AS old, "
                "q.id || '-c' || g AS id FROM outbound_queue q, generate_series(1, %s) g",
                (copies,))
            cur.execute(
                "INSERT INTO outbound_queue (org_id, id, environment_id, inbox_id, "
                "message_id, raw_blob_key, size, mail_from, domain, status, next_attempt_at, "
                "expires_at, created_at, updated_at) SELECT q.org_id, c.id, q.environment_id, "
                "q.inbox_id, q.message_id, q.raw_blob_key, q.size, q.mail_from, q.domain, "
                "'queued', now(), q.expires_at, q.created_at, now() FROM outbound_queue q "
                "JOIN c ON c.old = q.id")
            cur.execute(
                "INSERT INTO outbound_recipients (org_id, queue_id, address, status, "
                "updated_at) SELECT r.org_id, c.id, r.address, 'queued', now() "
                "FROM outbound_recipients r JOIN c ON c.old = r.queue_id")
        cur.execute("UPDATE blobs b SET refcount = b.refcount + c.n FROM (SELECT "
                    "raw_blob_key, count(*) AS n FROM outbound_queue GROUP BY 1) c "
                    "WHERE b.key = c.raw_blob_key")
        cur.execute("UPDATE outbound_queue SET status = 'queued', next_attempt_at = now(), "
                    "attempts = 0, lease_until = NULL, leased_by = NULL, "
                    "bounce_pending = false, updated_at = now()")
        cur.execute("UPDATE outbound_recipients SET status = 'queued', attempts = 0")
        cur.execute("SELECT count(*) FROM outbound_recipients")
        total = int(cur.fetchone()[0])
        cur.execute("COMMIT")
    return total


def measure_drain(h: Harness, sink: SMTPSink, sink_before: int, rows: int,
                  timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    first = last = None
    processes: set[str] = set()
    done = 0
    cpu0 = (0.0, 0.0)
    while time.monotonic() < deadline:
        with h.db.cursor() as cur:
            cur.execute("SELECT count(*) FILTER (WHERE status = 'done'), "
                        "array_agg(DISTINCT leased_by) FILTER (WHERE leased_by IS NOT NULL) "
                        "FROM outbound_queue")
            done, leased = cur.fetchone()
        now = time.perf_counter()
        processes.update(leased or [])
        if done and first is None:
            first = (now, done)
            cpu0 = tree_cpu(h.server_pid), tree_cpu(h.pg_pid())
        if done >= rows:
            last = now
            break
        time.sleep(0.05)
    result: dict[str, Any] = {"rows": rows, "done": done,
                              "processes_seen_leasing": len(processes)}
    if first is not None and last is not None and last > first[0]:
        result["rows_per_s"] = (rows - first[1]) / (last - first[0])
        result["server_ms_per_msg"] = per_msg(tree_cpu(h.server_pid) - cpu0[0],
                                              rows - first[1])
        result["postgres_ms_per_msg"] = per_msg(tree_cpu(h.pg_pid()) - cpu0[1],
                                                rows - first[1])
    time.sleep(0.5)
    result["sink_recipients"] = sink.recipients - sink_before
    return result


# --------------------------------------------------------------------------- main


def enable_statement_stats(h: Harness) -> None:
    """pg_stat_statements on the bench cluster (a restart loads the library)."""
    import psycopg2

    with h.db.cursor() as cur:
        cur.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    h.db.close()
    h.cluster.stop()
    h.cluster.start()
    h.db = psycopg2.connect(h.dsn)
    h.db.autocommit = True
    with h.db.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


class OutboundBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.h = Harness("agentpost-outbound-bench-", "outbound-bench")
        self.h.workers = 2
        self.sink = SMTPSink()
        self.report: dict[str, Any] = {"machine": machine_info()}

    def start_server(self, *, limits: bool) -> None:
        write_config(self.h, sink_port=self.sink.port, smarthost=self.smarthost,
                     limits=limits, submission_port=self.submission_port, tls=self.tls,
                     extra_outbound=tuple(self.args.outbound),
                     extra_smtp=tuple(self.args.smtp))
        if self.h.server_log is None:
            self.h.server_log = open(self.h.tmp / "server.log", "wb")
        self.h._spawn()  # the harness's own spawn, with our config

    async def setup(self) -> None:
        from agentpost.dev.tls import ensure_dev_tls

        self.report["postgres"] = self.h.start_postgres(fsync=True)
        if self.args.stats:
            await asyncio.to_thread(enable_statement_stats, self.h)
        self.sink.start()
        self.smarthost = smarthost_available()
        self.report["transport"] = "smtp (smarthost) to a local sink" if self.smarthost \
            else "log (smarthost transport not available)"
        files = ensure_dev_tls(self.h.tmp / "tls", hostnames=("localhost",))
        self.tls = (str(files.cert), str(files.key))
        self.ctx = ssl.create_default_context(cafile=str(files.ca_cert))
        self.h.http_port, self.h.mx_port = free_port(), free_port()
        self.submission_port = free_port()
        write_config(self.h, sink_port=self.sink.port, smarthost=self.smarthost,
                     limits=False, submission_port=self.submission_port, tls=self.tls)
        self.h.key = api_bench.bootstrap(self.h.tmp / "agentpost.toml")
        await asyncio.to_thread(self.start_server, limits=False)
        self.inboxes = [await self.h.create_inbox(f"agent{n:02d}") for n in range(SESSIONS)]
        made = await one_request(self.h.http_port, build_post(
            self.h.http_port, self.h.key, {"name": "bench", "scopes": ["messages:send"]},
            "/api/v1/api-keys"), 30.0)
        if made.status != 201:
            raise SetupError(f"api key: HTTP {made.status} {made.body[:200]!r}")
        self.send_key = json.loads(made.body)["key"]
        body = text_lines(SIZE - 260, api_bench_rng())
        self.senders = [Sender(inbox["email"], body, n) for n, inbox in enumerate(self.inboxes)]

    async def settle(self, timeout: float = 60.0) -> None:
        """Wait until the servers are idle: the port answers as soon as the first process
        listens, while the second may still be importing and building its routes for a
        few CPU seconds, which would otherwise be counted as CPU per message."""
        deadline = time.perf_counter() + timeout
        before = tree_cpu(self.h.server_pid)
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.5)
            now = tree_cpu(self.h.server_pid)
            if now - before < 0.05:  # under 10 % of one CPU: both started, queue idle
                return
            before = now
        log("servers still busy after the start-up wait; measuring anyway")

    def stats(self, name: str) -> None:
        """Statements per message of the phase just measured (--stats)."""
        if not self.args.stats:
            return
        with self.h.db.cursor() as cur:
            cur.execute(
                "SELECT calls, round(total_exec_time::numeric, 1), rows, left(regexp_replace("
                "query, '\\s+', ' ', 'g'), 150) FROM pg_stat_statements "
                "ORDER BY calls DESC LIMIT 40")
            rows = cur.fetchall()
            cur.execute("SELECT pg_stat_statements_reset()")
        self.report[f"statements_{name}"] = rows
        print(f"--- statements of {name} (calls, ms, rows, query)", flush=True)
        for row in rows:
            print(f"{row[0]:7d} {row[1]:9} {row[2]:7d}  {row[3]}", flush=True)

    def reset_stats(self) -> None:
        if self.args.stats:
            with self.h.db.cursor() as cur:
                cur.execute("SELECT pg_stat_statements_reset()")

    def profile(self, name: str) -> subprocess.Popen[bytes] | None:
        """py-spy on the server's processes for the measured window (--profile)."""
        if not self.args.profile:
            return None
        out = f"{self.args.profile}-{name}.txt"
        log(f"profiling into {out}")
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking",
             *(["--gil"] if self.args.gil else []), "--subprocesses", "-p",
             str(self.h.server_pid), "-r", "200", "-f", "raw", "-o", out, "-d",
             str(int(self.args.warmup + self.args.duration))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def accept_rates(self, label: str) -> None:
        a = self.args
        if "submission" in a.only:
            log(f"(b) submission, {SESSIONS} sessions, 4 KiB, {label}")
            spy = self.profile(f"submission-{label}")
            self.reset_stats()
            self.report[f"submission_{label}"] = await run_submission(
                self.h, self.submission_port, self.ctx, self.senders, self.send_key,
                a.warmup, a.duration)
            self.stats(f"submission_{label}")
            if spy is not None:
                spy.wait()
        if "api" in a.only:
            log(f"(c) send API, {SESSIONS} connections, 4 KiB, {label}")
            spy = self.profile(f"api-{label}")
            self.reset_stats()
            self.report[f"api_send_{label}"] = await run_api_send(
                self.h, self.inboxes, self.send_key, a.warmup, a.duration)
            self.stats(f"api_send_{label}")
            if spy is not None:
                spy.wait()

    async def run(self) -> None:
        await self.setup()
        await self.settle()
        await self.accept_rates("limits_off")
        if self.args.limits:
            api_bench.stop_server(self.h.server)
            await asyncio.to_thread(self.start_server, limits=True)
            await self.settle()
            await self.accept_rates("limits_on")
        if "drain" not in self.args.only:
            return
        log("waiting for the queue to empty")
        left = wait_queue_empty(self.h, 90.0)
        self.report["queue_left_after_accept_runs"] = left
        api_bench.stop_server(self.h.server)
        recipients = requeue_everything(self.h, self.args.drain_rows)
        rows = self.h.count("SELECT count(*) FROM outbound_queue")
        log(f"(a) drain: {rows} rows ({recipients} recipients) due, starting 2 processes")
        sink_before = self.sink.recipients
        await asyncio.to_thread(self.start_server, limits=False)
        spy = self.profile("drain")
        self.reset_stats()
        drain = measure_drain(self.h, self.sink, sink_before, rows, 120.0)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait()
        self.stats("drain")
        drain["exactly_once"] = (not self.smarthost) or drain["sink_recipients"] == recipients
        self.report["drain_2_processes"] = drain


def print_report(report: dict[str, Any]) -> None:
    machine = report["machine"]
    print(f"\nAgentPost outbound benchmark ({machine.get('nproc', '?')} CPUs, load average "
          f"at start {machine.get('loadavg_at_start')}, PostgreSQL "
          f"{report.get('postgres', '?')}, fsync on, 2 server processes)")
    print(f"transport: {report.get('transport')}")
    for label in ("limits_off", "limits_on"):
        sub = report.get(f"submission_{label}")
        if sub:
            print(f"(b) submission {label:10s}: {sub['msgs_per_s']:7.1f} msgs/s committed "
                  f"(target >= {TARGET_SUBMIT:.0f}), p50 {sub['p50_ms']:.1f} ms, p99 "
                  f"{sub['p99_ms']:.1f} ms, accepted {sub['accepted']}, committed "
                  f"{sub['committed']} ({'ok' if sub['committed_ok'] else 'MISMATCH'}), "
                  f"refused {sub['refused']}")
            print(f"      CPU per message: server {sub['server_ms_per_msg']:.2f} ms, "
                  f"PostgreSQL {sub['postgres_ms_per_msg']:.2f} ms; this load generator "
                  f"(clients, sink, sampler) {sub['bench_ms_per_msg']:.2f} ms")
            print(f"      PostgreSQL backends by state (avg): {sub['pg_waits']}")
        api = report.get(f"api_send_{label}")
        if api:
            print(f"(c) API send   {label:10s}: {api['msgs_per_s']:7.1f} msgs/s (201), "
                  f"p50 {api['p50_ms']:.1f} ms, p99 {api['p99_ms']:.1f} ms, errors "
                  f"{api['errors'] or 'none'}")
            print(f"      CPU per message: server {api['server_ms_per_msg']:.2f} ms, "
                  f"PostgreSQL {api['postgres_ms_per_msg']:.2f} ms")
        elif f"api_send_{label}" in report:
            print(f"(c) API send   {label:10s}: skipped (no route)")
    drain = report.get("drain_2_processes")
    if drain:
        rate = drain.get("rows_per_s")
        print(f"(a) drain, 2 processes: {rate and f'{rate:.1f}'} msgs/s (target >= "
              f"{TARGET_DRAIN:.0f}); {drain['done']}/{drain['rows']} rows done, sink "
              f"counted {drain['sink_recipients']} recipients "
              f"({'exactly once' if drain['exactly_once'] else 'NOT exactly once'}), "
              f"{drain['processes_seen_leasing']} processes seen leasing")
        if "server_ms_per_msg" in drain:
            print(f"      CPU per message: server {drain['server_ms_per_msg']:.2f} ms, "
                  f"PostgreSQL {drain['postgres_ms_per_msg']:.2f} ms")
    print(f"load average at the end: {report.get('loadavg_at_end')}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--only", default="submission,api,drain",
                        help="comma list of what to run: submission, api, drain")
    parser.add_argument("--no-limits", dest="limits", action="store_false",
                        help="skip the second pass with send limits on")
    parser.add_argument("--outbound", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra [outbound] setting (TOML), e.g. smtp_pool_size=8")
    parser.add_argument("--smtp", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra [smtp] setting (TOML), e.g. group_commit_parallel=1")
    parser.add_argument("--drain-rows", type=int, default=3000,
                        help="queue rows the drain empties (the accepted messages, copied "
                             "as often as needed)")
    parser.add_argument("--gil", action="store_true",
                        help="with --profile: only samples holding the GIL (Python CPU)")
    parser.add_argument("--stats", action="store_true",
                        help="pg_stat_statements: the statements of each phase")
    parser.add_argument("--profile", metavar="PREFIX", default="",
                        help="py-spy (raw) the server processes in each measured window "
                             "into PREFIX-<phase>.txt")
    return parser.parse_args(argv)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    bench = OutboundBench(args)
    try:
        asyncio.run(bench.run())
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (SetupError, SMTPProtocolError, OSError) as exc:
        log(f"failed: {exc}")
        log(api_bench.tail(bench.h.tmp / "server.log"))
        return 1
    finally:
        bench.h.cleanup()
        bench.sink.stop()
    report = bench.report
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2, default=str) if args.json else "", end="")
    print_report(report)
    checks = [r.get("committed_ok", True) for k, r in report.items()
              if k.startswith("submission_") and isinstance(r, dict)]
    drain = report.get("drain_2_processes", {"exactly_once": True})
    return 0 if all(checks) and drain.get("exactly_once", False) else 1


if __name__ == "__main__":
    sys.exit(main())
