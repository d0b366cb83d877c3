#!/usr/bin/env python3
"""Is the database driver the wall? psycopg2 / txpostgres / psycopg 3 side by side (issue 12).

Why: profiles of a delivery show psycopg2 quoting the ~60 parameters of each message
INSERT client-side (8-10% of server CPU) and txpostgres adding an epoll add/remove per
query and a ``callLater(0)`` per result. Before proposing a change of driver, this
measures what each client costs for THE SAME statements the product sends:

1. starts a throw-away PostgreSQL cluster (fsync on, synchronous_commit on, as in
   production), creates and migrates a database, and seeds the minimum rows the
   ``messages`` foreign keys need (organization, environment, inbox, thread, folder,
   blob);
2. builds a realistic 4 KiB message row the way core.ingest does (the message parsed
   and rendered by ``ingest._analyse_indexed``, the row by ``ingest._message_row``) and
   the SQL with the product's own builders (``storage.message_insert``): one
   transaction per message (``insert_message``) or eight per transaction
   (``insert_messages``: the group-commit batch, one statement string);
3. inserts ``--rows`` messages per run with each client, each in a fresh child process
   (one Twisted reactor per process; the child's CPU is the client's alone):

   * ``psycopg2``: synchronous psycopg2, client-side quoting, BEGIN sent with the first
     statement and COMMIT on its own, exactly as ``storage.database.Txn`` does it, but
     without Twisted;
   * ``txpostgres``: the product's ``storage.database.Database`` on a Twisted reactor,
     calling ``insert_message`` / ``insert_messages`` through ``run_interaction``;
   * ``psycopg3``: psycopg 3 (sync API), server-side parameters, prepared statements
     and pipeline mode: BEGIN, the INSERT(s) and COMMIT of one transaction in one
     round trip (each transaction still waits for its COMMIT, as a delivery must).

   Optional (``--variants``), to split the gains: ``psycopg2-prepared`` (the statement
   PREPAREd once, sent as EXECUTE, still client-quoted), ``psycopg3-nopipe``,
   ``psycopg3-noprep`` and ``psycopg3-cached`` (psycopg's query-conversion cache allowed
   for the 68-parameter statement).

   SQL building is done before the clock starts: the figures are the driver's.
4. prints rows/s, client CPU ms per row and the PostgreSQL backend's CPU ms per row
   (utime+stime of ``/proc/<pg_backend_pid()>/stat``), each variant run ``--repeat``
   times alternating, with the ``uptime`` load.

Usage: ``.venv/bin/python bench/driver_compare.py [--rows 3000] [--repeat 2] [--json]``
psycopg 3 is a benchmark-only dependency: ``.venv/bin/pip install "psycopg[binary]"``
(not in pyproject). Loopback only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import psycopg2  # noqa: E402

from agentpost.dev.embedded_pg import EmbeddedPostgres  # noqa: E402
from agentpost.storage.migrations import migrate  # noqa: E402

DBNAME = "driverbench"
VARIANTS = ("psycopg2", "txpostgres", "psycopg3", "psycopg3-noprep", "psycopg3-nopipe",
            "psycopg2-prepared", "psycopg3-cached")
DEFAULT_VARIANTS = ("psycopg2", "txpostgres", "psycopg3")
BATCHES = (1, 8)
TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")
IDS = {"org": "org_01JBENCH000000000000000000", "env": "env_01JBENCH000000000000000000",
       "inbox": "inb_01JBENCH000000000000000000", "thread": "thr_01JBENCH000000000000000000",
       "blob": "bench-raw-blob"}


def load() -> str:
    """The ``uptime`` load averages (the machine is shared: read every figure with it)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def backend_cpu_ms(pid: int) -> float:
    """utime + stime of one PostgreSQL backend, in milliseconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_MS


def fetch_one(cur: Any) -> Any:
    """The one row a statement returns (psycopg2 types it as optional)."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("no row")
    return row


def seed(dsn: str) -> int:
    """The rows a message's foreign keys need; returns the folder id."""
    now = datetime.now(UTC)
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO organizations (id, name, created_at, updated_at) "
                    "VALUES (%s, 'bench', %s, %s)", [IDS["org"], now, now])
        cur.execute("INSERT INTO environments (org_id, id, name, slug, created_at, updated_at) "
                    "VALUES (%s, %s, 'prod', 'prod', %s, %s)", [IDS["org"], IDS["env"], now, now])
        cur.execute("INSERT INTO inboxes (org_id, id, environment_id, username, domain, email, "
                    "created_at, updated_at) VALUES (%s, %s, %s, 'bench', 'bench.test', "
                    "'bench@bench.test', %s, %s)", [IDS["org"], IDS["inbox"], IDS["env"], now, now])
        cur.execute("INSERT INTO threads (org_id, id, environment_id, inbox_id, last_message_at, "
                    "created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    [IDS["org"], IDS["thread"], IDS["env"], IDS["inbox"], now, now, now])
        cur.execute("INSERT INTO folders (org_id, environment_id, inbox_id, name, special_use, "
                    "uidvalidity, created_at) VALUES (%s, %s, %s, 'INBOX', '\\Inbox', 1, %s) "
                    "RETURNING id", [IDS["org"], IDS["env"], IDS["inbox"], now])
        folder_id = int(fetch_one(cur)[0])
        cur.execute("INSERT INTO blobs (key, size, refcount, created_at) VALUES (%s, 4096, 1, %s)",
                    [IDS["blob"], now])
    conn.close()
    return folder_id


# -- the child: one variant, one batch size ------------------------------------------------


def message_rows(n: int, folder_id: int, size: int) -> list[dict[str, Any]]:
    """``n`` rows as core.ingest builds them for a ``size``-byte text message."""
    from smtp_bench import MessageFactory

    from agentpost.core import ingest
    from agentpost.model.ids import new_id
    from agentpost.storage.blobs.base import BlobRef

    factory = MessageFactory(size, kind="text", seed=7)
    raw = factory.head(1, 1, "bench@bench.test") + factory.body
    parsed, imap, index = ingest._analyse_indexed(raw)
    state = ingest._State(flags=frozenset(), labels=(), imap=imap, require_folder=False,
                          index=index)
    target = ingest.Target(IDS["org"], IDS["env"], IDS["inbox"], "bench@bench.test")
    ref = BlobRef(IDS["blob"], len(raw), "0" * 64)
    now = datetime.now(UTC)
    template = ingest._message_row(target, parsed, state, "", IDS["thread"], folder_id,
                                   "inbound", ref, False, "sender@example.test", now, now)
    return [{**template, "id": new_id("msg")} for _ in range(n)]


class Captured:
    """A stand-in Txn recording what the product's insert functions send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any]]] = []
        self.memo: dict[str, Any] = {}
        self.now = datetime.now(UTC)

    async def fetchone(self, sql: str, params: Any = None) -> Any:
        self.sent.append((sql, params))
        return {"charged": 1, "uid": 1, "modseq": 1}

    async def fetchall(self, sql: str, params: Any = None) -> list[Any]:
        self.sent.append((sql, params))
        return []

    async def execute(self, sql: str, params: Any = None) -> int:
        self.sent.append((sql, params))
        return 1


def _drive(coro: Any) -> None:
    try:
        coro.send(None)
    except StopIteration:
        return
    raise RuntimeError("the SQL builder awaited something real")


def product_sql(batch: list[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """The statement(s) the product sends for one transaction of ``batch``."""
    from agentpost.storage import message_insert

    txn = Captured()
    if len(batch) == 1:
        _drive(message_insert.insert_message(txn, batch[0]))  # type: ignore[arg-type]
    else:
        _drive(message_insert.insert_messages(txn, [(r, [], ("", [])) for r in batch]))  # type: ignore[arg-type]
    return txn.sent


def split_sql(batch: list[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """The same statements one by one (extended protocol takes one per message):
    exactly what ``insert_messages`` joins with ``; ``."""
    from agentpost.storage import message_insert

    if len(batch) == 1:
        return [message_insert._insert_message_sql(batch[0], 0, [])]
    out = [message_insert._insert_message_sql(r, 0, []) for r in batch]
    out.append(("SELECT id, uid FROM messages WHERE org_id = ANY(%s) AND id = ANY(%s)",
                [[IDS["org"]], [r["id"] for r in batch]]))
    return out


def run_psycopg2(dsn: str, txns: list[list[dict[str, Any]]]) -> tuple[int, float]:
    """Synchronous psycopg2 as storage.database.Txn drives it: BEGIN + first statement in
    one simple-query message, COMMIT in another."""
    work = [product_sql(b) for b in txns]
    conn = psycopg2.connect(dsn)
    conn.autocommit = True  # txpostgres's async connections are autocommit too
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")
    pid = fetch_one(cur)[0]
    start = (time.perf_counter(), time.process_time(), backend_cpu_ms(pid))
    for statements in work:
        begin = "BEGIN ISOLATION LEVEL READ COMMITTED; "
        for sql, params in statements:
            cur.execute(begin + sql, params)
            cur.fetchall()
            begin = ""
        cur.execute("COMMIT")
    return _figures(start, pid, conn.close)


def _prepare_sql(cur: Any, sql: str, params: list[Any]) -> str:
    """``PREPARE`` for the product's message statement with psycopg2: parameter types
    spelled out (the INSERT ... SELECT gives the server no context to infer them): the
    charge CTE's, the folder's, the row's columns' (from the catalog), then the refs
    and the notification's."""
    from agentpost.storage import usage

    cur.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = 'messages'::regclass AND attnum > 0")
    types = dict(cur.fetchall())
    cols = sql.split("INSERT INTO messages (", 1)[1].split(")", 1)[0].split(", ")[:-2]
    charge = ["text", "text", "bigint", "timestamptz", "text", "text", "bigint", "bigint",
              "bigint"]
    order = [*charge, "text", "bigint", *(types[c] for c in cols), "text", "text", "text[]",
             "text", "text"]
    if len(order) != len(params) or usage.charge_cte_sql().count("%s") != len(charge):
        raise RuntimeError("the message statement changed shape; update _prepare_sql")
    numbered = sql
    for i in range(1, len(order) + 1):
        numbered = numbered.replace("%s", f"${i}", 1)
    return f"PREPARE ins ({', '.join(order)}) AS {numbered}"


def run_psycopg2_prepared(dsn: str, txns: list[list[dict[str, Any]]]) -> tuple[float, float, float]:
    """psycopg2 with the message statement PREPAREd once per connection and sent as
    ``EXECUTE ins (...)``: client-side quoting kept, the server's parse/plan saved (what
    a driver change would buy on the server, without one). Otherwise as run_psycopg2."""
    work = [split_sql(b) for b in txns]
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")
    pid = fetch_one(cur)[0]
    cur.execute(_prepare_sql(cur, *work[0][0]))
    start = (time.perf_counter(), time.process_time(), backend_cpu_ms(pid))
    for statements in work:
        parts, params = ["BEGIN ISOLATION LEVEL READ COMMITTED"], []
        for sql, one in statements:
            if sql.startswith("WITH q AS"):
                parts.append(f"EXECUTE ins ({', '.join(['%s'] * len(one))})")
            else:
                parts.append(sql)
            params += one
        cur.execute("; ".join(parts), params)
        cur.fetchall()
        cur.execute("COMMIT")
    return _figures(start, pid, conn.close)


def _figures(start: tuple[float, float, float], pid: int, close: Any) -> Any:
    wall = time.perf_counter() - start[0]
    client = (time.process_time() - start[1]) * 1000
    server = backend_cpu_ms(pid) - start[2]
    close()
    return wall, client, server


def _jsonb(params: list[Any]) -> list[Any]:
    from psycopg.types.json import Jsonb
    from psycopg2.extras import Json

    return [Jsonb(p.adapted) if isinstance(p, Json) else p for p in params]


def run_psycopg3(dsn: str, txns: list[list[dict[str, Any]]], *, prepare: bool = True,
                 pipeline: bool = True, cached: bool = False) -> tuple[float, float, float]:
    """psycopg 3: server-side parameters, prepared, pipeline (one round trip per
    transaction, BEGIN to COMMIT), binary results. ``prepare``/``pipeline`` off split
    the gain between the two. ``cached``: psycopg caches its %s-to-$n conversion only
    for statements of <= 50 parameters (``_queries.MAX_CACHED_STATEMENT_PARAMS``, a
    private knob); the message statement has ~68, so it is re-split on every execute
    (the top of psycopg 3's client profile). This raises the limit."""
    import contextlib

    import psycopg
    from psycopg import _queries

    if cached:
        _queries.MAX_CACHED_STATEMENT_PARAMS = 1000

    work = [[(sql, _jsonb(params)) for sql, params in split_sql(b)] for b in txns]
    conn = psycopg.connect(dsn, autocommit=True)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    cur = conn.cursor(binary=True)
    start = (time.perf_counter(), time.process_time(), backend_cpu_ms(pid))
    for statements in work:
        with conn.pipeline() if pipeline else contextlib.nullcontext():
            cur.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            for sql, params in statements:
                cur.execute(sql, params, prepare=prepare)
            cur.execute("COMMIT")
    return _figures(start, pid, conn.close)


def run_txpostgres(dsn: str, txns: list[list[dict[str, Any]]]) -> tuple[float, float, float]:
    """The product's own path: storage.database.Database (txpostgres) on a reactor."""
    from twisted.internet import defer, reactor, task

    from agentpost.storage import message_insert
    from agentpost.storage.database import Database

    result: list[Any] = []

    async def insert(txn: Any, batch: list[dict[str, Any]]) -> None:
        if len(batch) == 1:
            await message_insert.insert_message(txn, batch[0])
        else:
            await message_insert.insert_messages(txn, [(r, [], ("", [])) for r in batch])

    async def pid_of(txn: Any) -> int:
        return int(await txn.fetchval("SELECT pg_backend_pid()"))

    async def main() -> None:
        db = Database(dsn, clock=reactor, reactor=reactor, pool_size=1)
        pid = await db.run_interaction("pid", pid_of)
        start = (time.perf_counter(), time.process_time(), backend_cpu_ms(pid))
        for batch in txns:
            await db.run_interaction("insert", insert, batch)
        wall = time.perf_counter() - start[0]
        client = (time.process_time() - start[1]) * 1000
        server = backend_cpu_ms(pid) - start[2]
        await db.close()
        result.append((wall, client, server))

    def run(_reactor: Any) -> Any:
        return defer.ensureDeferred(main())

    try:
        task.react(run, [])
    except SystemExit as exc:
        if exc.code:
            raise
    return result[0]


def child(args: argparse.Namespace) -> int:
    rows = message_rows(args.rows, args.folder_id, args.size)
    txns = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
    runner: Any = {"psycopg2": run_psycopg2, "txpostgres": run_txpostgres,
              "psycopg3": run_psycopg3, "psycopg2-prepared": run_psycopg2_prepared,
              "psycopg3-noprep": functools.partial(run_psycopg3, prepare=False),
              "psycopg3-nopipe": functools.partial(run_psycopg3, pipeline=False),
              "psycopg3-cached": functools.partial(run_psycopg3, cached=True)}[args.variant]
    before = load()
    wall, client, server = runner(args.dsn, txns)
    print(json.dumps({"variant": args.variant, "batch": args.batch, "rows": len(rows),
                      "rows_s": len(rows) / wall, "client_ms": client / len(rows),
                      "backend_ms": server / len(rows), "load": before}))
    return 0


# -- the parent ----------------------------------------------------------------------------


def one_run(args: argparse.Namespace, dsn: str, folder_id: int, variant: str,
            batch: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", variant, "--dsn", dsn, "--folder-id",
           str(folder_id), "--batch", str(batch), "--rows", str(args.rows),
           "--size", str(args.size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'client':<17} {'batch':>5} {'rows/s':>8} {'client ms/row':>14} "
          f"{'backend ms/row':>15} {'sum ms/row':>11}  load (1/5/15 min)")
    for r in results:
        print(f"{r['variant']:<17} {r['batch']:>5} {r['rows_s']:>8.0f} {r['client_ms']:>14.3f} "
              f"{r['backend_ms']:>15.3f} {r['client_ms'] + r['backend_ms']:>11.3f}  {r['load']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=3000, help="messages per run (default 3000)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each variant, alternating")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--batches", default="1,8", help="rows per transaction (default 1,8)")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.add_argument("--child", choices=VARIANTS, dest="variant", help=argparse.SUPPRESS)
    p.add_argument("--dsn", help=argparse.SUPPRESS)
    p.add_argument("--folder-id", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        return child(args)
    variants = [v for v in args.variants.split(",") if v]
    batches = [int(b) for b in args.batches.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="driverbench-"))
    cluster = EmbeddedPostgres(tmp / "var", fsync=True, name="driverbench")
    cluster.start()
    results: list[dict[str, Any]] = []
    try:
        admin = psycopg2.connect(cluster.dsn("postgres"))
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {DBNAME}")
            cur.execute("SELECT version(), current_setting('fsync'), "
                        "current_setting('synchronous_commit')")
            version, fsync, sync = fetch_one(cur)
        admin.close()
        print(f"# {version.split(',')[0]}; fsync={fsync} synchronous_commit={sync}; "
              f"{args.rows} rows of {args.size} B per run; load {load()}", flush=True)
        dsn = cluster.dsn(DBNAME)
        migrate(dsn)
        folder_id = seed(dsn)
        for _ in range(args.repeat):
            for batch in batches:
                for variant in variants:
                    r = one_run(args, dsn, folder_id, variant, batch)
                    results.append(r)
                    print(f"  {variant:<17} batch {batch}: {r['rows_s']:.0f} rows/s, "
                          f"client {r['client_ms']:.3f} ms/row, "
                          f"backend {r['backend_ms']:.3f} ms/row, load {r['load']}",
                          flush=True)
        check = psycopg2.connect(dsn)
        with check.cursor() as cur:
            cur.execute("SELECT count(*), count(DISTINCT uid) FROM messages")
            stored, uids = fetch_one(cur)
        check.close()
        if stored != uids or stored != args.rows * len(results):
            raise SystemExit(f"expected {args.rows * len(results)} rows with distinct UIDs, "
                             f"found {stored} ({uids} UIDs)")
        print(f"# check: {stored} message rows stored, all with distinct UIDs")
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results.sort(key=lambda r: (r["batch"], VARIANTS.index(r["variant"])))
    print()
    print_table(results)
    print(f"# load at the end: {load()}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
