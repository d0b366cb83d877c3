#!/usr/bin/env python3
"""IMAP logins, bulk FETCH, body throughput and memory of AgentPost, against a real server.

What it does, start to finish:

1. creates a throw-away PostgreSQL cluster (``agentpost.dev.embedded_pg``) in a temp
   folder, fsync on by default, applies the migrations, and writes a config with a local
   blob store in the same temp folder, the IMAP listener on a free loopback port with
   ``allow_plaintext_login = true`` (plain IMAP on 127.0.0.1, no TLS), the IMAP
   connection caps raised above the idle-connection count, and the HTTP rate limiter off;
2. raises this process's RLIMIT_NOFILE soft limit (``agentpost serve`` inherits it, as it
   would get ``LimitNOFILE=65536`` from the systemd unit), runs ``agentpost bootstrap``
   for an API key (username = inbox address, password = that key), starts
   ``agentpost serve`` as a separate process and creates two inboxes over the HTTP API;
3. loads 10,000 realistic 2-8 KiB messages (varied From/To/Cc/Subject/Date, plain,
   multipart/alternative and multipart/mixed with a small attachment) into one inbox
   with ``APPEND`` pipelined over a few connections (LITERAL+ ``{n+}``), and one ~20 MiB
   message into the other inbox, then checks the row count and restarts the server so
   that the measurements start from a clean heap;
4. measures, each against the running server process:
   - RSS of the server with 1,000 idle authenticated connections (VmRSS before/after);
   - logins/s: N concurrent clients doing connect + LOGIN + LOGOUT in a closed loop for
     a fixed window, with p50/p90/p99 latency;
   - ``UID FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)`` over the 10,000 messages, 5 times,
     time from sending the command to the tagged OK (every run must return 10,000 FETCH
     responses);
   - ``FETCH 1:* BODY.PEEK[]`` over the 10,000 messages: MB/s of literal data, and the
     server's peak RSS above its RSS before the command;
   - RSS per session that has the 10,000-message INBOX selected;
   - after one more restart (a clean heap again), the ~20 MiB message fetched alone
     (``FETCH 1 BODY.PEEK[]``): MB/s and the server's peak RSS above idle (VmHWM after
     ``echo 5 > /proc/<pid>/clear_refs``);
5. stops the server and deletes the cluster and the temp folder, also on Ctrl-C.

The load generator is a small asyncio IMAP client (stdlib only) that frames responses
itself, literals included (``{n}`` CRLF then n octets); ``imaplib`` is used only for an
independent sanity check (message count and byte-exact bodies of a few messages).

Timing never makes it fail: the exit status is 0 unless setup failed (1), or a login,
APPEND or FETCH got an unexpected answer or none, a count or a body did not match (1).
Ctrl-C or SIGTERM gives 130.

Usage: ``.venv/bin/python bench/imap_bench.py [--messages 10000] [--json]`` (see
``--help``). Network traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import email.utils
import imaplib
import itertools
import json
import math
import os
import random
import re
import resource
import shlex
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # so that the sibling bench modules import
    sys.path.insert(0, str(HERE))

import psycopg2  # noqa: E402 - after the sys.path fix above
from api_bench import (  # noqa: E402
    SetupError,
    Window,
    _count,
    bootstrap,
    fmt,
    free_port,
    log,
    machine_info,
    machine_line,
    percentile,
    process_cpu,
    self_cpu,
    stop_on_signals,
    stop_server,
    toml_str,
    tree_cpu,
)
from smtp_bench import (  # noqa: E402
    KIB,
    MIB,
    SHARED_DOMAIN,
    Harness,
    attachment_body,
    proc_status,
    reset_peak_rss,
    text_lines,
    top_frames,
)

from agentpost.dev.embedded_pg import EmbeddedPostgresError  # noqa: E402
from agentpost.storage.migrations import MigrationError  # noqa: E402

TARGET_LOGINS_PER_S = 300.0
TARGET_UID_FETCH_S = 0.5
TARGET_IDLE_RSS_MIB = 200.0
MB = 1_000_000  # throughput is reported in MB/s (10^6 bytes)
INBOX_USER = "imap-bench"
BIG_INBOX_USER = "imap-bench-big"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_LITERAL_TAIL = re.compile(rb"\{(\d+)\+?\}$")
_FETCH_RE = re.compile(rb"^\* \d+ FETCH ")
_SIZE_RE = re.compile(rb"RFC822\.SIZE (\d+)")
_UID_RE = re.compile(rb"[( ]UID (\d+)")
_APPENDUID_RE = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")
_EXISTS_RE = re.compile(rb"^\* (\d+) EXISTS")


class IMAPProtocolError(ConnectionError):
    """The server answered something this client cannot go on from."""


# --------------------------------------------------------------------------- IMAP client


class Command:
    """One tagged command in flight and what came back for it."""

    __slots__ = ("fetches", "future", "keep", "lines", "literal_bytes", "literals", "status",
                 "t_done", "t_sent", "tag", "text")

    def __init__(self, tag: bytes, future: asyncio.Future[Command], keep: bool) -> None:
        self.tag = tag
        self.future = future
        self.keep = keep  # keep untagged lines and literal octets (sanity checks only)
        self.fetches = 0  # untagged "* n FETCH" responses
        self.literal_bytes = 0  # octets of literal data in the untagged responses
        self.lines: list[bytes] = []  # untagged responses, literals left out (keep only)
        self.literals: list[bytes] = []  # literal octets (keep only)
        self.status = b""
        self.text = b""
        self.t_sent = 0.0
        self.t_done = 0.0

    @property
    def ok(self) -> bool:
        return self.status == b"OK"

    def describe(self) -> str:
        return f"{self.status.decode()} {self.text[:160].decode('utf-8', 'replace')}"


class IMAPClient(asyncio.Protocol):
    """One IMAP connection; commands may be pipelined.

    Responses are framed here: a line ending in ``{n}`` (or ``{n+}``) is followed by n
    octets of literal data, then the response goes on with the next line. Untagged
    responses are counted against the oldest command in flight (this server runs one
    command at a time and answers in order). The tagged response's arrival time is taken
    as soon as it is parsed, so latencies do not include the event loop's wake-up.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._parts: list[bytes] = []  # lines of the response being assembled
        self._literal_left = 0
        self._resp_literal_bytes = 0
        self._resp_literals: list[bytearray] = []
        self._keep_current = False
        self._inflight: collections.deque[Command] = collections.deque()
        self._by_tag: dict[bytes, Command] = {}
        self._next_tag = 0
        self.greeting: asyncio.Future[bytes] = self._loop.create_future()
        self.continuation: asyncio.Future[bytes] | None = None
        self.unsolicited: list[bytes] = []
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.error: BaseException | None = None

    # asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        problem = exc or IMAPProtocolError("connection closed by the server")
        self.error = problem
        for command in self._inflight:
            if not command.future.done():
                command.future.set_exception(problem)
        self._inflight.clear()
        self._by_tag.clear()
        for fut in (self.greeting, self.continuation):
            if fut is not None and not fut.done():
                fut.set_exception(problem)
        if not self.closed.done():
            self.closed.set_result(None)
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        if self._literal_left and not self._buf:  # bulk literal data: no copy into _buf
            take = min(self._literal_left, len(data))
            self._literal(data, 0, take)
            if take == len(data):
                return
            data = data[take:]
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        try:
            while pos < end:
                if self._literal_left:
                    take = min(self._literal_left, end - pos)
                    self._literal(buf, pos, take)
                    pos += take
                    continue
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                line = bytes(buf[pos:eol])
                pos = eol + 2
                self._parts.append(line)
                if line.endswith(b"}"):
                    m = _LITERAL_TAIL.search(line)
                    if m is not None:
                        self._literal_left = int(m.group(1))
                        self._keep_current = bool(self._inflight and self._inflight[0].keep)
                        if self._keep_current:
                            self._resp_literals.append(bytearray())
                        continue  # the response goes on after the literal
                self._response()
        except Exception as exc:  # a framing bug must not hang the benchmark
            self.error = exc
            if self.transport is not None:
                self.transport.abort()
            raise
        finally:
            del buf[:pos]

    def _literal(self, data: bytes | bytearray, start: int, take: int) -> None:
        self._literal_left -= take
        self._resp_literal_bytes += take
        if self._keep_current:
            self._resp_literals[-1] += data[start:start + take]

    def _response(self) -> None:
        parts, self._parts = self._parts, []
        first = parts[0]
        literal_bytes, self._resp_literal_bytes = self._resp_literal_bytes, 0
        literals, self._resp_literals = self._resp_literals, []
        if first.startswith(b"* "):
            if not self._inflight:
                if not self.greeting.done():
                    self.greeting.set_result(first)
                else:
                    self.unsolicited.append(first)
                return
            command = self._inflight[0]
            if _FETCH_RE.match(first):
                command.fetches += 1
            command.literal_bytes += literal_bytes
            if command.keep:
                command.lines.append(b"".join(parts))
                command.literals.extend(bytes(x) for x in literals)
            return
        if first.startswith(b"+"):
            if self.continuation is not None and not self.continuation.done():
                self.continuation.set_result(first)
            return
        tag, _, rest = first.partition(b" ")
        command = self._by_tag.pop(tag, None)
        if command is None:
            raise IMAPProtocolError(f"response for an unknown tag: {first[:120]!r}")
        status, _, text = rest.partition(b" ")
        command.status = status.upper()
        command.text = text
        command.t_done = time.perf_counter()
        self._inflight.remove(command)  # the head, in practice
        if not command.future.done():
            command.future.set_result(command)

    # commands -----------------------------------------------------------------------
    def send(self, *chunks: bytes, keep: bool = False) -> Command:
        """Write ``<tag> <chunks...>CRLF`` at once; await ``.future`` for the tagged answer."""
        if self.error is not None or self.transport is None or self.transport.is_closing():
            raise IMAPProtocolError(f"connection is closed ({self.error})")
        self._next_tag += 1
        tag = b"A%d" % self._next_tag
        command = Command(tag, self._loop.create_future(), keep)
        self._inflight.append(command)
        self._by_tag[tag] = command
        command.t_sent = time.perf_counter()
        self.transport.writelines([tag, b" ", *chunks, b"\r\n"])
        return command

    async def run(self, *chunks: bytes, keep: bool = False) -> Command:
        return await self.send(*chunks, keep=keep).future

    async def drain(self) -> None:
        await self._can_write.wait()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def quoted(text: str) -> bytes:
    """An IMAP quoted string."""
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode("utf-8") + b'"'


async def connect(port: int) -> IMAPClient:
    """Connect and read the greeting."""
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(IMAPClient, "127.0.0.1", port)
    try:
        greeting = await client.greeting
    except BaseException:
        client.abort()
        raise
    if not greeting.startswith(b"* OK"):
        client.abort()
        raise IMAPProtocolError(f"greeting: {greeting[:120]!r}")
    return client


async def login(port: int, user: str, password: str) -> IMAPClient:
    """Connect, greeting, LOGIN; raises IMAPProtocolError unless the LOGIN is OK."""
    client = await connect(port)
    try:
        answer = await client.run(b"LOGIN ", quoted(user), b" ", quoted(password))
    except BaseException:
        client.abort()
        raise
    if not answer.ok:
        client.abort()
        raise IMAPProtocolError(f"LOGIN: {answer.describe()}")
    return client


async def logout(client: IMAPClient) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5.0):
            await client.run(b"LOGOUT")
    client.close()


async def select(client: IMAPClient, mailbox: str = "INBOX") -> tuple[int, float]:
    """SELECT; returns (EXISTS, seconds)."""
    command = await client.run(b"SELECT ", quoted(mailbox), keep=True)
    if not command.ok:
        raise IMAPProtocolError(f"SELECT {mailbox}: {command.describe()}")
    exists = [int(m.group(1)) for line in command.lines if (m := _EXISTS_RE.match(line))]
    if not exists:
        raise IMAPProtocolError("SELECT without EXISTS")
    return exists[-1], command.t_done - command.t_sent


# --------------------------------------------------------------------------- messages

_FIRST = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
          "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter",
          "Zoë", "José", "Søren", "Ada", "Linus")
_LAST = ("Smith", "Jones", "Müller", "García", "Rossi", "Kowalski", "Nguyen", "Tanaka",
         "Okafor", "Larsen", "Dubois", "Silva", "Cohen", "Ivanova", "Patel", "O'Brien")
_DOMAINS = ("example.com", "example.org", "mail.example.net", "corp.example", "agents.example",
            "billing.example.com", "news.example.org")
_TOPICS = ("quarterly report", "build failed on main", "invoice #{n}", "meeting notes",
           "deploy schedule", "customer ticket {n}", "weekly summary", "release {n}.{m}",
           "password reset", "your order has shipped", "review request", "lunch tomorrow?",
           "incident postmortem", "API rate limits", "contract draft v{m}", "Café Zürich offsite")
_TZS = (UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=1)),
        timezone(timedelta(hours=2)), timezone(timedelta(hours=9)),
        timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8)))


@dataclass
class BenchMessage:
    raw: bytes
    flags: bytes  # e.g. rb"(\Seen)"
    internaldate: bytes  # "dd-Mon-yyyy hh:mm:ss +0000", quoted


def _address(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    local = f"{first}.{last}".lower().encode("ascii", "ignore").decode().replace("'", "")
    return f"{first} {last}", f"{local}@{rng.choice(_DOMAINS)}"


def _header_name(name: str) -> str:
    """A display name as a header value: quoted ASCII or an RFC 2047 encoded word."""
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        return "=?utf-8?b?" + base64.b64encode(name.encode()).decode() + "?="
    return '"' + name.replace('"', "") + '"' if "'" in name else name


def _subject(rng: random.Random, n: int) -> str:
    topic = rng.choice(_TOPICS).format(n=1000 + n, m=rng.randint(1, 9))
    prefix = rng.choice(("", "", "", "Re: ", "Fwd: ", "[agents] "))
    text = prefix + topic[0].upper() + topic[1:]
    try:
        text.encode("ascii")
    except UnicodeEncodeError:
        return "=?utf-8?q?" + "".join(
            c if c.isalnum() and c.isascii() else
            "_" if c == " " else "".join(f"={b:02X}" for b in c.encode()) for c in text) + "?="
    return text


def make_message(n: int, rng: random.Random, rcpt: str, run: str, now: datetime) -> BenchMessage:
    """Message ``n``: 2-8 KiB, plain (55%), multipart/alternative (20%) or mixed with a
    small attachment (25%); CRLF line ends."""
    target = rng.randint(2 * KIB, 8 * KIB)
    name, addr = _address(rng)
    when = (now - timedelta(seconds=rng.uniform(0, 90 * 86400))).astimezone(rng.choice(_TZS))
    when = when.replace(microsecond=0)
    headers = [
        f"Return-Path: <{addr}>",
        f"From: {_header_name(name)} <{addr}>",
        f"To: {rng.choice(('', 'Agent '))}<{rcpt}>",
    ]
    if rng.random() < 0.3:
        cc = [_address(rng) for _ in range(rng.randint(1, 3))]
        headers.append("Cc: " + ", ".join(f"{_header_name(nm)} <{a}>" for nm, a in cc))
    headers += [
        f"Subject: {_subject(rng, n)}",
        f"Date: {email.utils.format_datetime(when)}",
        f"Message-ID: <imapbench-{run}-{n:06d}@{addr.split('@')[1]}>",
    ]
    if rng.random() < 0.3:
        headers.append(f"In-Reply-To: <imapbench-{run}-{max(0, n - rng.randint(1, 50)):06d}"
                       f"@{rng.choice(_DOMAINS)}>")
    headers.append("MIME-Version: 1.0")
    kind = rng.random()
    if kind < 0.55:
        headers += ["Content-Type: text/plain; charset=us-ascii",
                    "Content-Transfer-Encoding: 7bit"]
        head = ("\r\n".join(headers) + "\r\n\r\n").encode("utf-8")
        body = text_lines(max(200, target - len(head)), rng)
    elif kind < 0.75:
        boundary = f"=_alt_{n:06d}_{rng.getrandbits(32):08x}"
        headers.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        head = ("\r\n".join(headers) + "\r\n\r\n").encode("utf-8")
        part1 = (f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
        part2 = (f"\r\n--{boundary}\r\nContent-Type: text/html; charset=us-ascii\r\n\r\n"
                 "<html><body><p>").encode()
        end = f"</p></body></html>\r\n--{boundary}--\r\n".encode()
        room = max(400, target - len(head) - len(part1) - len(part2) - len(end))
        text = text_lines(room // 2, rng)
        html = text_lines(room - room // 2, rng).replace(b"\r\n", b"<br>\r\n", 3)
        body = part1 + text + part2 + html + end
    else:
        boundary = f"=_mix_{n:06d}_{rng.getrandbits(32):08x}"
        headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
        head = ("\r\n".join(headers) + "\r\n\r\n").encode("utf-8")
        filename, ctype = rng.choice((("report.pdf", "application/pdf"),
                                      ("photo.png", "image/png"),
                                      ("data.csv", "text/csv"),
                                      ("notes.bin", "application/octet-stream")))
        blob = base64.encodebytes(rng.randbytes(rng.randint(512, 2048))).replace(b"\n", b"\r\n")
        part1 = (f"This is a multi-part message in MIME format.\r\n\r\n--{boundary}\r\n"
                 "Content-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
        part2 = (f"\r\n--{boundary}\r\nContent-Type: {ctype}; name=\"{filename}\"\r\n"
                 "Content-Transfer-Encoding: base64\r\n"
                 f"Content-Disposition: attachment; filename=\"{filename}\"\r\n\r\n").encode()
        end = f"\r\n--{boundary}--\r\n".encode()
        room = max(200, target - len(head) - len(part1) - len(part2) - len(blob) - len(end))
        body = part1 + text_lines(room, rng) + part2 + blob.rstrip(b"\r\n") + end
    flags = []
    if rng.random() < 0.6:
        flags.append("\\Seen")
    if rng.random() < 0.05:
        flags.append("\\Flagged")
    if rng.random() < 0.1:
        flags.append("\\Answered")
    utc = when.astimezone(UTC)
    internal = (f'"{utc.day:02d}-{_MONTHS[utc.month - 1]}-{utc.year:04d} '
                f'{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d} +0000"').encode()
    return BenchMessage(head + body, ("(" + " ".join(flags) + ")").encode(), internal)


def big_message(size: int, rcpt: str) -> bytes:
    """One message of exactly ``size`` bytes: a text part and a base64 attachment."""
    head = (f"From: Big Sender <big@sender.example>\r\nTo: <{rcpt}>\r\n"
            f"Subject: one large attachment\r\nDate: "
            f"{email.utils.format_datetime(email.utils.localtime())}\r\n"
            f"Message-ID: <imapbench-big-{random.getrandbits(32):08x}@sender.example>\r\n"
            'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="=_bench_boundary_="'
            "\r\n\r\n").encode()
    return head + attachment_body(size - len(head), random.Random(11))


def append_chunks(mailbox: bytes, message: BenchMessage | bytes) -> list[bytes]:
    """APPEND arguments with a LITERAL+ (non-synchronizing) literal."""
    if isinstance(message, bytes):
        return [b"APPEND ", mailbox, b" {%d+}\r\n" % len(message), message]
    return [b"APPEND ", mailbox, b" ", message.flags, b" ", message.internaldate,
            b" {%d+}\r\n" % len(message.raw), message.raw]


# --------------------------------------------------------------------------- server harness


def write_config(path: Path, *, dsn: str, http_port: int, mx_port: int, imap_port: int,
                 blob_dir: Path, pool_size: int | None, log_level: str,
                 imap_max_per_ip: int, imap_max_total: int, max_append: int) -> None:
    """Server defaults except private ports, plaintext IMAP login on loopback, higher IMAP
    connection caps, the blob folder, and no HTTP rate limit."""
    lines = [
        "# Written by bench/imap_bench.py",
        "[server]",
        'hostname = "bench.localhost"',
        'environment = "development"',
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
        "",
        "[smtp]",
        'mx_bind = "127.0.0.1"',
        f"mx_port = {mx_port}",
        "",
        "[imap]",
        'bind = "127.0.0.1"',
        f"port = {imap_port}",
        "# LOGIN without TLS: loopback development only; the benchmark measures IMAP, not TLS.",
        "allow_plaintext_login = true",
        "# Every benchmark connection comes from 127.0.0.1 (the default allows 50 per address).",
        f"max_connections_per_ip = {imap_max_per_ip}",
        f"max_connections = {imap_max_total}",
        f'max_append_size = "{max_append}B"',
        "",
        "[storage]",
        'backend = "local"',
        f"path = {toml_str(str(blob_dir))}",
        "",
        "[mail]",
        f"shared_domain = {toml_str(SHARED_DOMAIN)}",
        "",
        "# The HTTP API's token bucket (used here only to create the inboxes). IMAP has no",
        "# limit on successful logins; failed ones are throttled, and this bench has none.",
        "[rate_limit]",
        "enabled = false",
        "",
        "[logging]",
        f"level = {toml_str(log_level)}",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


class IMAPHarness(Harness):
    """smtp_bench's harness (cluster, server process, cleanup) with an IMAP config."""

    imap_port = 0

    def start_imap_server(self, *, pool_size: int | None, log_level: str, imap_max_per_ip: int,
                          imap_max_total: int, max_append: int) -> None:
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        self.http_port, self.mx_port, self.imap_port = sorted(ports)
        config = self.tmp / "agentpost.toml"
        write_config(config, dsn=self.dsn, http_port=self.http_port, mx_port=self.mx_port,
                     imap_port=self.imap_port, blob_dir=self.tmp / "blobs",
                     pool_size=pool_size, log_level=log_level, imap_max_per_ip=imap_max_per_ip,
                     imap_max_total=imap_max_total, max_append=max_append)
        log("bootstrapping an organization")
        self.key = bootstrap(config)
        log_path = self.tmp / "server.log"
        self.server_log = open(log_path, "wb")  # closed in cleanup()
        log(f"starting agentpost serve: HTTP 127.0.0.1:{self.http_port}, "
            f"IMAP 127.0.0.1:{self.imap_port} (log: {log_path})")
        self._spawn()

    def _spawn(self) -> None:
        super()._spawn()
        # /healthz answers once the service runs; make sure IMAP greets too.
        deadline = time.monotonic() + 30.0
        while True:
            try:
                asyncio.run(_greets(self.imap_port))
                return
            except (OSError, TimeoutError, ConnectionError) as exc:
                if time.monotonic() > deadline:
                    raise SetupError(f"the IMAP port does not greet: {exc}") from exc
                self.check_server("start-up")
                time.sleep(0.1)

    def max_open_files(self) -> int | None:
        """The server process's RLIMIT_NOFILE soft limit."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{self.server_pid}/limits").read_text().splitlines():
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        return None


async def _greets(port: int) -> None:
    async with asyncio.timeout(5.0):
        client = await connect(port)
    client.abort()


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class PgQuerySampler:
    """What the server's database connections run: ``pg_stat_activity`` every 10 ms.

    Runs in a thread with its own connection. Each sample of each active client backend
    counts once for its statement (whitespace squeezed, cut at 100 characters) and once
    for its wait event (``CPU`` when not waiting).
    """

    def __init__(self, dsn: str, interval_s: float = 0.01) -> None:
        self.dsn = dsn
        self.interval_s = interval_s
        self.queries: collections.Counter[str] = collections.Counter()
        self.waits: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        conn = psycopg2.connect(self.dsn, connect_timeout=10)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not self._stop:
                    cur.execute(
                        "SELECT query, wait_event_type, wait_event FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND backend_type = 'client backend' AND state = 'active'")
                    for query, wtype, wevent in cur.fetchall():
                        self.queries[" ".join((query or "").split())[:100]] += 1
                        self.waits[f"{wtype}:{wevent}" if wtype else "CPU"] += 1
                    self.samples += 1
                    time.sleep(self.interval_s)
        finally:
            conn.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pg-queries", daemon=True)
        self._thread.start()

    def stop(self, limit: int = 8) -> dict[str, Any]:
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        n = self.samples or 1
        return {"samples": self.samples,
                "avg_active_backends": round(sum(self.waits.values()) / n, 2),
                "top_statements": [(q, round(c / n, 3)) for q, c in
                                   self.queries.most_common(limit)],
                "waits": [(w, round(c / n, 3)) for w, c in self.waits.most_common(limit)]}


class Diagnostics:
    """Optional per-phase recordings: py-spy on the server (``--py-spy DIR``, stopped with
    SIGINT at the phase's end) and PostgreSQL's active statements (``--pg-queries``)."""

    def __init__(self, h: Harness, folder: str | None, extra: str, pg_queries: bool) -> None:
        self.h = h
        self.folder = Path(folder) if folder else None
        self.extra = extra
        self.pg_queries = pg_queries
        self.exe = None
        if self.folder is not None:
            self.exe = shutil.which("py-spy",
                                    path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
            if self.exe is None:
                raise SetupError("--py-spy needs py-spy (pip install py-spy into the venv)")
            self.folder.mkdir(parents=True, exist_ok=True)
        self.hotspots: dict[str, Any] = {}
        self.statements: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def phase(self, name: str):  # type: ignore[no-untyped-def]
        proc = sampler = None
        out = None
        if self.folder is not None:
            out = self.folder / f"{name}.txt"
            command = [str(self.exe), "record", "--pid", str(self.h.server_pid), "--rate",
                       "200", "--format", "raw", "--output", str(out.resolve()),
                       "--nonblocking", *shlex.split(self.extra)]
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                    stdout=self.h.server_log, stderr=subprocess.STDOUT)
            self.h.profilers.append(proc)
            await asyncio.sleep(0.5)  # let py-spy attach
        if self.pg_queries:
            sampler = PgQuerySampler(self.h.dsn)
            sampler.start()
        try:
            yield
        finally:
            if sampler is not None:
                self.statements[name] = await asyncio.to_thread(sampler.stop)
            if proc is not None and out is not None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGINT)
                await asyncio.to_thread(self.h.finish_profiler, proc)
                with contextlib.suppress(OSError):
                    self.hotspots[name] = top_frames(out)


# --------------------------------------------------------------------------- scenarios


@dataclass
class LoginRun:
    concurrency: int
    latencies: list[float] = field(default_factory=list)  # connect -> LOGOUT OK, in window
    login_latencies: list[float] = field(default_factory=list)  # LOGIN sent -> OK, in window
    errors: dict[str, int] = field(default_factory=dict)
    total: int = 0  # incl. warm-up
    elapsed: float = 0.0
    server_cpu: float = 0.0
    postgres_cpu: float = 0.0
    client_cpu: float = 0.0
    timed_out: bool = False


async def login_worker(port: int, user: str, password: str, run: LoginRun, window: Window,
                       stop_at: float, timeout_s: float) -> None:
    """connect + LOGIN + LOGOUT, back to back, until the window closes."""
    clock = time.perf_counter
    creds = (b"LOGIN ", quoted(user), b" ", quoted(password))
    while True:
        t0 = clock()
        if t0 >= window.end or t0 >= stop_at:
            return
        client: IMAPClient | None = None
        try:
            async with asyncio.timeout(timeout_s):
                client = await connect(port)
                answer = await client.run(*creds)
                if not answer.ok:
                    _count(run.errors, f"LOGIN {answer.describe()}"[:120])
                    client.abort()
                    # Failed logins are throttled; do not hammer the server with them.
                    await asyncio.sleep(0.5)
                    continue
                bye = await client.run(b"LOGOUT")
                if not bye.ok:
                    _count(run.errors, f"LOGOUT {bye.describe()}"[:120])
                    client.abort()
                    continue
        except (OSError, TimeoutError, ConnectionError) as exc:
            _count(run.errors, f"{type(exc).__name__}: {exc}"[:120])
            if client is not None:
                client.abort()
            await asyncio.sleep(0.05)
            continue
        t1 = bye.t_done
        client.close()
        run.total += 1
        if t0 >= window.start:
            run.latencies.append(t1 - t0)
            run.login_latencies.append(answer.t_done - answer.t_sent)


async def run_logins(h: IMAPHarness, user: str, password: str, concurrency: int,
                     warmup_s: float, duration_s: float, timeout_s: float) -> LoginRun:
    run = LoginRun(concurrency)
    window = Window()
    hard_stop = time.perf_counter() + warmup_s + duration_s + timeout_s + 5.0
    pg_pid = h.pg_pid()
    tasks = [asyncio.ensure_future(login_worker(h.imap_port, user, password, run, window,
                                                hard_stop, timeout_s))
             for _ in range(concurrency)]
    all_done = asyncio.gather(*tasks)
    all_done.add_done_callback(lambda f: f.cancelled() or f.exception())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(all_done), warmup_s)
    srv0, pg0, me0 = process_cpu(h.server_pid), tree_cpu(pg_pid), self_cpu()
    window.start = time.perf_counter()
    window.end = window.start + duration_s
    try:
        await asyncio.wait_for(all_done, duration_s + timeout_s + 5.0)
    except TimeoutError:
        run.timed_out = True
    run.elapsed = time.perf_counter() - window.start
    run.server_cpu = process_cpu(h.server_pid) - srv0
    run.postgres_cpu = tree_cpu(pg_pid) - pg0
    run.client_cpu = self_cpu() - me0
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return run


def _ms(v: float) -> float | None:
    return None if v is None or math.isnan(v) else round(v * 1000.0, 2)


def summarize_logins(run: LoginRun) -> dict[str, Any]:
    lat = sorted(run.latencies)
    login_lat = sorted(run.login_latencies)
    ok = len(lat)
    elapsed = run.elapsed

    def pct(v: float) -> float | None:
        return round(100.0 * v / elapsed, 1) if elapsed and not math.isnan(v) else None

    return {
        "concurrency": run.concurrency,
        "logins_in_window": ok,
        "logins_per_s": round(ok / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {"p50": _ms(percentile(lat, 50)), "p90": _ms(percentile(lat, 90)),
                       "p99": _ms(percentile(lat, 99)), "max": _ms(lat[-1]) if lat else None},
        "login_command_ms": {"p50": _ms(percentile(login_lat, 50)),
                             "p99": _ms(percentile(login_lat, 99))},
        "errors": sum(run.errors.values()),
        "error_kinds": run.errors,
        "logins_incl_warmup": run.total,
        "elapsed_s": round(elapsed, 3),
        "cpu_pct_of_one_core": {"server": pct(run.server_cpu), "postgres": pct(run.postgres_cpu),
                                "client": pct(run.client_cpu)},
        "server_cpu_ms_per_login": round(1000.0 * run.server_cpu / ok, 3) if ok else None,
        "postgres_cpu_ms_per_login": round(1000.0 * run.postgres_cpu / ok, 3) if ok else None,
        "timed_out": run.timed_out,
    }


async def append_worker(client: IMAPClient, mailbox: bytes, messages: list[BenchMessage],
                        window: int, uids: dict[int, int], indexes: list[int],
                        errors: dict[str, int], progress: list[int],
                        marks: list[float]) -> None:
    """Pipelined APPENDs: at most ``window`` commands in flight on this connection.

    ``progress`` counts the messages stored by all workers; ``marks`` gets the time of
    every 1,000th.
    """
    inflight: collections.deque[tuple[int, Command]] = collections.deque()

    def settle(index: int, command: Command) -> None:
        if not command.ok:
            _count(errors, f"APPEND {command.describe()}"[:120])
            return
        m = _APPENDUID_RE.search(command.text)
        if m is None:
            _count(errors, "APPEND OK without APPENDUID")
            return
        uids[int(m.group(2))] = index
        progress[0] += 1
        if progress[0] % 1000 == 0:
            marks.append(time.perf_counter())

    for index in indexes:
        while len(inflight) >= window:
            i, command = inflight.popleft()
            settle(i, await command.future)
        inflight.append((index, client.send(*append_chunks(mailbox, messages[index]))))
        await client.drain()
    while inflight:
        i, command = inflight.popleft()
        settle(i, await command.future)


# --------------------------------------------------------------------------- the bench


class IMAPBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.h = IMAPHarness("agentpost-imapbench-", "imapbench")
        self.h.keep_log = args.server_log
        self.user = ""
        self.big_user = ""
        self.messages: list[BenchMessage] = []
        self.uid_to_index: dict[int, int] = {}
        self.big_raw = b""
        self.failures: list[str] = []  # anything that makes the exit status 1
        self.diag: Diagnostics | None = None
        self.nofile: tuple[int, int] = (0, 0)

    def fail(self, message: str) -> None:
        log(f"  ERROR: {message}")
        self.failures.append(message)

    # setup ----------------------------------------------------------------------------
    def setup(self) -> dict[str, Any]:
        args = self.args
        # Both this client and the server (which inherits the limit) need a descriptor
        # per connection; the systemd unit gives the server LimitNOFILE=65536.
        self.nofile = raise_nofile(max(4096, 2 * args.idle_connections + 1024))
        if self.nofile[0] < args.idle_connections + 256:
            log(f"RLIMIT_NOFILE is only {self.nofile[0]}; fewer idle connections")
            args.idle_connections = max(0, self.nofile[0] - 256)
        pg_version = self.h.start_postgres(not args.no_fsync)
        per_ip = max(2000, args.idle_connections + args.selected_sessions + 100)
        total = max(5000, per_ip)
        self.h.start_imap_server(pool_size=args.pool_size, log_level=args.log_level,
                                 imap_max_per_ip=per_ip, imap_max_total=total,
                                 max_append=max(64 * MIB, args.big_size + MIB))
        self.diag = Diagnostics(self.h, args.py_spy, args.py_spy_args, args.pg_queries)
        from agentpost.config import load_config

        cfg = load_config(self.h.tmp / "agentpost.toml")
        return {"fsync": not args.no_fsync, "postgres_version": pg_version,
                "pool_size": cfg.database.pool_size, "log_level": args.log_level,
                "transport": "plain IMAP on 127.0.0.1 (allow_plaintext_login = true, no TLS)",
                "imap_max_connections_per_ip": cfg.imap.max_connections_per_ip,
                "imap_max_connections": cfg.imap.max_connections,
                "imap_max_append_size": cfg.imap.max_append_size,
                "http_rate_limit": "disabled (only used to create inboxes)",
                "login_rate_limit": "none on successful logins (failed ones are throttled "
                                    "per address and per account; no failures expected)",
                "client_nofile": self.nofile[0], "server_nofile": self.h.max_open_files(),
                "messages": args.messages, "append_connections": args.append_connections,
                "append_window": args.append_window, "big_size": args.big_size,
                "login_concurrency": args.login_concurrency, "duration_s": args.duration,
                "warmup_s": args.warmup, "fetch_repeats": args.fetch_repeats,
                "body_repeats": args.body_repeats, "idle_connections": args.idle_connections,
                "selected_sessions": args.selected_sessions,
                "blob_store": "local (temp folder)"}

    async def create_inboxes(self) -> None:
        log("creating the inboxes over the API")
        self.user = (await self.h.create_inbox(INBOX_USER))["email"]
        self.big_user = (await self.h.create_inbox(BIG_INBOX_USER))["email"]

    # phases ---------------------------------------------------------------------------
    async def load(self) -> dict[str, Any]:
        """APPEND the messages (pipelined, LITERAL+) and the big one; check the rows."""
        args = self.args
        log(f"generating {args.messages:,} messages")
        rng = random.Random(args.seed)
        run_id = f"{random.getrandbits(32):08x}"
        now = datetime.now(UTC)
        self.messages = [make_message(n, rng, self.user, run_id, now)
                         for n in range(args.messages)]
        total_bytes = sum(len(m.raw) for m in self.messages)
        sizes = sorted(len(m.raw) for m in self.messages)
        conns = max(1, min(args.append_connections, len(self.messages)))
        log(f"APPEND {len(self.messages):,} messages ({total_bytes / MIB:.1f} MiB, "
            f"{sizes[0]}-{sizes[-1]} bytes) over {conns} connection(s), "
            f"{args.append_window} in flight each")
        clients = [await login(self.h.imap_port, self.user, self.h.key) for _ in range(conns)]
        errors: dict[str, int] = {}
        uids: dict[int, int] = {}
        progress = [0]
        srv0, pg0 = process_cpu(self.h.server_pid), tree_cpu(self.h.pg_pid())
        t0 = time.perf_counter()
        marks = [t0]

        async def report() -> None:
            while True:
                await asyncio.sleep(5.0)
                done = progress[0]
                log(f"  {done:,} appended, {done / (time.perf_counter() - t0):,.0f} msgs/s")

        reporter = asyncio.ensure_future(report())
        try:
            async with self.diag.phase("append"), asyncio.timeout(args.load_timeout):
                await asyncio.gather(*(
                    append_worker(client, b"INBOX", self.messages, args.append_window, uids,
                                  list(range(i, len(self.messages), conns)), errors, progress,
                                  marks)
                    for i, client in enumerate(clients)))
        finally:
            reporter.cancel()
        elapsed = time.perf_counter() - t0
        srv_cpu = process_cpu(self.h.server_pid) - srv0
        pg_cpu = tree_cpu(self.h.pg_pid()) - pg0
        for client in clients:
            await logout(client)
        self.uid_to_index = uids
        rows = self.h.count("SELECT count(*) FROM messages m JOIN inboxes i ON i.id = m.inbox_id "
                            f"WHERE i.email = '{self.user}'")
        log(f"  -> {len(uids):,} appended in {elapsed:.1f} s = {len(uids) / elapsed:,.0f} "
            f"msgs/s; {rows:,} rows in the inbox")
        if errors:
            self.fail(f"APPEND errors: {errors}")
        if rows != len(self.messages):
            self.fail(f"the inbox has {rows} rows, {len(self.messages)} were appended")
        # The big message, into its own inbox.
        log(f"APPEND one {args.big_size:,}-byte message")
        self.big_raw = big_message(args.big_size, self.big_user)
        client = await login(self.h.imap_port, self.big_user, self.h.key)
        tb = time.perf_counter()
        async with asyncio.timeout(max(120.0, args.timeout)):
            answer = await client.run(*append_chunks(b"INBOX", self.big_raw))
        big_s = time.perf_counter() - tb
        await logout(client)
        if not answer.ok:
            self.fail(f"APPEND of the big message: {answer.describe()}")
        return {"messages": len(uids), "bytes": total_bytes,
                "size_min": sizes[0], "size_median": sizes[len(sizes) // 2],
                "size_max": sizes[-1], "seconds": round(elapsed, 2),
                "msgs_per_s": round(len(uids) / elapsed, 1) if elapsed else None,
                "mb_per_s": round(total_bytes / MB / elapsed, 2) if elapsed else None,
                "connections": conns, "window": args.append_window,
                "server_cpu_ms_per_msg": round(1000.0 * srv_cpu / max(1, len(uids)), 3),
                "postgres_cpu_ms_per_msg": round(1000.0 * pg_cpu / max(1, len(uids)), 3),
                "msgs_per_s_by_thousand": [round(1000 / (b - a), 1)
                                           for a, b in itertools.pairwise(marks)],
                "rows": rows, "errors": sum(errors.values()), "error_kinds": errors,
                "big_append_s": round(big_s, 2), "big_append_ok": answer.ok}

    def sanity_imaplib(self) -> dict[str, Any]:
        """An independent client: the count, and a few bodies byte for byte."""
        imap = imaplib.IMAP4("127.0.0.1", self.h.imap_port, timeout=60)
        try:
            imap.login(self.user, self.h.key)
            typ, data = imap.select("INBOX", readonly=True)
            count = int(data[0]) if typ == "OK" else -1
            picked = random.Random(5).sample(sorted(self.uid_to_index),
                                             min(5, len(self.uid_to_index)))
            exact = 0
            for uid in picked:
                typ, data = imap.uid("FETCH", str(uid), "(BODY.PEEK[])")
                body = data[0][1] if typ == "OK" and data and isinstance(data[0], tuple) else b""
                exact += body == self.messages[self.uid_to_index[uid]].raw
            imap.logout()
        finally:
            with contextlib.suppress(Exception):
                imap.shutdown()
        result = {"exists": count, "checked": len(picked), "byte_exact": exact}
        if count != len(self.messages) or exact != len(picked):
            self.fail(f"imaplib sanity check: {result}")
        return result

    async def warm_logins(self) -> None:
        """Login code paths exist before anything is measured (no SELECT: its heap would
        hide the idle connections' memory)."""
        for _ in range(5):
            client = await login(self.h.imap_port, self.user, self.h.key)
            await logout(client)

    async def warm_fetch(self) -> None:
        client = await login(self.h.imap_port, self.user, self.h.key)
        await select(client)
        await client.run(b"UID FETCH 1:20 (FLAGS RFC822.SIZE ENVELOPE BODY.PEEK[])")
        await logout(client)

    async def idle_connections(self) -> dict[str, Any]:
        n = self.args.idle_connections
        pid = self.h.server_pid
        log(f"{n:,} idle authenticated connections")
        await asyncio.sleep(1.0)
        before = proc_status(pid)
        clients: list[IMAPClient] = []
        errors: dict[str, int] = {}
        sem = asyncio.Semaphore(32)

        async def one() -> None:
            async with sem:
                try:
                    async with asyncio.timeout(self.args.timeout):
                        clients.append(await login(self.h.imap_port, self.user, self.h.key))
                except (OSError, TimeoutError, ConnectionError) as exc:
                    _count(errors, f"{type(exc).__name__}: {exc}"[:120])

        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(one() for _ in range(n)))
            open_s = time.perf_counter() - t0
            await asyncio.sleep(self.args.idle_wait)
            alive = sum(1 for c in clients if c.error is None)
            during = proc_status(pid)
        finally:
            for client in clients:
                client.abort()
        await asyncio.sleep(1.0)
        after = proc_status(pid)
        if errors or alive != n:
            self.fail(f"idle connections: {alive}/{n} logged in and open, errors {errors}")
        rss0, rss1 = before.get("VmRSS"), during.get("VmRSS")
        return {"connections": n, "logged_in_and_open": alive, "open_s": round(open_s, 2),
                "rss_before_mib": round(rss0 / MIB, 1) if rss0 else None,
                "rss_with_connections_mib": round(rss1 / MIB, 1) if rss1 else None,
                "rss_after_close_mib": round(after["VmRSS"] / MIB, 1) if "VmRSS" in after
                else None,
                "kib_per_connection": round((rss1 - rss0) / KIB / n, 1) if rss0 and rss1 and n
                else None,
                "errors": sum(errors.values()), "error_kinds": errors}

    async def logins(self) -> list[dict[str, Any]]:
        results = []
        for conc in self.args.login_concurrency:
            log(f"logins: {conc} concurrent clients, {self.args.warmup} s warm-up + "
                f"{self.args.duration} s")
            await asyncio.sleep(0.5)
            async with self.diag.phase(f"logins-c{conc}"):
                run = await run_logins(self.h, self.user, self.h.key, conc, self.args.warmup,
                                       self.args.duration, self.args.timeout)
            summary = summarize_logins(run)
            results.append(summary)
            log(f"  -> {summary['logins_per_s']:,.0f} logins/s, p50 "
                f"{summary['latency_ms']['p50']} ms, p99 {summary['latency_ms']['p99']} ms, "
                f"errors {summary['errors']}")
            if summary["errors"] or run.timed_out:
                self.fail(f"logins c={conc}: {run.errors} timed_out={run.timed_out}")
            self.h.check_server(f"logins c={conc}")
        return results

    async def uid_fetch(self, client: IMAPClient) -> dict[str, Any]:
        """UID FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE): one checked pass, then timed ones."""
        n = len(self.messages)
        query = b"UID FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)"
        log(f"{query.decode()} x {self.args.fetch_repeats} (plus one checked pass)")
        check = await client.run(query, keep=True)
        sizes: dict[int, int] = {}
        for line in check.lines:
            u, s = _UID_RE.search(line), _SIZE_RE.search(line)
            if u and s:
                sizes[int(u.group(1))] = int(s.group(1))
        wrong = [u for u, i in self.uid_to_index.items()
                 if sizes.get(u) != len(self.messages[i].raw)]
        if not check.ok or check.fetches != n or wrong or not check.lines \
                or b"ENVELOPE (" not in check.lines[0]:
            self.fail(f"checked UID FETCH: {check.describe()}, {check.fetches} FETCH responses "
                      f"(want {n}), {len(wrong)} wrong sizes")
        times, srv = [], []
        async with self.diag.phase("uid-fetch"):
            for _ in range(self.args.fetch_repeats):
                cpu0 = process_cpu(self.h.server_pid)
                command = await client.run(query)
                srv.append(process_cpu(self.h.server_pid) - cpu0)
                times.append(command.t_done - command.t_sent)
                if not command.ok or command.fetches != n:
                    self.fail(f"UID FETCH: {command.describe()}, {command.fetches} FETCH "
                              f"responses (want {n})")
        log(f"  -> min {min(times):.3f} s, median {statistics.median(times):.3f} s")
        return {"command": query.decode(), "messages": n, "fetch_responses": check.fetches,
                "response_bytes": sum(len(x) + 2 for x in check.lines),
                "seconds": [round(t, 4) for t in times], "min_s": round(min(times), 4),
                "median_s": round(statistics.median(times), 4),
                "server_cpu_s_median": round(statistics.median(srv), 3),
                "sizes_match": not wrong}

    async def body_fetch(self, client: IMAPClient) -> dict[str, Any]:
        """FETCH 1:* BODY.PEEK[] over the whole folder: MB/s and the server's peak RSS."""
        n = len(self.messages)
        expected = sum(len(m.raw) for m in self.messages)
        pid = self.h.server_pid
        runs = []
        async with self.diag.phase("body-fetch"):
            for i in range(self.args.body_repeats):
                log(f"FETCH 1:* BODY.PEEK[] ({expected / MB:.1f} MB), run {i + 1}")
                await asyncio.sleep(0.5)
                idle = proc_status(pid).get("VmRSS")
                reset = reset_peak_rss(pid)
                cpu0 = process_cpu(pid)
                async with asyncio.timeout(self.args.load_timeout):
                    command = await client.run(b"FETCH 1:* BODY.PEEK[]")
                cpu = process_cpu(pid) - cpu0
                peak = proc_status(pid).get("VmHWM")
                seconds = command.t_done - command.t_sent
                if not command.ok or command.fetches != n or command.literal_bytes != expected:
                    self.fail(f"FETCH BODY.PEEK[]: {command.describe()}, {command.fetches} "
                              f"responses (want {n}), {command.literal_bytes} literal bytes "
                              f"(want {expected})")
                runs.append({"seconds": round(seconds, 3), "bytes": command.literal_bytes,
                             "mb_per_s": round(command.literal_bytes / MB / seconds, 2),
                             "msgs_per_s": round(command.fetches / seconds, 1),
                             "server_cpu_s": round(cpu, 2),
                             "idle_rss_mib": round(idle / MIB, 1) if idle else None,
                             "peak_rss_mib": round(peak / MIB, 1) if peak else None,
                             "peak_above_idle_mib": round((peak - idle) / MIB, 1)
                             if peak and idle and reset else None})
                log(f"  -> {seconds:.2f} s, {runs[-1]['mb_per_s']} MB/s, "
                    f"{runs[-1]['msgs_per_s']:,.0f} msgs/s")
        best = max(runs, key=lambda r: r["mb_per_s"])
        return {"command": "FETCH 1:* BODY.PEEK[]", "messages": n, "runs": runs,
                "best_mb_per_s": best["mb_per_s"], "best_msgs_per_s": best["msgs_per_s"],
                "max_peak_above_idle_mib": max((r["peak_above_idle_mib"] or 0) for r in runs)}

    async def selected_sessions(self) -> dict[str, Any]:
        """RSS per session holding the big INBOX selected (the per-session UID/flag view)."""
        n = self.args.selected_sessions
        pid = self.h.server_pid
        log(f"{n} sessions with the {len(self.messages):,}-message INBOX selected")
        await asyncio.sleep(1.0)
        before = proc_status(pid).get("VmRSS")
        clients = []
        select_s = []
        try:
            for _ in range(n):
                client = await login(self.h.imap_port, self.user, self.h.key)
                clients.append(client)
                _, seconds = await select(client)
                select_s.append(seconds)
            await asyncio.sleep(1.0)
            during = proc_status(pid).get("VmRSS")
        finally:
            for client in clients:
                client.abort()
        return {"sessions": n, "select_s_median": round(statistics.median(select_s), 3),
                "rss_before_mib": round(before / MIB, 1) if before else None,
                "rss_with_sessions_mib": round(during / MIB, 1) if during else None,
                "mib_per_session": round((during - before) / MIB / n, 2)
                if before and during and n else None}

    async def big_fetch(self) -> dict[str, Any]:
        """The ~20 MiB message alone: time, MB/s, peak RSS above idle; one checked pass."""
        size = len(self.big_raw)
        pid = self.h.server_pid
        log(f"FETCH 1 BODY.PEEK[] of the {size:,}-byte message x 3")
        client = await login(self.h.imap_port, self.big_user, self.h.key)
        try:
            exists, _ = await select(client)
            if exists != 1:
                self.fail(f"the big inbox has {exists} messages")
            await asyncio.sleep(1.0)
            idle = proc_status(pid).get("VmRSS")
            reset = reset_peak_rss(pid)
            times = []
            cpu0 = process_cpu(pid)
            async with self.diag.phase("big-fetch"):
                for _ in range(3):
                    async with asyncio.timeout(max(120.0, self.args.timeout)):
                        command = await client.run(b"FETCH 1 BODY.PEEK[]")
                    times.append(command.t_done - command.t_sent)
                    if not command.ok or command.literal_bytes != size:
                        self.fail(f"big FETCH: {command.describe()}, {command.literal_bytes} "
                                  f"bytes (want {size})")
            cpu = process_cpu(pid) - cpu0
            peak = proc_status(pid).get("VmHWM")
            check = await client.run(b"FETCH 1 BODY.PEEK[]", keep=True)
            exact = check.ok and check.literals == [self.big_raw]
            if not exact:
                self.fail("the big message did not come back byte for byte")
        finally:
            await logout(client)
        best = min(times)
        return {"bytes": size, "seconds": [round(t, 3) for t in times],
                "min_s": round(best, 3), "mb_per_s": round(size / MB / best, 1),
                "server_cpu_s_per_fetch": round(cpu / len(times), 3),
                "idle_rss_mib": round(idle / MIB, 1) if idle else None,
                "peak_rss_mib": round(peak / MIB, 1) if peak else None,
                "peak_above_idle_mib": round((peak - idle) / MIB, 1) if peak and idle and reset
                else None,
                "peak_above_idle_x_size": round((peak - idle) / size, 2)
                if peak and idle and reset else None,
                "byte_exact": exact}

    async def run_all(self) -> dict[str, Any]:
        await self.create_inboxes()
        load = await self.load()
        # APPEND parses every message (and the big one) in the server, which leaves its
        # heap grown: a fresh process (same database and blobs) for the RSS figures.
        await asyncio.to_thread(self.h.restart_server)
        await self.warm_logins()
        out: dict[str, Any] = {"load": load}
        out["idle"] = await self.idle_connections() if self.args.idle_connections else None
        self.h.check_server("the idle connections")
        out["sanity"] = await asyncio.to_thread(self.sanity_imaplib)
        log(f"imaplib sanity check: {out['sanity']}")
        await self.warm_fetch()
        out["logins"] = await self.logins()
        client = await login(self.h.imap_port, self.user, self.h.key)
        try:
            exists, select_s = await select(client)
            if exists != len(self.messages):
                self.fail(f"SELECT INBOX: {exists} EXISTS, want {len(self.messages)}")
            out["select_s"] = round(select_s, 4)
            out["uid_fetch"] = await self.uid_fetch(client)
            out["body_fetch"] = await self.body_fetch(client) if self.args.body_repeats \
                else None
        finally:
            await logout(client)
        self.h.check_server("the FETCH runs")
        out["selected"] = await self.selected_sessions() if self.args.selected_sessions \
            else None
        self.h.check_server("the selected sessions")
        # Again a fresh heap, so that the large message's transient memory shows in RSS.
        await asyncio.to_thread(self.h.restart_server)
        await self.warm_logins()
        out["big"] = await self.big_fetch()
        self.h.check_server("the big FETCH")
        out["hotspots"] = self.diag.hotspots if self.diag else {}
        out["pg_statements"] = self.diag.statements if self.diag else {}
        return out


# --------------------------------------------------------------------------- report


def target_verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    best = max(r["logins"], key=lambda x: x["logins_per_s"]) if r["logins"] else None
    out.append({"description": f"logins/s (connect + LOGIN + LOGOUT) >= "
                               f"{TARGET_LOGINS_PER_S:.0f}",
                "measured": f"{best['logins_per_s']:,.0f}/s at c={best['concurrency']}"
                if best else None,
                "met": best["logins_per_s"] >= TARGET_LOGINS_PER_S and not best["errors"]
                if best else None})
    uf = r.get("uid_fetch")
    out.append({"description": f"UID FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE) over "
                               f"{uf['messages']:,} messages < {TARGET_UID_FETCH_S} s (median)"
                if uf else "UID FETCH ENVELOPE",
                "measured": f"median {uf['median_s']:.3f} s, min {uf['min_s']:.3f} s"
                if uf else None,
                "met": uf["median_s"] < TARGET_UID_FETCH_S if uf else None})
    idle = r.get("idle")
    out.append({"description": f"server RSS with {idle['connections'] if idle else 1000:,} idle "
                               f"authenticated connections < {TARGET_IDLE_RSS_MIB:.0f} MB",
                "measured": f"{idle['rss_with_connections_mib']} MiB" if idle else None,
                "met": (idle["rss_with_connections_mib"] is not None
                        and idle["rss_with_connections_mib"] * MIB < TARGET_IDLE_RSS_MIB * MB
                        and idle["logged_in_and_open"] == idle["connections"])
                if idle else None})
    return out


def print_table(report: dict[str, Any]) -> None:
    m, s, r = report["machine"], report["setup"], report["results"]
    out = [
        "",
        "AgentPost IMAP benchmark",
        machine_line(m),
        f"  server  : `agentpost serve` in its own process, {s['transport']}, db pool_size "
        f"{s['pool_size']}, IMAP caps {s['imap_max_connections_per_ip']}/address "
        f"{s['imap_max_connections']} total, RLIMIT_NOFILE server {s['server_nofile']} client "
        f"{s['client_nofile']}, log level {s['log_level']}",
        f"  database: PostgreSQL {s['postgres_version']}, embedded cluster, "
        f"fsync={'on' if s['fsync'] else 'off'}; blob store {s['blob_store']}",
        f"  limits  : HTTP rate limit {s['http_rate_limit']}; IMAP: {s['login_rate_limit']}",
        "",
    ]
    load = r["load"]
    out.append(f"Load: {load['messages']:,} messages ({load['bytes'] / MIB:.1f} MiB, "
               f"{load['size_min']:,}-{load['size_max']:,} bytes, median "
               f"{load['size_median']:,}) by APPEND (LITERAL+) over {load['connections']} "
               f"connections x {load['window']} in flight: {load['seconds']} s = "
               f"{fmt(load['msgs_per_s'], 0)} msgs/s ({load['mb_per_s']} MB/s); server CPU "
               f"{load['server_cpu_ms_per_msg']} ms/msg, PostgreSQL "
               f"{load['postgres_cpu_ms_per_msg']} ms/msg; rows {load['rows']:,}; big "
               f"message APPEND {load['big_append_s']} s")
    if load["msgs_per_s_by_thousand"]:
        out.append("  msgs/s per 1,000 appended, in order: "
                   + ", ".join(f"{x:,.0f}" for x in load["msgs_per_s_by_thousand"]))
    sanity = r["sanity"]
    out.append(f"imaplib check: SELECT says {sanity['exists']:,} messages, "
               f"{sanity['byte_exact']}/{sanity['checked']} bodies byte-exact")
    out.append("")
    header = (f"{'logins (connect+LOGIN+LOGOUT)':<31}{'conc':>5}{'logins/s':>10}{'p50 ms':>9}"
              f"{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'LOGIN p50':>10}{'errors':>7}"
              f"{'srv CPU':>8}{'pg CPU':>8}{'cli CPU':>8}{'srv ms/login':>13}")
    out += [header, "-" * len(header)]
    for x in r["logins"]:
        lat, cpu = x["latency_ms"], x["cpu_pct_of_one_core"]
        out.append(f"{'':<31}{x['concurrency']:>5}{fmt(x['logins_per_s'], 0):>10}"
                   f"{fmt(lat['p50'], 2):>9}{fmt(lat['p90'], 2):>9}{fmt(lat['p99'], 2):>9}"
                   f"{fmt(lat['max'], 1):>9}{fmt(x['login_command_ms']['p50'], 2):>10}"
                   f"{x['errors']:>7}{fmt(cpu['server'], 0) + '%':>8}"
                   f"{fmt(cpu['postgres'], 0) + '%':>8}{fmt(cpu['client'], 0) + '%':>8}"
                   f"{fmt(x['server_cpu_ms_per_login'], 3):>13}")
    out.append("")
    out.append(f"SELECT INBOX ({load['messages']:,} messages): {r.get('select_s')} s")
    uf = r.get("uid_fetch")
    if uf:
        out.append(f"{uf['command']}: {uf['fetch_responses']:,} FETCH responses "
                   f"({uf['response_bytes'] / MB:.1f} MB), runs "
                   f"{', '.join(f'{t:.3f}' for t in uf['seconds'])} s -> min {uf['min_s']:.3f} "
                   f"s, median {uf['median_s']:.3f} s; server CPU {uf['server_cpu_s_median']} s "
                   "per run")
    bf = r.get("body_fetch")
    if bf:
        for i, x in enumerate(bf["runs"]):
            out.append(f"{bf['command']} run {i + 1}: {x['bytes'] / MB:.1f} MB in "
                       f"{x['seconds']} s = {x['mb_per_s']} MB/s ({fmt(x['msgs_per_s'], 0)} "
                       f"msgs/s), server CPU {x['server_cpu_s']} s, server RSS "
                       f"{x['idle_rss_mib']} MiB -> peak {x['peak_rss_mib']} MiB "
                       f"(+{x['peak_above_idle_mib']} MiB)")
    big = r["big"]
    out.append(f"FETCH 1 BODY.PEEK[] of one {big['bytes']:,}-byte message: runs "
               f"{', '.join(f'{t:.3f}' for t in big['seconds'])} s -> {big['mb_per_s']} MB/s; "
               f"server CPU {big['server_cpu_s_per_fetch']} s per fetch; RSS idle "
               f"{big['idle_rss_mib']} MiB, peak {big['peak_rss_mib']} MiB = "
               f"+{big['peak_above_idle_mib']} MiB ({big['peak_above_idle_x_size']}x the "
               f"message); byte-exact {big['byte_exact']}")
    idle = r.get("idle")
    if idle:
        out.append(f"{idle['connections']:,} idle authenticated connections "
                   f"({idle['logged_in_and_open']:,} open and logged in, opened in "
                   f"{idle['open_s']} s): server RSS {idle['rss_before_mib']} MiB -> "
                   f"{idle['rss_with_connections_mib']} MiB = {idle['kib_per_connection']} KiB "
                   f"per connection; {idle['rss_after_close_mib']} MiB after closing them")
    sel = r.get("selected")
    if sel:
        out.append(f"{sel['sessions']} sessions with the {load['messages']:,}-message INBOX "
                   f"selected (SELECT median {sel['select_s_median']} s): server RSS "
                   f"{sel['rss_before_mib']} -> {sel['rss_with_sessions_mib']} MiB = "
                   f"{sel['mib_per_session']} MiB per session")
    out.append("")
    out.append("  MB = 10^6 bytes, MiB = 2^20. Latency: connect -> tagged OK of LOGOUT; LOGIN "
               "p50 = LOGIN sent -> its OK. FETCH times: command written -> tagged OK parsed.")
    out.append("  CPU = % of one core in the measured window (server: agentpost serve, all "
               "threads; pg: postmaster + backends; cli: this load generator).")
    for x in r["logins"]:
        if x["error_kinds"]:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(x["error_kinds"].items()))
            out.append(f"  errors in logins c={x['concurrency']}: {kinds}")
    for v in report["targets"]:
        verdict = ("not measured in this run" if v["met"] is None else
                   f"measured {v['measured']}: {'MET' if v['met'] else 'NOT MET'}")
        out.append(f"  target  : {v['description']} -> {verdict} (informational)")
    for problem in report["failures"]:
        out.append(f"  FAILURE : {problem}")
    for phase, st in (r.get("pg_statements") or {}).items():
        out.append("")
        out.append(f"PostgreSQL during {phase}: {st['avg_active_backends']} active backends on "
                   f"average ({st['samples']} samples); waits: "
                   + ", ".join(f"{w} {v}" for w, v in st["waits"]))
        out += [f"    {v:6.3f}  {q}" for q, v in st["top_statements"]]
    for phase, hot in (r.get("hotspots") or {}).items():
        if not hot.get("self"):
            continue
        out.append("")
        out.append(f"py-spy hotspots of the server during {phase} "
                   f"({hot['samples'][0][1]} samples, non-idle threads; % of samples):")
        out.append("  self time:")
        out += [f"    {p:5.1f}%  {name}" for name, p in hot["self"]]
        out.append("  inclusive:")
        out += [f"    {p:5.1f}%  {name}" for name, p in hot["inclusive"]]
    out.append("")
    print("\n".join(out), flush=True)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--messages", type=int, default=10_000,
                        help="messages APPENDed to the measured INBOX (default 10000)")
    parser.add_argument("--append-connections", type=int, default=4,
                        help="IMAP connections used for the APPEND load (default 4)")
    parser.add_argument("--append-window", type=int, default=16,
                        help="pipelined APPENDs in flight per connection (default 16)")
    parser.add_argument("--big-size", type=int, default=20 * MIB,
                        help=f"bytes of the single large message (default {20 * MIB:,})")
    parser.add_argument("--login-concurrency", default="8,32",
                        help="comma-separated client counts for the login test (default 8,32)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="measured seconds per login run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="warm-up seconds before each login run (default 1)")
    parser.add_argument("--fetch-repeats", type=int, default=5,
                        help="timed UID FETCH ENVELOPE runs (default 5)")
    parser.add_argument("--body-repeats", type=int, default=1,
                        help="FETCH 1:* BODY.PEEK[] runs (default 1; 0 skips it)")
    parser.add_argument("--idle-connections", type=int, default=1000,
                        help="idle authenticated connections for the RSS test (default 1000; "
                             "0 skips it)")
    parser.add_argument("--idle-wait", type=float, default=3.0,
                        help="seconds to wait with them open before reading RSS (default 3)")
    parser.add_argument("--selected-sessions", type=int, default=20,
                        help="sessions that SELECT the big INBOX, for RSS per selected session "
                             "(default 20; 0 skips it)")
    parser.add_argument("--seed", type=int, default=42, help="message generator seed")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="per-login / per-command timeout in seconds (default 30)")
    parser.add_argument("--load-timeout", type=float, default=900.0,
                        help="limit for the whole APPEND load and each bulk FETCH (default 900)")
    parser.add_argument("--no-fsync", action="store_true",
                        help="run PostgreSQL with fsync/synchronous_commit off (not durable)")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="database.pool_size for the server (default: the server default)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"],
                        help="server logging.level (default info, as in production)")
    parser.add_argument("--py-spy", metavar="DIR", default=None,
                        help="record the server with py-spy during each phase into DIR/<phase>"
                             ".txt (collapsed stacks) and print the hotspots")
    parser.add_argument("--py-spy-args", default="", metavar="ARGS",
                        help="extra py-spy record options, e.g. '--gil' or '--idle'")
    parser.add_argument("--pg-queries", action="store_true",
                        help="sample pg_stat_activity every 10 ms during each phase and print "
                             "the statements PostgreSQL was busy with")
    parser.add_argument("--server-log", metavar="FILE", default=None,
                        help="keep a copy of the server's log here (it is deleted otherwise)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout instead of the table")
    args = parser.parse_args(argv)
    try:
        args.login_concurrency = sorted({int(c) for c in args.login_concurrency.split(",")
                                         if c.strip()})
    except ValueError as exc:
        parser.error(f"bad --login-concurrency: {exc}")
    if args.login_concurrency and min(args.login_concurrency) < 1:
        parser.error("--login-concurrency values must be >= 1")
    if args.messages < 1 or args.append_connections < 1 or args.append_window < 1:
        parser.error("--messages, --append-connections, --append-window must be >= 1")
    if args.big_size < 64 * KIB:
        parser.error("--big-size must be >= 65536")
    if args.fetch_repeats < 1 or args.body_repeats < 0 or args.idle_connections < 0 \
            or args.selected_sessions < 0:
        parser.error("--fetch-repeats must be >= 1; counts must not be negative")
    if args.duration <= 0 or args.warmup < 0 or args.timeout <= 0:
        parser.error("--duration and --timeout must be > 0, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    machine = machine_info()
    bench = IMAPBench(args)
    try:
        setup = bench.setup()
        results = asyncio.run(bench.run_all())
        stop_server(bench.h.server)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except (SetupError, EmbeddedPostgresError, MigrationError, psycopg2.Error, OSError,
            ConnectionError, TimeoutError, ssl.SSLError, imaplib.IMAP4.error) as exc:
        log(f"failed: {type(exc).__name__}: {str(exc).strip()}")
        return 1
    finally:
        bench.h.cleanup()
    report = {"machine": machine, "setup": setup, "results": results,
              "targets": target_verdicts(results), "failures": bench.failures}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
