#!/usr/bin/env python3
"""IMAP reads of messages kept in PostgreSQL against the same messages in the blob store.

Why: a message up to ``[storage] inline_message_max`` (default 256 KiB) keeps its bytes
in its ``blobs`` row (migration 0035) instead of a file of the local blob store. That
made ingest cheaper; this script measures what it costs the IMAP read path, which now
pulls the bytes out of PostgreSQL, so the figures are reproducible instead of coming
from ad-hoc scripts.

Two modes, run alternately (``pg``, ``blob``, ``pg``, ``blob``, ... for ``--rounds``):

- ``pg``: ``inline_message_max = "256KiB"`` (the default; raised to fit ``--size`` if
  that is larger), the bytes in PostgreSQL;
- ``blob``: ``inline_message_max = "0B"``, every message in the local blob store.

Each run, start to finish:

1. a throw-away PostgreSQL cluster (fsync on) in its own temp folder, migrated, and
   ``agentpost serve`` in its own process with IMAP on a free loopback port (plain
   LOGIN allowed on 127.0.0.1, as bench/imap_bench.py does), the MX and HTTP on free
   ports, the local blob store in that temp folder, rate limits off;
2. one inbox created over the HTTP API; ``--messages`` plain-text messages of exactly
   ``--size`` bytes delivered to it through the MX with ``smtplib`` (one session, one
   message after the other); the rows in ``messages`` must equal the messages sent,
   and their ``raw_blob_key`` must say the mode took effect (``db/..`` inline keys in
   ``pg`` mode, none in ``blob`` mode);
3. over one ``imaplib`` connection (LOGIN with the inbox address and the API key,
   SELECT INBOX), one untimed warm-up pass of each operation, then ``--repeat`` timed
   passes of each:

   - ``headers``: the header sync Thunderbird does, ``UID FETCH 1:* (UID RFC822.SIZE
     FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO CC SUBJECT DATE MESSAGE-ID)])``;
   - ``bodies``: ``FETCH 1:* (BODY.PEEK[])``. The warm-up pass checks every body: it
     must be the bytes sent (after SMTP's dot-unstuffing), preceded only by the
     ``Return-Path:``/``Received:`` trace fields the MX prepends;

   every pass must return one response per message;
4. the server stopped, the cluster and the temp folder deleted (also on Ctrl-C/errors).

Reported per run and operation: wall ms per message (median over the passes), and CPU
ms per message over all the timed passes: the server process (utime + stime of all its
threads, ``/proc/<pid>/stat``) and PostgreSQL (postmaster + its children, live and
reaped). On this shared 2-core machine, CPU per message is the figure to compare; wall
time includes imaplib's own parsing.

Exit status: 0; 1 when setup failed or a check failed; 130 on Ctrl-C or SIGTERM.

Usage: ``.venv/bin/python bench/imap_read_bench.py [--messages 80] [--size 200k]
[--repeat 5] [--rounds 2] [--json]``. Network traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import imaplib
import json
import re
import smtplib
import ssl
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # so that the sibling bench modules import
    sys.path.insert(0, str(HERE))

import psycopg2  # noqa: E402 - after the sys.path fix above
from api_bench import (  # noqa: E402
    SetupError,
    bootstrap,
    fmt,
    free_port,
    log,
    machine_info,
    machine_line,
    process_cpu,
    stop_on_signals,
    stop_server,
    toml_str,
    tree_cpu,
)
from imap_bench import IMAPHarness  # noqa: E402
from smtp_bench import (  # noqa: E402
    KIB,
    MIB,
    SENDER_DOMAIN,
    SHARED_DOMAIN,
    MessageFactory,
    parse_size,
    size_label,
)

from agentpost.dev.embedded_pg import EmbeddedPostgresError  # noqa: E402
from agentpost.storage.migrations import MigrationError  # noqa: E402

INBOX_USER = "imap-read"
#: The server default for storage.inline_message_max, and the ceiling it accepts.
DEFAULT_INLINE_MAX = 256 * KIB
INLINE_CEILING = MIB
#: Room for the Return-Path:/Received: fields the MX prepends to what was sent.
TRACE_ROOM = 4 * KIB
MODES = ("pg", "blob")
HEADER_FETCH = ("1:*", "(UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS "
                "(FROM TO CC SUBJECT DATE MESSAGE-ID)])")
BODY_FETCH = ("1:*", "(BODY.PEEK[])")
#: Only trace fields (with folded continuation lines) may precede the bytes sent.
_TRACE = re.compile(rb"(?:(?:Return-Path|Received):[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*",
                    re.IGNORECASE)
_SEQ = re.compile(rb"^(\d+) \(")


class CheckError(RuntimeError):
    """A count or a body did not match: the figures would not mean what they say."""


# --------------------------------------------------------------------------- server


def inline_max_for(mode: str, size: int) -> int:
    """The mode's storage.inline_message_max: 0 for ``blob``; for ``pg`` the default,
    or enough for ``size`` plus the trace fields, so that every message is inline."""
    if mode == "blob":
        return 0
    return min(INLINE_CEILING, max(DEFAULT_INLINE_MAX, size + TRACE_ROOM))


def write_config(path: Path, *, dsn: str, ports: dict[str, int], blob_dir: Path,
                 inline_max: int, log_level: str) -> None:
    """smtp_bench's config turns IMAP off and imap_bench's has no [storage] knob, so this
    one is written here: defaults except private ports, plain IMAP LOGIN on loopback,
    the blob folder, the inline limit of the mode, and no rate limits."""
    lines = [
        "# Written by bench/imap_read_bench.py",
        "[server]", 'hostname = "bench.localhost"', 'environment = "development"', "",
        "[database]", f"url = {toml_str(dsn)}", "",
        "[http]", 'bind = "127.0.0.1"', f"port = {ports['http']}", "",
        "[smtp]", 'mx_bind = "127.0.0.1"', f"mx_port = {ports['mx']}", "",
        "[imap]", 'bind = "127.0.0.1"', f"port = {ports['imap']}",
        "# LOGIN without TLS: loopback only; this measures reads, not TLS.",
        "allow_plaintext_login = true", "",
        "[storage]", 'backend = "local"', f"path = {toml_str(str(blob_dir))}",
        f'inline_message_max = "{inline_max}B"', "",
        "[mail]", f"shared_domain = {toml_str(SHARED_DOMAIN)}", "",
        "# The HTTP API is only used to create the inbox; no throttling of the bench key.",
        "[rate_limit]", "enabled = false", "",
        "[logging]", f"level = {toml_str(log_level)}", "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


class ReadHarness(IMAPHarness):
    """imap_bench's harness (cluster, server, IMAP greeting wait, cleanup) with this
    script's config."""

    def start_read_server(self, *, inline_max: int, log_level: str) -> None:
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        self.http_port, self.mx_port, self.imap_port = sorted(ports)
        config = self.tmp / "agentpost.toml"
        write_config(config, dsn=self.dsn, blob_dir=self.tmp / "blobs",
                     ports={"http": self.http_port, "mx": self.mx_port,
                            "imap": self.imap_port},
                     inline_max=inline_max, log_level=log_level)
        log("  bootstrapping an organization")
        self.key = bootstrap(config)
        self.server_log = open(self.tmp / "server.log", "wb")  # closed in cleanup()
        log(f"  starting agentpost serve: HTTP {self.http_port}, MX {self.mx_port}, "
            f"IMAP {self.imap_port}, inline_message_max {inline_max} B")
        self._spawn()


# --------------------------------------------------------------------------- delivery


def make_messages(count: int, size: int, rcpt: str) -> list[bytes]:
    """``count`` plain-text messages of exactly ``size`` bytes, each with its own
    Message-ID and Subject (so that each is its own blob); CRLF, no line starts with a
    dot, so the bytes sent are the bytes SMTP delivers."""
    factory = MessageFactory(size, "text")
    return [factory.head(0, n, rcpt) + factory.body for n in range(count)]


def deliver(port: int, rcpt: str, messages: list[bytes]) -> None:
    """Real SMTP through the MX: one session, one message after the other."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.bench.example",
                      timeout=120) as smtp:
        for n, raw in enumerate(messages):
            refused = smtp.sendmail(f"reader@{SENDER_DOMAIN}", [rcpt], raw)
            if refused:
                raise SetupError(f"message {n} refused: {refused}")


def check_rows(h: ReadHarness, mode: str, sent: int) -> None:
    """Every message sent is a row, and its bytes are where the mode says."""
    rows = h.count()
    inline = h.count("SELECT count(*) FROM messages WHERE raw_blob_key LIKE 'db/%'")
    log(f"  {rows} rows in messages, {inline} with inline bytes")
    if rows != sent:
        raise CheckError(f"{mode}: {rows} rows in messages, {sent} messages sent")
    if inline != (sent if mode == "pg" else 0):
        raise CheckError(f"{mode}: {inline} of {rows} messages inline; the mode did not "
                         "take effect")


# --------------------------------------------------------------------------- IMAP


def fetched(data: list[Any]) -> list[tuple[int, bytes]]:
    """(sequence number, literal) of each FETCH response imaplib returned."""
    out = []
    for item in data:
        if isinstance(item, tuple):
            match = _SEQ.match(item[0])
            if match is None:
                raise CheckError(f"unexpected FETCH response {item[0][:100]!r}")
            out.append((int(match.group(1)), item[1]))
    return out


def fetch_headers(imap: imaplib.IMAP4) -> list[tuple[int, bytes]]:
    typ, data = imap.uid("FETCH", *HEADER_FETCH)
    if typ != "OK":
        raise CheckError(f"UID FETCH headers: {typ} {data!r}")
    return fetched(data)


def fetch_bodies(imap: imaplib.IMAP4) -> list[tuple[int, bytes]]:
    typ, data = imap.fetch(*BODY_FETCH)
    if typ != "OK":
        raise CheckError(f"FETCH bodies: {typ} {data!r}")
    return fetched(data)


def check_bodies(got: list[tuple[int, bytes]], sent: list[bytes]) -> None:
    """Message n (delivered n-th, so sequence number n) is the bytes sent, preceded by
    nothing but the MX's trace fields."""
    if sorted(seq for seq, _ in got) != list(range(1, len(sent) + 1)):
        raise CheckError(f"bodies: {len(got)} FETCH responses for {len(sent)} messages")
    for seq, body in got:
        raw = sent[seq - 1]
        if not body.endswith(raw) or not _TRACE.fullmatch(body[:len(body) - len(raw)]):
            raise CheckError(f"body of message {seq} ({len(body)} bytes) is not the "
                             f"{len(raw)} bytes sent after trace fields")


def measure(h: ReadHarness, op: Callable[[], list[tuple[int, bytes]]], count: int,
            repeat: int) -> dict[str, Any]:
    """``repeat`` timed passes of ``op``: wall ms per message (median of the passes),
    server and PostgreSQL CPU ms per message over all of them."""
    pg_pid = h.pg_pid()
    walls = []
    srv0, pg0 = process_cpu(h.server_pid), tree_cpu(pg_pid)
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = op()
        walls.append(time.perf_counter() - t0)
        if len(got) != count:
            raise CheckError(f"{len(got)} FETCH responses for {count} messages")
    srv, pg = process_cpu(h.server_pid) - srv0, tree_cpu(pg_pid) - pg0
    per = 1000.0 / (count * repeat)
    return {"wall_ms_per_msg": round(statistics.median(walls) * 1000.0 / count, 3),
            "wall_ms_per_pass": [round(w * 1000.0, 1) for w in walls],
            "server_cpu_ms_per_msg": round(srv * per, 3),
            "pg_cpu_ms_per_msg": round(pg * per, 3)}


def read_all(h: ReadHarness, user: str, sent: list[bytes], repeat: int) -> dict[str, Any]:
    """One connection: a warm-up pass of each operation (the bodies checked), then the
    timed passes."""
    imap = imaplib.IMAP4("127.0.0.1", h.imap_port, timeout=300)
    try:
        imap.login(user, h.key)
        typ, data = imap.select("INBOX")
        if typ != "OK" or int(data[0] or 0) != len(sent):
            raise CheckError(f"SELECT INBOX: {typ} {data!r}, {len(sent)} messages sent")
        if len(fetch_headers(imap)) != len(sent):
            raise CheckError("warm-up header fetch: wrong number of responses")
        check_bodies(fetch_bodies(imap), sent)
        log(f"  {len(sent)} bodies byte-exact; timing {repeat} passes of each operation")
        results = {"headers": measure(h, lambda: fetch_headers(imap), len(sent), repeat),
                   "bodies": measure(h, lambda: fetch_bodies(imap), len(sent), repeat)}
        return results
    finally:
        with contextlib.suppress(Exception):  # logout() closes the socket itself
            imap.logout()


# --------------------------------------------------------------------------- runs


class Bench:
    """Holds the harness of the run in progress, so that main() can always clean it up."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.h: ReadHarness | None = None
        self.pg_version = ""

    def run(self, mode: str, round_no: int) -> dict[str, Any]:
        """One mode, one round: its own cluster, server, inbox and messages."""
        args = self.args
        inline_max = inline_max_for(mode, args.size)
        log(f"round {round_no}, mode {mode}")
        h = self.h = ReadHarness("agentpost-imapread-", "imapread")
        h.keep_log = args.server_log
        try:
            self.pg_version = h.start_postgres(True)
            h.start_read_server(inline_max=inline_max, log_level=args.log_level)
            user = asyncio.run(h.create_inbox(INBOX_USER))["email"]
            sent = make_messages(args.messages, args.size, user)
            log(f"  delivering {len(sent)} x {size_label(args.size)} over SMTP")
            t0 = time.perf_counter()
            deliver(h.mx_port, user, sent)
            log(f"  delivered in {time.perf_counter() - t0:.1f} s")
            check_rows(h, mode, len(sent))
            ops = read_all(h, user, sent, args.repeat)
            h.check_server("the reads")
            stop_server(h.server)
        finally:
            h.cleanup()
            self.h = None
        return {"mode": mode, "round": round_no, "inline_message_max": inline_max,
                "operations": ops}

    def run_all(self) -> list[dict[str, Any]]:
        return [self.run(mode, r) for r in range(1, self.args.rounds + 1) for mode in MODES]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode and operation, the median of each figure over the rounds."""
    out = []
    for mode in MODES:
        for op in ("headers", "bodies"):
            rows = [r["operations"][op] for r in runs if r["mode"] == mode]
            out.append({"mode": mode, "operation": op, "rounds": len(rows), **{
                key: round(statistics.median(row[key] for row in rows), 3)
                for key in ("wall_ms_per_msg", "server_cpu_ms_per_msg", "pg_cpu_ms_per_msg")}})
    return out


# --------------------------------------------------------------------------- report


def table_row(mode: str, op: str, which: str, r: dict[str, Any]) -> str:
    total = r["server_cpu_ms_per_msg"] + r["pg_cpu_ms_per_msg"]
    return (f"{mode:<6}{op:<9}{which:>7}{fmt(r['wall_ms_per_msg'], 3):>13}"
            f"{fmt(r['server_cpu_ms_per_msg'], 3):>16}{fmt(r['pg_cpu_ms_per_msg'], 3):>15}"
            f"{fmt(total, 3):>15}")


def print_table(report: dict[str, Any]) -> None:
    s = report["setup"]
    out = ["", "AgentPost IMAP reads: message bytes in PostgreSQL (pg) vs the local blob "
           "store (blob)", machine_line(report["machine"]),
           f"  database: PostgreSQL {s['postgres_version']}, a fresh embedded cluster per "
           "run, fsync=on",
           f"  load    : {s['messages']} plain-text messages of {size_label(s['size'])} "
           f"delivered over SMTP; one imaplib connection; {s['repeat']} timed passes per "
           "operation after an untimed warm-up; modes alternate, "
           f"{s['rounds']} round(s)",
           "  headers = UID FETCH 1:* (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS "
           "(FROM TO CC SUBJECT DATE MESSAGE-ID)]); bodies = FETCH 1:* (BODY.PEEK[])", ""]
    header = (f"{'mode':<6}{'op':<9}{'round':>7}{'wall ms/msg':>13}{'srv CPU ms/msg':>16}"
              f"{'pg CPU ms/msg':>15}{'srv+pg ms/msg':>15}")
    out += [header, "-" * len(header)]
    for run in report["runs"]:
        for op, r in run["operations"].items():
            out.append(table_row(run["mode"], op, str(run["round"]), r))
    if s["rounds"] > 1:
        out.append("-" * len(header))
        out += [table_row(r["mode"], r["operation"], "median", r) for r in report["summary"]]
    out += ["", "  wall = median pass / messages; CPU = all timed passes / (messages x "
            "passes), from /proc in 10 ms ticks; srv = agentpost serve (all threads), pg = "
            "postmaster + children.",
            f"  inline_message_max: pg {inline_max_for('pg', s['size'])} B, blob 0 B; every "
            "body checked byte for byte in each run.", ""]
    print("\n".join(out), flush=True)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--messages", type=int, default=80,
                        help="messages delivered per run (default 80)")
    parser.add_argument("--size", type=parse_size, default=200 * KIB,
                        help="bytes per message, e.g. 4k, 100k, 200k (default 200k)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed passes of each operation per run (default 5)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of (pg, blob) runs (default 2)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"],
                        help="server logging.level (default info)")
    parser.add_argument("--server-log", metavar="FILE", default=None,
                        help="keep a copy of the last run's server log here")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout instead of the table")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.repeat < 1 or args.rounds < 1:
        parser.error("--messages, --repeat and --rounds must be >= 1")
    if not 1 * KIB <= args.size <= INLINE_CEILING - TRACE_ROOM:
        parser.error(f"--size must be between 1k and {INLINE_CEILING - TRACE_ROOM} bytes "
                     "(the pg mode keeps every message inline, at most 1 MiB)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    machine = machine_info()
    bench = Bench(args)
    try:
        runs = bench.run_all()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except CheckError as exc:
        log(f"check failed: {exc}")
        return 1
    except (SetupError, EmbeddedPostgresError, MigrationError, psycopg2.Error, OSError,
            ConnectionError, TimeoutError, ssl.SSLError, smtplib.SMTPException,
            imaplib.IMAP4.error) as exc:
        log(f"failed: {type(exc).__name__}: {str(exc).strip()}")
        return 1
    finally:
        if bench.h is not None:
            bench.h.cleanup()
    setup = {"postgres_version": bench.pg_version, "fsync": True, "messages": args.messages,
             "size": args.size, "repeat": args.repeat, "rounds": args.rounds,
             "transport": "plain IMAP on 127.0.0.1 (allow_plaintext_login = true), imaplib"}
    report = {"machine": machine, "setup": setup, "runs": runs, "summary": summarize(runs)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
