#!/usr/bin/env python3
"""Inbound SMTP (MX) throughput, latency and memory of AgentPost, fsync on.

What it does, start to finish:

1. creates a throw-away PostgreSQL cluster (``agentpost.dev.embedded_pg``) in a temp
   folder, fsync on by default, applies the migrations, and writes a config with a
   local blob store in the same temp folder, the MX on a free loopback port and the
   rate limiter off;
2. runs ``agentpost bootstrap`` for an API key, starts ``agentpost serve`` as a separate
   process (output to a log file), and creates the recipient inboxes over the API;
3. sends ONE message of about 10 MB (a base64 attachment, then a plain-text body) and
   reports the server's peak RSS above its idle RSS, as a multiple of the message size
   (VmHWM/VmRSS from ``/proc/<pid>/status``), then restarts the server for a clean heap;
4. for each message size (4 KiB, 100 KiB) and each session count (1, 20), keeps that
   many SMTP sessions open and sends message after message on each (MAIL, RCPT and
   DATA pipelined, the body after 354, then wait for the reply), for a warm-up and
   then a measured window; only ``250`` after the end of data counts as accepted;
5. checks that the rows in ``messages`` grew by exactly the number of accepted
   messages ("committed"), and reports msgs/s, p50/p90/p99/max latency per message,
   errors, CPU of the server, PostgreSQL and this client, and the server's peak RSS;
6. stops the server and deletes the cluster and the temp folder, also on Ctrl-C.

The load generator is a small asyncio SMTP client (stdlib only). Postfix's
``smtp-source`` is not used: it comes only with a full Postfix install (which starts
an MTA on port 25) and reports no per-message latency.

Timing never makes it fail: the exit status is 0 unless setup failed (1), some message
was refused or got no answer (1), or the committed rows differ from the accepted
messages (1). Ctrl-C or SIGTERM gives 130.

Usage: ``.venv/bin/python bench/smtp_bench.py [--duration 5] [--starttls] [--json]``
(see ``--help``). Network traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import email.utils
import json
import math
import os
import random
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # so that the sibling api_bench module imports
    sys.path.insert(0, str(HERE))

import api_bench  # noqa: E402 - after the sys.path fix above; it also puts the repo on it
import pg_stats  # noqa: E402
import psycopg2  # noqa: E402
from api_bench import (  # noqa: E402
    SetupError,
    Window,
    _count,
    agentpost_exe,
    bootstrap,
    build_post,
    destroy_cluster,
    fmt,
    free_port,
    log,
    machine_info,
    machine_line,
    one_request,
    percentile,
    postmaster_pid,
    process_cpu,
    self_cpu,
    stop_on_signals,
    stop_server,
    tail,
    toml_str,
    tree_cpu,
    wait_healthy,
)

from agentpost.dev.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError  # noqa: E402
from agentpost.storage.migrations import MigrationError, migrate  # noqa: E402

DBNAME = "agentpost_bench"
SHARED_DOMAIN = "bench.agentpost.test"
SENDER_DOMAIN = "sender.bench.example"
KIB = 1024
MIB = 1024 * 1024
#: The server's default [smtp] max_message_size (10 MiB).
DEFAULT_LIMIT = 10 * MIB
#: The limit configured here, so that the ~10 MB message has some headroom.
CONFIGURED_LIMIT = 11 * MIB
TARGET_MSGS_PER_S = 450.0
TARGET_SIZE = 4 * KIB
TARGET_CONCURRENCY = 20
TARGET_BIG_RATIO = 3.0
_WORDS = ("agent mail inbox message thread reply status report build deploy queue worker "
          "task result error retry commit review schedule update summary invoice order "
          "customer ticket support meeting notes draft please thanks regards today "
          "tomorrow project release version latency server client request response "
          "storage index query table backup restore monitor alert metric").split()


class SMTPProtocolError(ConnectionError):
    """The server answered something this client cannot go on from."""


# --------------------------------------------------------------------------- SMTP client


class SMTPSession:
    """One SMTP session on an asyncio stream, kept open for many messages.

    Every reply is read and its code checked; when the server advertises PIPELINING,
    MAIL, RCPT and DATA go out in one write (RFC 2920: DATA ends the group), and the
    body follows only after ``354``.
    """

    #: Set False (``--no-pipelining``) to wait for each reply even if PIPELINING is offered.
    use_pipelining = True

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.capabilities: set[str] = set()
        self.tls = False

    @classmethod
    async def open(cls, port: int, *, tls_context: ssl.SSLContext | None = None,
                   helo: str = "client.bench.example") -> SMTPSession:
        """Connect, read the greeting, EHLO, and STARTTLS (+ EHLO again) if asked."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=64 * KIB)
        session = cls(reader, writer)
        try:
            await session.expect(220, "greeting")
            await session.ehlo(helo)
            if tls_context is not None:
                if "STARTTLS" not in session.capabilities:
                    raise SMTPProtocolError("the server does not offer STARTTLS")
                writer.write(b"STARTTLS\r\n")
                await session.expect(220, "STARTTLS")
                await writer.start_tls(tls_context, server_hostname="localhost")
                session.tls = True
                await session.ehlo(helo)
        except BaseException:
            session.abort()
            raise
        return session

    async def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: its code and its last line's text."""
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise SMTPProtocolError("connection closed by the server")
            try:
                code = int(line[:3])
            except ValueError:
                raise SMTPProtocolError(f"bad reply line {line[:80]!r}") from None
            if line[3:4] != b"-":
                return code, line[4:].decode("utf-8", "replace").strip()

    async def expect(self, code: int, what: str) -> str:
        got, text = await self.reply()
        if got != code:
            raise SMTPProtocolError(f"{what}: {got} {text}")
        return text

    async def ehlo(self, helo: str) -> None:
        self.writer.write(f"EHLO {helo}\r\n".encode())
        caps: set[str] = set()
        first = True
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise SMTPProtocolError("connection closed during EHLO")
            if line[:3] != b"250":
                raise SMTPProtocolError(f"EHLO: {line[:80]!r}")
            if not first:
                caps.add(line[4:].decode().strip().split(" ", 1)[0].upper())
            first = False
            if line[3:4] != b"-":
                break
        self.capabilities = caps

    async def send(self, mail_from: str, rcpt: str, head: bytes, body: bytes,
                   size: int) -> str | None:
        """Send one message; None when it was accepted (250 after DATA), else the error.

        ``head`` + ``body`` must be dot-stuffed and end with CRLF; ``.CRLF`` is added here.
        """
        w = self.writer
        commands = [f"MAIL FROM:<{mail_from}> SIZE={size}\r\n".encode(),
                    f"RCPT TO:<{rcpt}>\r\n".encode(), b"DATA\r\n"]
        codes = []
        if self.use_pipelining and "PIPELINING" in self.capabilities:
            w.write(b"".join(commands))
            for _ in commands:
                codes.append((await self.reply())[0])
        else:  # one command at a time; stop at the first refusal
            for command in commands:
                w.write(command)
                codes.append((await self.reply())[0])
                if codes[-1] >= 400:
                    break
        if codes[-1] == 354 and len(codes) == 3 and codes[0] == 250 and codes[1] in (250, 251):
            w.write(head)
            w.write(body)
            w.write(b".\r\n")
            await w.drain()
            code, _ = await self.reply()
            if code == 250:
                return None
            return f"end of data: {code}"
        if codes[-1] == 354:  # DATA accepted though MAIL or RCPT failed: send an empty body
            w.write(b".\r\n")
            await self.reply()
        w.write(b"RSET\r\n")
        await self.reply()
        return "MAIL/RCPT/DATA: " + "/".join(str(c) for c in codes)

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                self.writer.write(b"QUIT\r\n")
                await self.reply()
        self.abort()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


# --------------------------------------------------------------------------- messages


def text_lines(nbytes: int, rng: random.Random) -> bytes:
    """``nbytes`` of plain-text lines (CRLF, at most 78 octets, none starting with a dot)."""
    if nbytes < 4:
        raise ValueError("a text body needs at least 4 bytes")
    out: list[bytes] = []
    remaining = nbytes
    words = _WORDS

    def line(width: int) -> bytes:  # width includes the CRLF
        text = ""
        while len(text) < width - 2:
            text += rng.choice(words) + " "
        text = text[:width - 2]
        if text.endswith(" "):
            text = text[:-1] + "s"
        return text.encode() + b"\r\n"

    while remaining > 160:
        width = rng.randint(50, 78)
        out.append(line(width))
        remaining -= width
    if remaining > 80:
        first = remaining // 2
        out.append(line(first))
        remaining -= first
    out.append(line(remaining))
    data = b"".join(out)
    assert len(data) == nbytes
    return data


class MessageFactory:
    """Unique messages of one exact size, cheap to make one after the other.

    Every message has its own Message-ID and Subject (fixed-width counters, so the
    size never changes); the body after the headers is shared.
    """

    def __init__(self, size: int, kind: str = "text", seed: int = 1) -> None:
        self.size = size
        self.kind = kind
        self.run = f"{random.getrandbits(32):08x}"
        self.date = email.utils.format_datetime(email.utils.localtime())
        self.head_len = 0
        probe = self.head(0, 0, "probe@" + SHARED_DOMAIN)
        self.head_len = len(probe)
        rng = random.Random(seed)
        if kind == "text":
            self.body = text_lines(size - len(probe), rng)
        elif kind == "attachment":
            self.body = attachment_body(size - len(probe), rng)
        else:
            raise ValueError(f"unknown message kind {kind!r}")

    def content_type(self) -> str:
        if self.kind == "text":
            return "Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit"
        return 'Content-Type: multipart/mixed; boundary="=_bench_boundary_="'

    def head(self, session: int, n: int, rcpt: str) -> bytes:
        """The headers of message ``n`` of session ``session`` (same length every time)."""
        to = f"To: <{rcpt}>".ljust(72)  # recipients differ in length; the head must not
        head = (f"From: Bench Sender <sender-{session:04d}@{SENDER_DOMAIN}>\r\n"
                f"{to}\r\n"
                f"Subject: bench message {session:04d}-{n:010d}\r\n"
                f"Date: {self.date}\r\n"
                f"Message-ID: <bench-{self.run}-{session:04d}-{n:010d}@{SENDER_DOMAIN}>\r\n"
                "MIME-Version: 1.0\r\n"
                f"{self.content_type()}\r\n\r\n").encode()
        if self.head_len and len(head) != self.head_len:
            raise ValueError(f"recipient address too long for the message template: {rcpt}")
        return head


def attachment_body(nbytes: int, rng: random.Random) -> bytes:
    """A multipart body of exactly ``nbytes``: a text part, then a base64-encoded file.

    The text part absorbs the rounding, so that the size comes out exact.
    """
    part1 = (b"This is a multi-part message in MIME format.\r\n\r\n"
             b"--=_bench_boundary_=\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n")
    part2 = (b"\r\n--=_bench_boundary_=\r\nContent-Type: application/octet-stream\r\n"
             b"Content-Transfer-Encoding: base64\r\n"
             b'Content-Disposition: attachment; filename="data.bin"\r\n\r\n')
    end = b"\r\n--=_bench_boundary_=--\r\n"
    room = nbytes - len(part1) - len(part2) - len(end) - 400
    lines = room // 78  # 57 raw bytes -> 76 base64 characters + CRLF
    if lines < 1:
        raise ValueError("message too small for an attachment")
    encoded = base64.encodebytes(rng.randbytes(lines * 57)).replace(b"\n", b"\r\n")
    encoded = encoded[:-2]  # the closing boundary's CRLF ends the last line
    text = text_lines(nbytes - len(part1) - len(part2) - len(end) - len(encoded), rng)
    body = part1 + text + part2 + encoded + end
    assert len(body) == nbytes
    return body


# --------------------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (bytes) of a process."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) * KIB
    except (OSError, ValueError):
        pass
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/<pid>/clear_refs``, Linux 4.0+)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- server harness


#: Extra ``key = value`` lines for the server's [smtp] section (``--smtp-set``).
EXTRA_SMTP_LINES: list[str] = []
#: ``--storage-set``: extra [storage] lines.
EXTRA_STORAGE_LINES: list[str] = []


def write_config(path: Path, *, dsn: str, http_port: int, mx_port: int, blob_dir: Path,
                 pool_size: int | None, log_level: str, max_message_size: int,
                 tls: tuple[Path, Path] | None, workers: int = 1) -> None:
    """The server's config: defaults except private ports, blob folder and no rate limits."""
    lines = [
        "# Written by bench/smtp_bench.py",
        "[server]",
        'hostname = "bench.localhost"',
        'environment = "development"',
        f"workers = {workers}",
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
        f"port = {http_port}",
        "# Every benchmark client (ws_bench: 1,000 sockets) comes from 127.0.0.1.",
        "max_connections_per_ip = 5000",
        "",
        "[smtp]",
        'mx_bind = "127.0.0.1"',
        f"mx_port = {mx_port}",
        f"max_message_size = \"{max_message_size}B\"",
        "# Every benchmark session comes from 127.0.0.1 (the default allows 20).",
        "max_connections_per_ip = 1000",
        *EXTRA_SMTP_LINES,
        "",
        "# Not measured here; off so that the default ports (143/993) need not be free.",
        "[imap]",
        "enabled = false",
        "",
        "[storage]",
        'backend = "local"',
        f"path = {toml_str(str(blob_dir))}",
        *EXTRA_STORAGE_LINES,
        "",
        "[mail]",
        f"shared_domain = {toml_str(SHARED_DOMAIN)}",
        "",
        "# Disabled so that the token bucket does not throttle the benchmark's API key.",
        "[rate_limit]",
        "enabled = false",
        "",
        "[logging]",
        f"level = {toml_str(log_level)}",
        "",
    ]
    if tls is not None:
        lines += ["[tls]", f"cert = {toml_str(str(tls[0]))}", f"key = {toml_str(str(tls[1]))}",
                  ""]
    path.write_text("\n".join(lines), encoding="utf-8")


class Harness:
    """Owns the cluster, the server and the temp folder, so cleanup can release them all.

    ``store_bench`` uses it too.
    """

    def __init__(self, prefix: str, name: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.name = name
        self.cluster: EmbeddedPostgres | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.server_log: Any = None
        self.db: Any = None
        self.dsn = ""
        self.http_port = 0
        self.mx_port = 0
        self.key = ""
        self.tls_context: ssl.SSLContext | None = None
        self.profilers: list[subprocess.Popen[bytes]] = []
        self.keep_log: str | None = None

    def start_postgres(self, fsync: bool, *, statements: bool = False) -> str:
        """Start the cluster, create and migrate the database; returns the server version."""
        log(f"starting PostgreSQL (fsync={'on' if fsync else 'off'}) under {self.tmp}")
        self.cluster = EmbeddedPostgres(self.tmp / "var", fsync=fsync, name=self.name)
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
        self.dsn = self.cluster.dsn(DBNAME)
        if statements:  # --pg-stats
            pg_stats.enable(self.cluster, [DBNAME])
        migrate(self.dsn)
        self.db = psycopg2.connect(self.dsn, connect_timeout=10)
        self.db.autocommit = True
        return str(pg_version)

    def start_server(self, *, pool_size: int | None, log_level: str, starttls: bool,
                     max_message_size: int = CONFIGURED_LIMIT) -> None:
        """Write the config, bootstrap an organization, start ``agentpost serve``."""
        self.http_port = free_port()
        self.mx_port = free_port()
        while self.mx_port == self.http_port:
            self.mx_port = free_port()
        tls = None
        if starttls:
            from agentpost.dev.tls import ensure_dev_tls

            files = ensure_dev_tls(self.tmp / "tls", hostnames=("localhost", "bench.localhost"))
            tls = (files.cert, files.key)
            self.tls_context = ssl.create_default_context(cafile=str(files.ca_cert))
        config = self.tmp / "agentpost.toml"
        write_config(config, dsn=self.dsn, http_port=self.http_port, mx_port=self.mx_port,
                     blob_dir=self.tmp / "blobs", pool_size=pool_size, log_level=log_level,
                     max_message_size=max_message_size, tls=tls, workers=self.workers)
        log("bootstrapping an organization")
        self.key = bootstrap(config)
        log_path = self.tmp / "server.log"
        self.server_log = open(log_path, "wb")  # closed in cleanup()
        log(f"starting agentpost serve: HTTP 127.0.0.1:{self.http_port}, "
            f"MX 127.0.0.1:{self.mx_port} (log: {log_path})")
        self._spawn()

    #: Diagnostic (``--switch-interval``): start the server through ``python -c`` with
    #: ``sys.setswitchinterval(value)`` called first; the server code is unchanged.
    switch_interval: float | None = None
    #: ``--workers``: server.workers (processes sharing the MX port); CPU is then summed
    #: over the server's process tree.
    workers: int = 1

    def _spawn(self) -> None:
        command = [agentpost_exe()]
        if self.switch_interval is not None:
            command = [sys.executable, "-c",
                       "import sys; sys.setswitchinterval(float(sys.argv.pop(1))); "
                       "sys.argv[0] = 'agentpost'; from agentpost.cli import main; "
                       "sys.exit(main())", str(self.switch_interval)]
        self.server = subprocess.Popen(
            [*command, "--config", str(self.tmp / "agentpost.toml"), "serve"],
            stdin=subprocess.DEVNULL, stdout=self.server_log, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the server ourselves
        )
        wait_healthy(self.server, self.http_port, self.tmp / "server.log")

    def restart_server(self) -> None:
        """A fresh server process (same config, database and blobs): a clean heap."""
        log("restarting agentpost serve")
        stop_server(self.server)
        self._spawn()

    @property
    def server_pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    def check_server(self, during: str) -> None:
        if self.server is not None and self.server.poll() is not None:
            raise SetupError(f"the server exited ({self.server.returncode}) during {during}:\n"
                             f"{tail(self.tmp / 'server.log')}")

    async def create_inbox(self, username: str) -> dict[str, Any]:
        payload = build_post(self.http_port, self.key, {"username": username},
                             "/api/v1/inboxes")
        response = await one_request(self.http_port, payload, 30.0)
        if response.status != 201:
            raise SetupError(f"creating inbox {username}: HTTP {response.status} "
                             f"{response.body[:300]!r}")
        return json.loads(response.body)

    def count(self, sql: str = "SELECT count(*) FROM messages") -> int:
        with self.db.cursor() as cur:
            cur.execute(sql)
            return int(cur.fetchone()[0])

    def pg_pid(self) -> int | None:
        return postmaster_pid(self.cluster) if self.cluster else None

    # profiling -------------------------------------------------------------------
    def start_profiler(self, output: str, seconds: float, rate: int = 100,
                       extra: str = "") -> subprocess.Popen[bytes]:
        exe = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if exe is None:
            raise SetupError("--py-spy needs py-spy in the venv (pip install py-spy)")
        log(f"  recording the server with py-spy into {output}")
        command = [exe, "record", "--pid", str(self.server_pid), "--duration",
                   str(max(1, math.ceil(seconds))), "--rate", str(rate), "--format", "raw",
                   "--output", str(Path(output).resolve()), "--nonblocking"]
        command += shlex.split(extra)
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.server_log,
                                stderr=subprocess.STDOUT)
        self.profilers.append(proc)
        return proc

    def finish_profiler(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        with contextlib.suppress(ValueError):
            self.profilers.remove(proc)

    # teardown --------------------------------------------------------------------
    def cleanup(self) -> None:
        """Release everything, each step on its own so one failure does not skip the rest."""
        for proc in self.profilers:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(timeout=10)
        with contextlib.suppress(Exception):
            stop_server(self.server)
        if self.server is not None and self.server.poll() is None:
            with contextlib.suppress(Exception):
                self.server.kill()
                self.server.wait(timeout=10)
        if self.server_log is not None:
            with contextlib.suppress(Exception):
                self.server_log.close()
            if self.keep_log:
                try:
                    shutil.copyfile(self.tmp / "server.log", self.keep_log)
                except OSError as exc:
                    log(f"could not copy the server log: {exc}")
        if self.db is not None:
            with contextlib.suppress(Exception):
                self.db.close()
        if self.cluster is not None:
            destroy_cluster(self.cluster)
        shutil.rmtree(self.tmp, ignore_errors=True)


def top_frames(collapsed: Path, limit: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Hotspots of a py-spy raw (collapsed) profile: self and inclusive % of samples.

    Frames are grouped by function and file (line numbers dropped). py-spy leaves out
    idle threads by default, but a thread waiting for the GIL counts as busy (use
    ``--py-spy-args=--gil`` to sample only the thread holding it).
    """
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    strip_line = re.compile(r":\d+\)$")
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [strip_line.sub(")", f) for f in stack.split(";")]
        frames = [f.replace(str(api_bench.REPO) + "/", "") for f in frames]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return {"self": [], "inclusive": [], "samples": []}

    def pct(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * n / total, 1)) for name, n in counter.most_common(limit)]

    return {"self": pct(own), "inclusive": pct(inclusive), "samples": [("total", total)]}


class PgWaitSampler:
    """Samples what the database's client backends are doing, every ``interval_s``.

    Runs in a thread with its own connection. Each sample of each backend counts as one
    of: ``CPU`` (active, not waiting), ``<type>:<event>`` (active and waiting, e.g.
    ``Lock:object`` or ``IO:WALSync``), ``idle in transaction`` (waiting for the server
    process to send the next statement) or ``idle``.
    """

    def __init__(self, dsn: str, interval_s: float = 0.01) -> None:
        self.dsn = dsn
        self.interval_s = interval_s
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = False
        self._thread: Any = None

    def _run(self) -> None:
        conn = psycopg2.connect(self.dsn, connect_timeout=10)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not self._stop:
                    cur.execute(
                        "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND backend_type = 'client backend'")
                    for state, wtype, wevent in cur.fetchall():
                        if state == "active":
                            key = f"{wtype}:{wevent}" if wtype else "CPU"
                        else:
                            key = state or "unknown"
                        self.counts[key] += 1
                    self.samples += 1
                    time.sleep(self.interval_s)
        finally:
            conn.close()

    def start(self) -> None:
        import threading

        self._thread = threading.Thread(target=self._run, name="pg-waits", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        busy = {k: v for k, v in self.counts.items() if k != "idle"}
        return {"samples": self.samples,
                "avg_backends": {k: round(v / self.samples, 2)
                                 for k, v in sorted(busy.items(), key=lambda kv: -kv[1])}
                if self.samples else {}}


# --------------------------------------------------------------------------- load


@dataclass
class Scenario:
    size: int
    concurrency: int

    @property
    def label(self) -> str:
        return f"{size_label(self.size)} msg"


@dataclass
class Run:
    """What one scenario measured (seconds unless noted)."""

    scenario: Scenario
    latencies: list[float] = field(default_factory=list)  # accepted, started in the window
    errors: dict[str, int] = field(default_factory=dict)  # whole run, incl. warm-up
    accepted_total: int = 0  # incl. warm-up: what the row count must grow by
    elapsed: float = 0.0
    server_cpu: float = 0.0
    postgres_cpu: float = 0.0
    client_cpu: float = 0.0
    timed_out: bool = False


def size_label(size: int) -> str:
    if size % MIB == 0:
        return f"{size // MIB} MiB"
    if size % KIB == 0:
        return f"{size // KIB} KiB"
    return f"{size:,} B"


async def session_worker(wid: int, port: int, factory: MessageFactory, recipients: list[str],
                         run: Run, window: Window, stop_at: float, timeout_s: float,
                         tls: ssl.SSLContext | None) -> None:
    """Send messages back to back on one SMTP session until the window closes."""
    clock = time.perf_counter
    rcpt = recipients[wid % len(recipients)]
    sender = f"sender-{wid:04d}@{SENDER_DOMAIN}"
    session: SMTPSession | None = None
    n = 0
    try:
        while True:
            t0 = clock()
            if t0 >= window.end or t0 >= stop_at:
                return
            if session is None:
                try:
                    async with asyncio.timeout(timeout_s):
                        session = await SMTPSession.open(port, tls_context=tls)
                except (OSError, TimeoutError, ssl.SSLError) as exc:
                    _count(run.errors, f"connect: {type(exc).__name__}: {exc}"[:120])
                    await asyncio.sleep(0.05)
                    continue
                t0 = clock()
            head = factory.head(wid, n, rcpt)
            n += 1
            try:
                async with asyncio.timeout(timeout_s):
                    error = await session.send(sender, rcpt, head, factory.body, factory.size)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                _count(run.errors, f"no answer: {type(exc).__name__}")
                session.abort()
                session = None
                continue
            t1 = clock()
            if error is not None:
                _count(run.errors, error)
                continue
            run.accepted_total += 1
            if t0 >= window.start:
                run.latencies.append(t1 - t0)
    finally:
        if session is not None:
            await session.quit()


async def run_scenario(h: Harness, scenario: Scenario, factory: MessageFactory,
                       recipients: list[str], warmup_s: float, duration_s: float,
                       timeout_s: float) -> Run:
    """Warm up, then measure for ``duration_s``; never runs much past the planned end."""
    run = Run(scenario)
    window = Window()
    hard_stop = time.perf_counter() + warmup_s + duration_s + timeout_s + 5.0
    pg_pid = h.pg_pid()
    tasks = [asyncio.ensure_future(session_worker(
        wid, h.mx_port, factory, recipients, run, window, hard_stop, timeout_s, h.tls_context))
        for wid in range(scenario.concurrency)]
    all_done = asyncio.gather(*tasks)
    all_done.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        await asyncio.wait_for(asyncio.shield(all_done), warmup_s)
    except TimeoutError:
        pass  # the usual case: warm-up is over, the sessions keep going
    server_cpu = tree_cpu if h.workers > 1 else process_cpu
    srv0, pg0, me0 = server_cpu(h.server_pid), tree_cpu(pg_pid), self_cpu()
    window.start = time.perf_counter()
    window.end = window.start + duration_s
    try:
        await asyncio.wait_for(all_done, duration_s + timeout_s + 5.0)
    except TimeoutError:
        run.timed_out = True
    run.elapsed = time.perf_counter() - window.start
    run.server_cpu = server_cpu(h.server_pid) - srv0
    run.postgres_cpu = tree_cpu(pg_pid) - pg0
    run.client_cpu = self_cpu() - me0
    for task in tasks:  # surface unexpected worker crashes
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return run


def summarize(run: Run, rows_added: int, peak_rss: int | None, rss_after: int | None,
              hwm_reset: bool) -> dict[str, Any]:
    lat = sorted(run.latencies)
    ok = len(lat)
    elapsed = run.elapsed

    def ms(v: float) -> float | None:
        return None if math.isnan(v) else round(v * 1000.0, 2)

    def pct(v: float) -> float | None:
        return round(100.0 * v / elapsed, 1) if elapsed and not math.isnan(v) else None

    return {
        "size_bytes": run.scenario.size,
        "concurrency": run.scenario.concurrency,
        "accepted_in_window": ok,
        "msgs_per_s": round(ok / elapsed, 1) if elapsed else 0.0,
        "mib_per_s": round(ok * run.scenario.size / elapsed / MIB, 2) if elapsed else 0.0,
        "latency_ms": {"p50": ms(percentile(lat, 50)), "p90": ms(percentile(lat, 90)),
                       "p99": ms(percentile(lat, 99)), "max": ms(lat[-1]) if lat else None,
                       "mean": ms(sum(lat) / ok) if ok else None},
        "errors": sum(run.errors.values()),
        "error_kinds": run.errors,
        "accepted_incl_warmup": run.accepted_total,
        "rows_added": rows_added,
        "committed_ok": rows_added == run.accepted_total,
        "elapsed_s": round(elapsed, 3),
        "cpu_pct_of_one_core": {"server": pct(run.server_cpu), "postgres": pct(run.postgres_cpu),
                                "client": pct(run.client_cpu)},
        "server_cpu_ms_per_msg": round(1000.0 * run.server_cpu / ok, 3) if ok else None,
        "postgres_cpu_ms_per_msg": round(1000.0 * run.postgres_cpu / ok, 3) if ok else None,
        "server_peak_rss_mib": round(peak_rss / MIB, 1) if peak_rss else None,
        "server_rss_after_mib": round(rss_after / MIB, 1) if rss_after else None,
        "peak_rss_is_per_scenario": hwm_reset,
        "timed_out": run.timed_out,
    }


# --------------------------------------------------------------------------- the bench


class SMTPBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.h = Harness("agentpost-smtpbench-", "smtpbench")
        self.h.keep_log = args.server_log
        self.h.switch_interval = args.switch_interval
        self.h.workers = args.workers
        self.recipients: list[str] = []
        self.hotspots: dict[str, Any] | None = None

    def setup(self) -> dict[str, Any]:
        args = self.args
        pg_version = self.h.start_postgres(not args.no_fsync, statements=args.pg_stats)
        self.h.start_server(pool_size=args.pool_size, log_level=args.log_level,
                            starttls=args.starttls)
        from agentpost.config import load_config

        pool_size = load_config(self.h.tmp / "agentpost.toml").database.pool_size
        return {"fsync": not args.no_fsync, "postgres_version": pg_version,
                "pool_size": pool_size, "starttls": args.starttls, "inboxes": args.inboxes,
                "pipelining": not args.no_pipelining,
                "duration_s": args.duration, "warmup_s": args.warmup,
                "max_message_size": CONFIGURED_LIMIT, "log_level": args.log_level,
                "blob_store": "local (temp folder, fsync per blob)",
                "switch_interval": args.switch_interval, "workers": args.workers}

    async def prepare(self) -> None:
        log(f"creating {self.args.inboxes} recipient inbox(es)")
        for i in range(self.args.inboxes):
            inbox = await self.h.create_inbox(f"bench-rcpt-{i:03d}")
            self.recipients.append(inbox["email"])

    async def send_one(self, factory: MessageFactory, n: int,
                       timeout_s: float) -> tuple[str | None, float]:
        session = await SMTPSession.open(self.h.mx_port, tls_context=self.h.tls_context)
        try:
            t0 = time.perf_counter()
            async with asyncio.timeout(timeout_s):
                error = await session.send(f"big@{SENDER_DOMAIN}", self.recipients[0],
                                           factory.head(9999, n, self.recipients[0]),
                                           factory.body, factory.size)
            return error, time.perf_counter() - t0
        finally:
            await session.quit()

    async def warm(self) -> int:
        """A few small messages, so that code paths and thread pools exist before measuring."""
        sent = 0
        for size in (4 * KIB, 100 * KIB):
            factory = MessageFactory(size)
            for n in range(3):
                error, _ = await self.send_one(factory, n, self.args.timeout)
                if error is not None:
                    raise SetupError(f"warm-up message refused: {error}")
                sent += 1
        return sent

    async def big_message(self, kind: str, size: int) -> dict[str, Any]:
        """Peak RSS above idle while the server receives and stores one large message."""
        pid = self.h.server_pid
        factory = MessageFactory(size, kind=kind, seed=7)
        before_rows = self.h.count()
        await asyncio.sleep(1.0)  # let the server go idle
        idle = proc_status(pid)
        reset = reset_peak_rss(pid)
        hwm_before = proc_status(pid).get("VmHWM")
        log(f"one {size:,}-byte message ({kind}): idle RSS {idle.get('VmRSS', 0) / MIB:.1f} MiB")
        cpu0 = process_cpu(pid)
        error, latency = await self.send_one(factory, 0, max(self.args.timeout, 120.0))
        cpu = process_cpu(pid) - cpu0
        await asyncio.sleep(0.3)
        after = proc_status(pid)
        rows = self.h.count() - before_rows
        idle_rss = idle.get("VmRSS")
        peak = after.get("VmHWM")
        ratio = ((peak - idle_rss) / size) if (peak and idle_rss) else None
        return {
            "kind": kind, "size_bytes": size, "accepted": error is None, "error": error,
            "rows_added": rows, "committed_ok": rows == (1 if error is None else 0),
            "latency_ms": round(latency * 1000.0, 1), "server_cpu_s": round(cpu, 3),
            "idle_rss_mib": round(idle_rss / MIB, 1) if idle_rss else None,
            "hwm_after_reset_mib": round(hwm_before / MIB, 1) if hwm_before else None,
            "peak_rss_mib": round(peak / MIB, 1) if peak else None,
            "rss_after_mib": round(after["VmRSS"] / MIB, 1) if "VmRSS" in after else None,
            "peak_above_idle_mib": round((peak - idle_rss) / MIB, 1) if ratio is not None
            else None,
            "ratio_to_size": round(ratio, 2) if ratio is not None else None,
            "hwm_reset": reset,
        }

    async def run_all(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
        args = self.args
        await self.prepare()
        warm_rows0 = self.h.count()
        warm_sent = await self.warm()
        if self.h.count() - warm_rows0 != warm_sent:
            raise SetupError("warm-up: rows in messages differ from accepted messages")
        totals = {"accepted": warm_sent}
        big = []
        for kind in args.big_kinds:
            result = await self.big_message(kind, args.big_size)
            big.append(result)
            totals["accepted"] += 1 if result["accepted"] else 0
            log(f"  -> peak {result['peak_above_idle_mib']} MiB above idle = "
                f"{result['ratio_to_size']}x the message, {result['latency_ms']} ms, "
                f"error {result['error']}")
            self.h.check_server(f"the {kind} big message")
        if big:
            # The large messages leave the heap grown (freed memory is not returned to the
            # kernel), which would hide the scenarios' own peak RSS: start afresh.
            await asyncio.to_thread(self.h.restart_server)
            warm_rows0 = self.h.count()
            sent = await self.warm()
            if self.h.count() - warm_rows0 != sent:
                raise SetupError("warm-up: rows in messages differ from accepted messages")
            totals["accepted"] += sent
        results = []
        for size in args.sizes:
            factory = MessageFactory(size)
            for conc in args.concurrency:
                scenario = Scenario(size, conc)
                log(f"{size_label(size)} messages over {conc} session(s): "
                    f"{args.warmup} s warm-up + {args.duration} s")
                await asyncio.sleep(0.5)
                before = self.h.count()
                reset = reset_peak_rss(self.h.server_pid)
                profiler = None
                if (args.py_spy and size == min(args.sizes)
                        and conc == max(args.concurrency)):
                    profiler = self.h.start_profiler(args.py_spy, args.warmup + args.duration,
                                                     extra=args.py_spy_args)
                sampler = PgWaitSampler(self.h.dsn) if args.pg_waits else None
                if sampler is not None:
                    sampler.start()
                if args.pg_stats:
                    pg_stats.reset(self.h.db)
                run = await run_scenario(self.h, scenario, factory, self.recipients,
                                         args.warmup, args.duration, args.timeout)
                status = proc_status(self.h.server_pid)
                waits = await asyncio.to_thread(sampler.stop) if sampler is not None else None
                if profiler is not None:
                    await asyncio.to_thread(self.h.finish_profiler, profiler)
                    with contextlib.suppress(OSError):
                        self.hotspots = top_frames(Path(args.py_spy))
                if args.pg_stats:
                    log(pg_stats.report(self.h.db))
                rows = self.h.count() - before
                if args.pg_stats:
                    log(pg_stats.io_report(self.h.db, rows))
                totals["accepted"] += run.accepted_total
                summary = summarize(run, rows, status.get("VmHWM"), status.get("VmRSS"), reset)
                summary["pg_waits"] = waits
                results.append(summary)
                log(f"  -> {summary['msgs_per_s']:,.1f} msgs/s, p50 "
                    f"{summary['latency_ms']['p50']} ms, p99 {summary['latency_ms']['p99']} ms, "
                    f"errors {summary['errors']}, rows {rows}/{run.accepted_total}")
                self.h.check_server(f"{size_label(size)} c={conc}")
        totals["rows"] = self.h.count()
        return big, results, totals


# --------------------------------------------------------------------------- report


def target_verdicts(big: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict]:
    out = []
    desc = (f"committed {size_label(TARGET_SIZE)} msgs/s at {TARGET_CONCURRENCY} sessions "
            f">= {TARGET_MSGS_PER_S:.0f}")
    found = [r for r in results
             if r["size_bytes"] == TARGET_SIZE and r["concurrency"] == TARGET_CONCURRENCY]
    if found:
        r = found[0]
        out.append({"description": desc, "measured": f"{r['msgs_per_s']:,.1f} msgs/s",
                    "met": r["msgs_per_s"] >= TARGET_MSGS_PER_S and r["committed_ok"]
                    and not r["errors"]})
    else:
        out.append({"description": desc, "measured": None, "met": None})
    desc = f"peak RSS above idle for one ~10 MB message < {TARGET_BIG_RATIO:.0f}x its size"
    for b in big:
        desc = (f"peak RSS above idle for one {b['size_bytes']:,}-byte message < "
                f"{TARGET_BIG_RATIO:.0f}x its size")
        out.append({"description": f"{desc} ({b['kind']})",
                    "measured": f"{b['ratio_to_size']}x ({b['peak_above_idle_mib']} MiB)",
                    "met": b["ratio_to_size"] is not None
                    and b["ratio_to_size"] < TARGET_BIG_RATIO and b["accepted"]})
    if not big:
        out.append({"description": desc, "measured": None, "met": None})
    return out


def print_table(report: dict[str, Any]) -> None:
    m, s = report["machine"], report["setup"]
    out = [
        "",
        "AgentPost SMTP (MX) benchmark",
        machine_line(m),
        "  server  : `agentpost serve` in its own process"
        + (f" ({s['workers']} workers)" if s.get("workers", 1) > 1 else "")
        + ", MX on 127.0.0.1, "
        f"{'STARTTLS' if s['starttls'] else 'plain (no TLS)'}, db pool_size {s['pool_size']}, "
        f"blob store {s['blob_store']}, log level {s['log_level']}"
        + (f", sys.setswitchinterval({s['switch_interval']})" if s["switch_interval"] else ""),
        f"  database: PostgreSQL {s['postgres_version']}, embedded cluster, "
        f"fsync={'on' if s['fsync'] else 'off'} synchronous_commit="
        f"{'on' if s['fsync'] else 'off'}",
        f"  load    : asyncio SMTP sessions, one message after another per session "
        f"({'MAIL+RCPT+DATA pipelined' if s['pipelining'] else 'MAIL, RCPT, DATA one by one'}"
        f", body after 354); session i sends to inbox "
        f"i mod {s['inboxes']}; warm-up {s['warmup_s']} s + {s['duration_s']} s measured",
        "",
    ]
    if report["big"]:
        out.append("One large message at a time (server RSS from /proc/<pid>/status; peak = "
                   "VmHWM after resetting it at idle; MiB):")
        header = (f"{'kind':<12}{'bytes':>12}{'result':>8}{'ms':>9}{'srv CPU s':>10}"
                  f"{'idle MiB':>10}{'peak MiB':>10}{'above idle':>12}{'x size':>8}"
                  f"{'RSS after':>11}{'rows':>6}")
        out += [header, "-" * len(header)]
        for b in report["big"]:
            out.append(f"{b['kind']:<12}{b['size_bytes']:>12,}"
                       f"{'250' if b['accepted'] else 'ERROR':>8}{fmt(b['latency_ms'], 0):>9}"
                       f"{fmt(b['server_cpu_s'], 2):>10}{fmt(b['idle_rss_mib'], 1):>10}"
                       f"{fmt(b['peak_rss_mib'], 1):>10}{fmt(b['peak_above_idle_mib'], 1):>12}"
                       f"{fmt(b['ratio_to_size'], 2):>8}{fmt(b['rss_after_mib'], 1):>11}"
                       f"{b['rows_added']:>6}")
            if b["error"]:
                out.append(f"  error: {b['error']}")
        out.append("")
    header = (f"{'scenario':<14}{'conc':>5}{'msgs/s':>9}{'MiB/s':>7}{'p50 ms':>9}{'p90 ms':>9}"
              f"{'p99 ms':>9}{'max ms':>9}{'errors':>7}{'srv CPU':>8}{'pg CPU':>8}"
              f"{'cli CPU':>8}{'srv ms/msg':>11}{'peak RSS':>9}{'rows/accepted':>15}")
    out += [header, "-" * len(header)]
    for r in report["results"]:
        lat, cpu = r["latency_ms"], r["cpu_pct_of_one_core"]
        committed = f"{r['rows_added']}/{r['accepted_incl_warmup']}"
        if not r["committed_ok"]:
            committed += "!"
        out.append(
            f"{size_label(r['size_bytes']) + ' msg':<14}{r['concurrency']:>5}"
            f"{fmt(r['msgs_per_s'], 1):>9}{fmt(r['mib_per_s'], 1):>7}{fmt(lat['p50'], 2):>9}"
            f"{fmt(lat['p90'], 2):>9}{fmt(lat['p99'], 2):>9}{fmt(lat['max'], 1):>9}"
            f"{r['errors']:>7}{fmt(cpu['server'], 0) + '%':>8}{fmt(cpu['postgres'], 0) + '%':>8}"
            f"{fmt(cpu['client'], 0) + '%':>8}{fmt(r['server_cpu_ms_per_msg'], 2):>11}"
            f"{fmt(r['server_peak_rss_mib'], 0) + 'M':>9}{committed:>15}")
    out.append("")
    out.append("  msgs/s = messages answered 250 after DATA, started inside the measured window, "
               "per second; latency = MAIL sent -> 250 after DATA.")
    out.append("  rows/accepted = rows added to `messages` during the scenario / messages "
               "accepted incl. warm-up ('!' = they differ: not everything accepted was "
               "committed, or more).")
    out.append("  CPU = % of one core in the window (server: agentpost serve, all threads; pg: "
               "postmaster + backends; cli: this load generator). peak RSS = server VmHWM, "
               "reset before each scenario (the server is restarted after the large messages).")
    t = report["totals"]
    same = "EQUAL" if t["accepted"] == t["rows"] else "DIFFERENT"
    out.append(f"  total   : {t['accepted']} messages accepted over the whole run, "
               f"{t['rows']} rows in messages: {same}")
    for r in report["results"]:
        if r["error_kinds"]:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(r["error_kinds"].items()))
            out.append(f"  errors in {size_label(r['size_bytes'])} c={r['concurrency']}: {kinds}")
        if r["timed_out"]:
            out.append(f"  {size_label(r['size_bytes'])} c={r['concurrency']}: stopped by the "
                       "hard time limit")
    for v in report["targets"]:
        verdict = ("not measured in this run" if v["met"] is None else
                   f"measured {v['measured']}: {'MET' if v['met'] else 'NOT MET'}")
        out.append(f"  target  : {v['description']} -> {verdict} (informational)")
    for r in report["results"]:
        waits = r.get("pg_waits")
        if waits and waits["avg_backends"]:
            shown = ", ".join(f"{k} {v}" for k, v in list(waits["avg_backends"].items())[:6])
            out.append(f"  pg backends in {size_label(r['size_bytes'])} c={r['concurrency']} "
                       f"(average count, {waits['samples']} samples): {shown}")
    hot = report.get("hotspots")
    if hot and hot.get("self"):
        out.append("")
        out.append(f"py-spy hotspots of the server ({hot['samples'][0][1]} samples, "
                   "non-idle threads; % of samples):")
        out.append("  self time:")
        out += [f"    {p:5.1f}%  {name}" for name, p in hot["self"]]
        out.append("  inclusive:")
        out += [f"    {p:5.1f}%  {name}" for name, p in hot["inclusive"]]
    out.append("")
    print("\n".join(out), flush=True)


# --------------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)(i?[bB])?\s*", text)
    if not match:
        raise ValueError(text)
    unit = {"": 1, "k": KIB, "m": MIB}[match.group(2).lower()]
    return int(match.group(1)) * unit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=float, default=5.0,
                        help="measured seconds per scenario (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="warm-up seconds before each measured window (default 1)")
    parser.add_argument("--concurrency", default="1,20",
                        help="comma-separated session counts (default 1,20)")
    parser.add_argument("--sizes", default="4k,100k",
                        help="comma-separated message sizes, e.g. 4k,100k (default)")
    parser.add_argument("--inboxes", type=int, default=20,
                        help="recipient inboxes; session i sends to inbox i mod N (default 20)")
    parser.add_argument("--big-kinds", default="attachment,text",
                        help="the ~10 MB single-message tests to run: attachment (base64 "
                             "file), text (plain body), or '' for none (default both)")
    parser.add_argument("--big-size", type=parse_size, default=DEFAULT_LIMIT - 4 * KIB,
                        help=f"size of that message in bytes (default {DEFAULT_LIMIT - 4 * KIB:,}"
                             ", just under the default 10 MiB limit)")
    parser.add_argument("--starttls", action="store_true",
                        help="every session does STARTTLS (dev CA in the temp folder) first")
    parser.add_argument("--no-pipelining", action="store_true",
                        help="send MAIL, RCPT and DATA one at a time, each after the previous "
                             "reply, although the server offers PIPELINING")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="per-message timeout in seconds (default 30)")
    parser.add_argument("--no-fsync", action="store_true",
                        help="run PostgreSQL with fsync/synchronous_commit off (not durable)")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="database.pool_size for the server (default: the server default)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"],
                        help="server logging.level (default info, as in production)")
    parser.add_argument("--py-spy", metavar="FILE", default=None,
                        help="record the server with py-spy during the smallest size at the "
                             "highest session count (collapsed stacks) and print hotspots")
    parser.add_argument("--py-spy-args", default="", metavar="ARGS",
                        help="extra py-spy record options, e.g. '--gil' (only samples holding "
                             "the GIL), '--idle', '--native'")
    parser.add_argument("--pg-waits", action="store_true",
                        help="sample pg_stat_activity every 10 ms during each scenario and "
                             "report what the server's database connections were doing")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="server.workers: N processes share the MX port (default 1; "
                             "server CPU is then the whole process tree's)")
    parser.add_argument("--switch-interval", type=float, default=None, metavar="S",
                        help="diagnostic: start the server with sys.setswitchinterval(S) "
                             "(Python's default is 0.005) to see how much GIL hand-over "
                             "delays cost; the server code is unchanged")
    parser.add_argument("--smtp-set", metavar="KEY=VALUE", action="append", default=[],
                        help="an extra [smtp] setting for the server, TOML value, e.g. "
                             "group_commit=false or group_commit_max=32 (repeatable)")
    parser.add_argument("--storage-set", metavar="KEY=VALUE", action="append", default=[],
                        help="an extra [storage] setting for the server, TOML value, e.g. "
                             "inline_message_max='\"256KiB\"' (repeatable)")
    parser.add_argument("--server-log", metavar="FILE", default=None,
                        help="keep a copy of the server's log here (it is deleted otherwise)")
    parser.add_argument("--pg-stats", action="store_true",
                        help="load pg_stat_statements with track_planning and print, after "
                             "each scenario (warm-up included), plans, calls, planning and "
                             "execution time per statement, top by planning time, and the "
                             "WAL and pages written per message (stderr)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout instead of the table")
    args = parser.parse_args(argv)
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
        args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as exc:
        parser.error(f"bad --concurrency or --sizes value: {exc}")
    args.big_kinds = [k.strip() for k in args.big_kinds.split(",") if k.strip()]
    if set(args.big_kinds) - {"attachment", "text"}:
        parser.error("--big-kinds takes attachment, text, both or ''")
    if args.concurrency and min(args.concurrency) < 1:
        parser.error("--concurrency values must be >= 1")
    if any(s < 1024 for s in args.sizes) or args.big_size < 64 * KIB:
        parser.error("--sizes must be >= 1k and --big-size >= 64k")
    if args.big_size > CONFIGURED_LIMIT:
        parser.error(f"--big-size must be <= {CONFIGURED_LIMIT} (the configured limit)")
    if args.duration <= 0 or args.warmup < 0 or args.timeout <= 0 or args.inboxes < 1:
        parser.error("--duration, --timeout, --inboxes must be > 0 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    machine = machine_info()
    SMTPSession.use_pipelining = not args.no_pipelining
    EXTRA_SMTP_LINES[:] = [" = ".join(p.strip() for p in kv.split("=", 1))
                           for kv in args.smtp_set]
    EXTRA_STORAGE_LINES[:] = [" = ".join(p.strip() for p in kv.split("=", 1))
                              for kv in args.storage_set]
    bench = SMTPBench(args)
    try:
        setup = bench.setup()
        big, results, totals = asyncio.run(bench.run_all())
        stop_server(bench.h.server)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except (SetupError, EmbeddedPostgresError, MigrationError, psycopg2.Error, OSError,
            ConnectionError, TimeoutError, ssl.SSLError) as exc:
        log(f"failed: {type(exc).__name__}: {str(exc).strip()}")
        return 1
    finally:
        bench.h.cleanup()
    report = {"machine": machine, "setup": setup, "big": big, "results": results,
              "totals": totals, "targets": target_verdicts(big, results),
              "hotspots": bench.hotspots}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    broken = (any(r["errors"] or r["timed_out"] or not r["committed_ok"] for r in results)
              or any(not b["accepted"] or not b["committed_ok"] for b in big)
              or totals["accepted"] != totals["rows"])
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
