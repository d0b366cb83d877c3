#!/usr/bin/env python3
"""A delivery's message bytes into ``blobs.data``: psycopg2 literal vs binary (issue 12).

The question (issue 12): "if txpostgres/psycopg2 is the wall, show the profile and the
alternative (e.g. psycopg 3 with pipeline mode) side by side before proposing a change
of driver". A delivery is ONE simple-query round trip, ``BEGIN; INSERTs; COMMIT``, whose
largest part is the message's raw bytes sent as a text literal
``convert_to('<body, quotes doubled>', 'UTF8')`` (agentpost.storage.long_text). The
server must receive, verify and lex that literal; psycopg 3 could send the same bytes as
a binary ``bytea`` parameter that the server copies as is. This script times that one
difference on the real ``blobs`` table (AgentPost's migrations: lz4, checks), nothing else:

* ``a-psycopg2``: psycopg2 as AgentPost does today: one multi-statement simple query
  ``BEGIN ISOLATION LEVEL READ COMMITTED; INSERT INTO blobs ...; INSERT INTO
  bench_deliveries ...; COMMIT``, the body adapted by ``long_text.inline_columns`` (the
  product's ``LongBytes`` -> ``convert_to`` literal).
* ``b-pg3-pipeline``: psycopg 3, the same four statements in one pipeline (one Sync, one
  round trip), the body a binary parameter (``%b``), the INSERTs prepared.
* ``c-pg3-nopipe``: as b without pipeline mode: one round trip per statement (what the
  pipeline buys).
* ``d-psycopg2-ahead``: what AgentPost's MX does since the sixteenth pass for message
  bytes from 16 KiB on (storage.blob_lead): psycopg2's connection, but ``BEGIN`` and the
  blob row with its bytes as a binary parameter go first, through libpq's pipeline mode
  (storage.libpq_pipeline, the product's own class; its prepared statement), then the
  rest and ``COMMIT`` as one psycopg2 string: two round trips, no driver change.

Each transaction is a synchronous commit (fsync on) of one blob row (a 4 KiB or 100 KiB
ASCII mail: header block + CRLF lines of words) and one small row in a scratch table
``bench_deliveries`` (created here). Every variant runs ``--duration`` seconds at 1 and at
8 connections; concurrency is threads, each with its own connection (psycopg2 and
psycopg 3 both release the GIL while waiting on the socket). Variants alternate within
each of ``--rounds`` rounds (order rotated per round), so machine drift hits all alike;
the tables are truncated and a CHECKPOINT taken before every run.

Printed per run: transactions/s, p50/p99 latency (ms), PostgreSQL CPU per transaction
(utime+stime of the benchmark's own backends from ``/proc/<pg_backend_pid()>/stat``;
backends only, not the WAL writer, checkpointer or postmaster), client CPU per
transaction (``time.process_time`` of this whole process / transactions), WAL KB per
transaction and the checkpoints that fell inside the run (both should not depend on the
driver), and a check that the rows in ``blobs`` and ``bench_deliveries`` equal the
committed transactions and that sampled rows hold the exact bytes (EQUAL, or the mismatch).

Usage: ``.venv/bin/python bench/driver_compare_blob.py [--duration 5] [--rounds 2] [--json]``
psycopg 3 is a benchmark-only dependency: ``.venv/bin/pip install 'psycopg[binary]'``.
Starts its own throw-away cluster (works as root) and removes it at exit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg2
from api_bench import percentile, process_cpu
from smtp_bench import parse_size

from agentpost.dev.embedded_pg import EmbeddedPostgres
from agentpost.storage import libpq_pipeline
from agentpost.storage.libpq_pipeline import Pipeline, Statement, Wait
from agentpost.storage.long_text import inline_columns, utf8_text
from agentpost.storage.migrations import migrate

try:
    import psycopg
except ImportError:  # benchmark-only dependency
    psycopg = None  # type: ignore[assignment]

DBNAME = "driverblob"
SIZES = (4 * 1024, 100 * 1024)
CONCURRENCY = (1, 8)
VARIANTS = ("a-psycopg2", "d-psycopg2-ahead", "b-pg3-pipeline", "c-pg3-nopipe")
ORG = "org_01JBENCH000000000000000000"
SAMPLE_ROWS = 20
BLOB_SQL = ("INSERT INTO blobs (key, size, refcount, created_at, data, utf8) "
            "VALUES (%s, %s, 1, %s, {data}, %s)")
DELIVERY_SQL = ("INSERT INTO bench_deliveries (org_id, blob_key, size, created_at) "
                "VALUES (%s, %s, %s, %s)")
BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED"
#: variant d: the blob row ahead, its bytes binary (storage.blob_lead's shape, one row)
AHEAD_SQL = ("INSERT INTO blobs (key, size, refcount, created_at, data, utf8) "
             "VALUES ($1, $2::bigint, 1, $3::timestamptz, $4, $5::bool)")
#: variant a: the whole transaction as ONE simple-query string, as storage.database sends it
SIMPLE_SQL = f"{BEGIN}; {BLOB_SQL.format(data='%s')}; {DELIVERY_SQL}; COMMIT"
SCRATCH_DDL = ("CREATE TABLE bench_deliveries (id bigserial PRIMARY KEY, org_id text NOT NULL, "
               "blob_key text NOT NULL, size bigint NOT NULL, created_at timestamptz NOT NULL)")
WORDS = ("the of and to in is that for it with as was on be at by this have from or "
         "message delivery mailbox server please regards thanks meeting tomorrow report "
         "attached invoice question answer project schedule don't it's we'll").split()


def make_message(size: int, seed: int = 12) -> bytes:
    """A plausible ASCII mail of exactly ``size`` bytes: a header block, then CRLF lines of
    words (a few apostrophes, so the literal's quote doubling has work to do)."""
    rng = random.Random(seed)
    head = ("Return-Path: <sender@example.test>\r\nReceived: from mx.example.test "
            "(mx.example.test [192.0.2.7]) by agentpost; Sun, 6 Dec 2026 02:00:00 +0000\r\n"
            "From: Sender <sender@example.test>\r\nTo: bench@bench.test\r\n"
            "Subject: Quarterly report and the meeting tomorrow\r\n"
            "Date: Sun, 6 Dec 2026 02:00:00 +0000\r\nMessage-ID: <bench.1@example.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n")
    lines, length = [head], len(head)
    while length < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 13))) + "\r\n"
        lines.append(line)
        length += len(line)
    return "".join(lines).encode("ascii")[:size - 2] + b"\r\n"


def backend_cpu_ms(pid: int) -> float:
    """utime + stime of one PostgreSQL backend, in milliseconds."""
    return process_cpu(pid) * 1000.0


# -- the clients: one per connection, ``deliver`` = one committed transaction --------------


class Client(Protocol):
    pid: int

    def deliver(self, key: str, body: bytes) -> None: ...

    def close(self) -> None: ...


class Psycopg2Client:
    """a: AgentPost's way: one simple-query string, the body as the convert_to literal."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True  # BEGIN/COMMIT are ours, as storage.database's Txn
        self.cur = self.conn.cursor()
        self.cur.execute("SELECT pg_backend_pid()")
        row = self.cur.fetchone()
        self.pid = int(row[0]) if row else 0

    def deliver(self, key: str, body: bytes) -> None:
        data, utf8 = inline_columns([body])  # LongBytes -> convert_to('...', 'UTF8')
        now = datetime.now(UTC)
        self.cur.execute(SIMPLE_SQL, (key, len(body), now, data[0], utf8[0],
                                      ORG, key, len(body), now))

    def close(self) -> None:
        self.conn.close()


class Psycopg3Client:
    """b/c: psycopg 3, extended protocol, the body binary (``%b``), the INSERTs prepared;
    all four statements in one pipeline (one Sync) or one round trip each."""

    def __init__(self, dsn: str, *, pipeline: bool) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        row = self.conn.execute("SELECT pg_backend_pid()").fetchone()
        self.pid = int(row[0]) if row else 0
        self.cur = self.conn.cursor()
        self.pipeline = pipeline
        self.blob_sql = BLOB_SQL.format(data="%b")

    def _send(self, key: str, body: bytes) -> None:
        utf8 = utf8_text(body)  # the row's flag, computed as the product does
        now = datetime.now(UTC)
        cur = self.cur
        cur.execute(BEGIN)
        cur.execute(self.blob_sql, (key, len(body), now, body, utf8), prepare=True)
        cur.execute(DELIVERY_SQL, (ORG, key, len(body), now), prepare=True)
        cur.execute("COMMIT")

    def deliver(self, key: str, body: bytes) -> None:
        if self.pipeline:
            with self.conn.pipeline():  # exit = Sync + wait for every result
                self._send(key, body)
        else:
            self._send(key, body)

    def close(self) -> None:
        self.conn.close()


class AheadClient(Psycopg2Client):
    """d: psycopg2's connection; the blob row first, through a libpq pipeline."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.prepared = False

    def deliver(self, key: str, body: bytes) -> None:
        now = datetime.now(UTC)
        row = Statement(AHEAD_SQL, [key.encode(), str(len(body)).encode(),
                                    now.isoformat().encode(), body,
                                    b"t" if utf8_text(body) else b"f"],
                        [False, False, False, True, False], "bench_ahead", not self.prepared)
        pipeline = Pipeline(self.conn, [Statement(BEGIN), row])
        fd = self.conn.fileno()
        while (wait := pipeline.step()) is not Wait.DONE:
            if wait is Wait.WRITE:
                select.select([fd], [fd], [])
            else:
                select.select([fd], [], [])
        if pipeline.error is not None:
            raise pipeline.error
        self.prepared = True
        self.cur.execute(f"{DELIVERY_SQL}; COMMIT", (ORG, key, len(body), now))


def open_client(variant: str, dsn: str) -> Client:
    if variant == "a-psycopg2":
        return Psycopg2Client(dsn)
    if variant == "d-psycopg2-ahead":
        return AheadClient(dsn)
    return Psycopg3Client(dsn, pipeline=variant == "b-pg3-pipeline")


# -- one timed run --------------------------------------------------------------------------


@dataclass
class Result:
    round: int
    variant: str
    size: int
    concurrency: int
    transactions: int
    seconds: float
    tx_s: float
    p50_ms: float
    p99_ms: float
    pg_cpu_ms_tx: float
    client_cpu_ms_tx: float
    wal_kb_tx: float
    checkpoints: int
    rows: str


def worker(client: Client, prefix: str, body: bytes, deadline: float, stop: threading.Event,
           latencies: list[float], errors: list[BaseException]) -> None:
    """Deliver until the deadline; each latency is one whole transaction, BEGIN to COMMIT."""
    seq = 0
    try:
        while not stop.is_set():
            started = time.perf_counter()
            if started >= deadline:
                return
            client.deliver(f"{prefix}{seq}", body)
            latencies.append(time.perf_counter() - started)
            seq += 1
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)
        stop.set()


def timed_run(dsn: str, variant: str, body: bytes, concurrency: int, duration: float,
              stop: threading.Event) -> tuple[int, float, list[float], float, float]:
    """(transactions, wall s, sorted latencies s, backend CPU ms, client CPU ms)."""
    clients = [open_client(variant, dsn) for _ in range(concurrency)]
    try:
        lats: list[list[float]] = [[] for _ in clients]
        errors: list[BaseException] = []
        pg0 = sum(backend_cpu_ms(c.pid) for c in clients)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        deadline = wall0 + duration
        threads = [threading.Thread(target=worker, daemon=True, args=(
            c, f"db/bench/{variant}/{i}/", body, deadline, stop, lats[i], errors))
            for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        wall = time.perf_counter() - wall0
        client_ms = (time.process_time() - cpu0) * 1000
        pg_ms = sum(backend_cpu_ms(c.pid) for c in clients) - pg0
        if errors:
            raise RuntimeError(f"{variant}: a transaction failed: {errors[0]!r}") from errors[0]
    finally:
        for c in clients:
            c.close()
    merged = sorted(x for lat in lats for x in lat)
    return len(merged), wall, merged, pg_ms, client_ms


def verify_and_reset(admin: Any, committed: int, body: bytes) -> str:
    """EQUAL if both tables hold one row per committed transaction and a sample of blob
    rows holds exactly ``body``; then empty the tables and CHECKPOINT for the next run."""
    digest = hashlib.md5(body).hexdigest()  # noqa: S324 (a checksum, not security)
    with admin.cursor() as cur:
        cur.execute("SELECT (SELECT count(*) FROM blobs), (SELECT count(*) FROM "
                    "bench_deliveries), (SELECT count(*) FROM (SELECT data, utf8 FROM blobs "
                    "LIMIT %s) s WHERE md5(data) = %s AND utf8)", (SAMPLE_ROWS, digest))
        row = cur.fetchone()
        blobs, deliveries, good = row if row else (-1, -1, -1)
        cur.execute("TRUNCATE blobs, bench_deliveries CASCADE")
        cur.execute("CHECKPOINT")
    if blobs == deliveries == committed and good == min(SAMPLE_ROWS, committed):
        return "EQUAL"
    return f"MISMATCH blobs={blobs} deliveries={deliveries} committed={committed} " \
           f"sampled_ok={good}"


def server_counters(admin: Any) -> tuple[float, int]:
    """(WAL bytes written so far, checkpoints so far): a run's WAL per transaction, and
    whether a checkpoint (max_wal_size) fell inside it."""
    with admin.cursor() as cur:
        cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')")
        row = cur.fetchone()
        wal = float(row[0]) if row else 0.0
        try:  # PostgreSQL <= 16; 17 moved the counters to pg_stat_checkpointer
            cur.execute("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
        except psycopg2.Error:
            cur.execute("SELECT num_timed + num_requested FROM pg_stat_checkpointer")
        row = cur.fetchone()
    return wal, int(row[0]) if row else 0


def one_run(dsn: str, admin: Any, args: argparse.Namespace, spec: tuple[int, str, int, int],
            stop: threading.Event) -> Result:
    rnd, variant, size, conc = spec
    body = make_message(size)
    wal0, ckpt0 = server_counters(admin)
    count, wall, lats, pg_ms, client_ms = timed_run(dsn, variant, body, conc, args.duration,
                                                    stop)
    wal1, ckpt1 = server_counters(admin)
    rows = verify_and_reset(admin, count, body)
    per = max(count, 1)
    return Result(rnd, variant, size, conc, count, round(wall, 3), count / wall,
                  percentile(lats, 50) * 1000, percentile(lats, 99) * 1000,
                  pg_ms / per, client_ms / per, (wal1 - wal0) / 1024 / per, ckpt1 - ckpt0,
                  rows)


# -- the cluster ------------------------------------------------------------------------------


class Cluster:
    """A throw-away fsync-on cluster, migrated with AgentPost's own migrations; ``close``
    (also on Ctrl-C, SIGTERM or an error) stops and deletes it and its temp folder."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="dcblob-"))
        self.pg = EmbeddedPostgres(self.tmp / "var", fsync=True, name="dcblob")
        self.dsn = ""
        self.version = ""

    def start(self) -> Any:
        """Start, create the database, migrate, add the scratch table; an admin connection."""
        self.pg.start()
        admin = psycopg2.connect(self.pg.dsn("postgres"), connect_timeout=10)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {DBNAME}")
            cur.execute("SHOW server_version")
            row = cur.fetchone()
            self.version = str(row[0]) if row else "?"
        admin.close()
        self.dsn = self.pg.dsn(DBNAME)
        migrate(self.dsn)
        admin = psycopg2.connect(self.dsn, connect_timeout=10)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(SCRATCH_DDL)
            cur.execute("SELECT current_setting('fsync'), current_setting('synchronous_commit'),"
                        " attcompression FROM pg_attribute WHERE attrelid = 'blobs'::regclass "
                        "AND attname = 'data'")
            row = cur.fetchone()
            codec = {"l": "lz4", "p": "pglz"}.get(row[2], "default") if row else "?"
            self.settings = f"fsync={row[0]} synchronous_commit={row[1]} " \
                            f"blobs.data compression={codec}" if row else ""
        return admin

    def close(self) -> None:
        try:
            self.pg.destroy()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


# -- output -------------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    print(f"{'variant':<17}{'size':>6}{'conn':>5}{'rnd':>4}{'tx':>7}{'tx/s':>8}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'pg ms/tx':>9}{'cli ms/tx':>10}{'WAL KB/tx':>10}{'ckpt':>5}  rows")
    key: Callable[[Result], tuple[int, int, str, int]] = \
        lambda r: (r.size, r.concurrency, r.variant, r.round)  # noqa: E731
    for r in sorted(results, key=key):
        print(f"{r.variant:<17}{r.size // 1024:>5}K{r.concurrency:>5}{r.round:>4}"
              f"{r.transactions:>7}{r.tx_s:>8.0f}{r.p50_ms:>8.2f}{r.p99_ms:>8.2f}"
              f"{r.pg_cpu_ms_tx:>9.3f}{r.client_cpu_ms_tx:>10.3f}{r.wal_kb_tx:>10.1f}"
              f"{r.checkpoints:>5}  {r.rows}")


def print_means(results: list[Result]) -> None:
    groups: dict[tuple[int, int, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.size, r.concurrency, r.variant), []).append(r)
    print(f"\nmean of rounds\n{'variant':<17}{'size':>6}{'conn':>5}{'tx/s':>8}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'pg ms/tx':>9}{'cli ms/tx':>10}")
    for (size, conc, variant), rs in sorted(groups.items()):
        def mean(attr: str, rs: list[Result] = rs) -> float:
            return sum(float(getattr(r, attr)) for r in rs) / len(rs)
        print(f"{variant:<17}{size // 1024:>5}K{conc:>5}{mean('tx_s'):>8.0f}"
              f"{mean('p50_ms'):>8.2f}{mean('p99_ms'):>8.2f}{mean('pg_cpu_ms_tx'):>9.3f}"
              f"{mean('client_cpu_ms_tx'):>10.3f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every variant (default 2)")
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                   help="message sizes, e.g. 4k,100k (default 4096,102400 bytes)")
    p.add_argument("--concurrency", default="1,8", help="connections (default 1,8)")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = p.parse_args(argv)
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError as exc:
        p.error(f"bad --sizes or --concurrency value: {exc}")
    if not args.sizes or not args.concurrency or min(args.concurrency) < 1 \
            or min(args.sizes) < 1024 or args.rounds < 1 or args.duration <= 0:
        p.error("--sizes (>= 1k each), --concurrency (>= 1), --rounds (>= 1) and "
                "--duration (> 0) need sensible values")
    return args


def plan(args: argparse.Namespace, variants: list[str]) -> list[tuple[int, str, int, int]]:
    """Every run in order: per round, per size and concurrency, the variants rotated."""
    specs: list[tuple[int, str, int, int]] = []
    for rnd in range(1, args.rounds + 1):
        shift = (rnd - 1) % len(variants)
        order = variants[shift:] + variants[:shift]
        for size in args.sizes:
            for conc in args.concurrency:
                specs.extend((rnd, v, size, conc) for v in order)
    return specs


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def header(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    info = {"postgres": cluster.version, "settings": cluster.settings,
            "psycopg2": str(getattr(psycopg2, "__version__", "?")).split()[0],
            "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__}, libpq "
                       f"{psycopg.pq.version()})" if psycopg else None,
            "duration_s": args.duration, "rounds": args.rounds,
            "load_before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "cpus": os.cpu_count()}
    for k, v in info.items():
        print(f"# {k}: {v}")
    print("# concurrency: threads, one connection each (all variants); pg CPU: the "
          "benchmark's backends only (no WAL writer/checkpointer/postmaster); client CPU: "
          "this whole process", flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = list(VARIANTS)
    if psycopg is None:
        print("psycopg 3 not installed: .venv/bin/pip install 'psycopg[binary]' "
              "(running variants a and d only)", file=sys.stderr)
        variants = variants[:2]
    if not libpq_pipeline.available():
        print("psycopg2's libpq has no pipeline mode: no variant d", file=sys.stderr)
        variants.remove("d-psycopg2-ahead")
    signal.signal(signal.SIGTERM, _terminate)
    stop = threading.Event()
    cluster = Cluster()
    results: list[Result] = []
    try:
        admin = cluster.start()
        info = header(cluster, args)
        for spec in plan(args, variants):
            results.append(one_run(cluster.dsn, admin, args, spec, stop))
            r = results[-1]
            print(f"  {r.variant} {r.size // 1024}K c={r.concurrency} round {r.round}: "
                  f"{r.tx_s:.0f} tx/s {r.rows}", file=sys.stderr, flush=True)
        admin.close()
        info["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(f"# load_after: {info['load_after']}")
        print_table(results)
        print_means(results)
        if args.json:
            print(json.dumps({"info": info, "results": [asdict(r) for r in results]}, indent=1))
    except KeyboardInterrupt:
        stop.set()
        print("interrupted; removing the cluster", file=sys.stderr)
        return 130
    finally:
        stop.set()
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
