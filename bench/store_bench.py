#!/usr/bin/env python3
"""Read latency of the mail API with 100,000 messages in ONE inbox, fsync on.

What it does, start to finish:

1. creates a throw-away PostgreSQL cluster and an ``agentpost serve`` process exactly
   as ``bench/smtp_bench.py`` does (temp folder, local blob store, MX and HTTP on free
   loopback ports, rate limiter off), and one inbox;
2. delivers a few hundred real messages to it over SMTP (threads of three: a root and
   two replies with In-Reply-To/References), so that every row, blob and thread was
   written by the server's own ingest path;
3. bulk-duplicates those rows in SQL until the inbox holds ``--messages`` (100,000)
   messages, as *older* mail: new ULID-ordered ids, unique UIDs, new threads of
   three, blob reference counts bumped (see ``seed_sql`` and bench/README.md), then
   runs ``VACUUM (ANALYZE)``;
4. checks the answers once (first page = the 20 newest ids, a deep page = the 20 ids
   below its cursor, one message, threads), then prints ``EXPLAIN (ANALYZE, BUFFERS)``
   for the list and get queries (the exact SQL the server sends, captured from
   ``agentpost.storage.mail``) and whether they are index scans;
5. measures p50/p90/p99 of ``GET /api/v1/inboxes/{id}/messages`` (first page and deep
   pages via ``page_token``), ``GET /api/v1/messages/{id}`` (random ids) and
   ``GET /api/v1/inboxes/{id}/threads``, each at 1 client by default;
6. stops the server and deletes the cluster and the temp folder, also on Ctrl-C.

Timing never makes it fail: the exit status is 0 unless setup or a check failed (1) or
some request got an unexpected answer (1). Ctrl-C or SIGTERM gives 130.

Usage: ``.venv/bin/python bench/store_bench.py [--messages 100000] [--json]``
(see ``--help``). Network traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import random
import re
import ssl
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # so that the sibling modules import
    sys.path.insert(0, str(HERE))

import psycopg2  # noqa: E402
from api_bench import (  # noqa: E402
    Scenario,
    SetupError,
    build_get,
    fmt,
    log,
    machine_info,
    machine_line,
    one_request,
    percentile,
    run_scenario,
    stop_on_signals,
    stop_server,
)
from smtp_bench import SENDER_DOMAIN, Harness, SMTPSession, text_lines  # noqa: E402

from agentpost.dev.embedded_pg import EmbeddedPostgresError  # noqa: E402
from agentpost.storage import mail as mail_store  # noqa: E402
from agentpost.storage.migrations import MigrationError  # noqa: E402

THREAD_SIZE = 3
#: Spacing of the duplicated (older) messages' received_at: 100k x 30 s is about 35 days.
DUP_STEP_MS = 30_000
DUP_MSGID_DOMAIN = "dup.bench.example"
OTHER_INBOX_MESSAGES = 6


# --------------------------------------------------------------------------- SMTP seed


def seed_message(i: int, rcpt: str, run: str, rng: random.Random) -> tuple[bytes, bytes]:
    """Head and body of seed message ``i``: threads of three (a root and two replies)."""
    root = i - i % THREAD_SIZE
    msgid = f"<seed-{run}-{i:05d}@{SENDER_DOMAIN}>"
    lines = [f"From: Seed Sender {i % 7} <sender{i % 7}@{SENDER_DOMAIN}>",
             f"To: <{rcpt}>",
             f"Subject: {'Re: ' if i != root else ''}seed thread {root // THREAD_SIZE:05d}",
             f"Date: {datetime.now(UTC).strftime('%a, %d %b %Y %H:%M:%S +0000')}",
             f"Message-ID: {msgid}"]
    if i != root:
        parent = f"<seed-{run}-{root:05d}@{SENDER_DOMAIN}>"
        lines += [f"In-Reply-To: {parent}", f"References: {parent}"]
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=us-ascii",
              "Content-Transfer-Encoding: 7bit"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head, text_lines(rng.randint(1024, 6 * 1024), rng)


async def smtp_seed(h: Harness, rcpt: str, count: int, sessions: int = 4) -> int:
    """Deliver ``count`` messages; each thread goes through one session, in order."""
    SMTPSession.use_pipelining = False  # one reply per round trip: no delayed-ACK stall
    run = f"{random.getrandbits(32):08x}"
    accepted = 0

    async def one_session(sid: int) -> None:
        nonlocal accepted
        rng = random.Random(sid)
        session = await SMTPSession.open(h.mx_port)
        try:
            for i in range(count):
                if (i // THREAD_SIZE) % sessions != sid:
                    continue
                head, body = seed_message(i, rcpt, run, rng)
                async with asyncio.timeout(60):
                    error = await session.send(f"seed@{SENDER_DOMAIN}", rcpt, head, body,
                                               len(head) + len(body))
                if error is not None:
                    raise SetupError(f"seed message {i} refused: {error}")
                accepted += 1
        finally:
            await session.quit()

    await asyncio.gather(*(one_session(s) for s in range(sessions)))
    return accepted


# --------------------------------------------------------------------------- SQL seed

B32_FUNCTION = """
CREATE FUNCTION pg_temp.b32(v bigint, width int) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT string_agg(substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ',
                             ((v >> (5 * (width - 1 - i))) & 31)::int + 1, 1), '' ORDER BY i)
    FROM generate_series(0, width - 1) AS i
$$
"""


def seed_sql(cur: Any, org_id: str, inbox_id: str, total: int) -> dict[str, Any]:
    """Duplicate the inbox's messages in SQL until it holds ``total`` rows.

    Runs inside the caller's transaction. What it does (also in bench/README.md):

    - sources: the inbox's existing messages without attachments, in id order; the
      duplicate ``n`` (1..D) copies source ``(n - 1) mod S``, every column included,
      except the ones below;
    - ``received_at``/``created_at``: older than every real message, ``DUP_STEP_MS``
      apart (duplicate D is the newest of them); ``sent_at`` 2 s before that;
    - ``id``: ``msg_`` + 10 Crockford base32 characters of ``received_at`` in Unix
      milliseconds (as a ULID) + ``000`` + 13 characters of ``n``: 26 characters, unique,
      and sorting like ``received_at``, as the real ULIDs do;
    - threads: duplicates ``3g+1..3g+3`` form a new thread (id built the same way from
      ``g``), with the first one's subject, ``message_count``, ``last_message_at`` and
      participants computed from its members; the second and third reply to the first
      (``In-Reply-To``/``References``); every duplicate has its own ``Message-ID``;
    - ``uid = uidnext + n - 1`` and ``modseq = highestmodseq + n`` in the source's folder
      (INBOX), then ``folders.uidnext``/``highestmodseq`` move past them, so
      ``UNIQUE (folder_id, uid)`` holds and IMAP sees consistent counters;
    - ``raw_blob_key`` stays the source's, and ``blobs.refcount`` grows by the number of
      duplicates per blob; no event rows are written (the outbox is not read here).
    """
    cur.execute(B32_FUNCTION)
    cur.execute("SELECT count(*), min(received_at) FROM messages "
                "WHERE org_id = %s AND inbox_id = %s", (org_id, inbox_id))
    existing, oldest = cur.fetchone()
    dups = total - existing
    if dups <= 0:
        return {"existing": existing, "duplicated": 0}
    cur.execute("CREATE TEMP TABLE bench_src ON COMMIT DROP AS "
                "SELECT (row_number() OVER (ORDER BY id) - 1)::bigint AS k, id, folder_id "
                "FROM messages WHERE org_id = %s AND inbox_id = %s AND NOT has_attachments",
                (org_id, inbox_id))
    cur.execute("SELECT count(*), count(DISTINCT folder_id), min(folder_id) FROM bench_src")
    sources, folders, folder_id = cur.fetchone()
    if sources == 0 or folders != 1:
        raise SetupError(f"need seed messages in one folder (got {sources} in {folders})")
    cur.execute("SELECT uidnext, highestmodseq FROM folders WHERE id = %s FOR UPDATE",
                (folder_id,))
    uidnext, modseq = cur.fetchone()
    # The newest duplicate is one step older than the oldest real message.
    base_ms = int(oldest.timestamp() * 1000) - DUP_STEP_MS * (dups + 1)
    cur.execute(
        """
        CREATE TEMP TABLE bench_dup ON COMMIT DROP AS
        SELECT n, src.id AS src_id, recv_at, first_n,
               'msg_' || pg_temp.b32((extract(epoch FROM recv_at) * 1000)::bigint, 10)
                      || '000' || pg_temp.b32(n, 13) AS id,
               'thr_' || pg_temp.b32(%(base)s + %(step)s * first_n, 10)
                      || '000' || pg_temp.b32((n - 1) / %(tsize)s, 13) AS thread_id,
               '<dup-' || n || '@' || %(domain)s || '>' AS msgid,
               '<dup-' || first_n || '@' || %(domain)s || '>' AS parent_msgid
        FROM (SELECT n, ((n - 1) / %(tsize)s) * %(tsize)s + 1 AS first_n,
                     to_timestamp((%(base)s + %(step)s * n) / 1000.0) AS recv_at
              FROM generate_series(1::bigint, %(dups)s::bigint) AS n) g
        JOIN bench_src src ON src.k = (g.n - 1) %% %(sources)s
        """,
        {"base": base_ms, "step": DUP_STEP_MS, "tsize": THREAD_SIZE, "dups": dups,
         "sources": sources, "domain": DUP_MSGID_DOMAIN})
    cur.execute("CREATE UNIQUE INDEX ON bench_dup (n)")
    cur.execute("ANALYZE bench_dup")
    cur.execute(
        """
        INSERT INTO threads (org_id, id, environment_id, inbox_id, subject, message_count,
                             last_message_at, participants, labels, created_at, updated_at)
        SELECT s.org_id, t.thread_id, s.environment_id, s.inbox_id, s.subject, t.cnt,
               t.last_at,
               COALESCE((SELECT jsonb_agg(DISTINCT a) FROM (
                   SELECT lower(s.from_address->>'email') AS a
                   UNION SELECT lower(x->>'email')
                   FROM jsonb_array_elements(s.to_addresses || s.cc_addresses) x) p
                   WHERE a IS NOT NULL), '[]'::jsonb),
               '{}', t.first_at, t.last_at
        FROM (SELECT thread_id, count(*) AS cnt, min(recv_at) AS first_at, max(recv_at) AS last_at,
                     (array_agg(src_id ORDER BY n))[1] AS first_src
              FROM bench_dup GROUP BY thread_id) t
        JOIN messages s ON s.id = t.first_src
        """)
    threads = cur.rowcount
    cur.execute("SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'messages' "
                "ORDER BY ordinal_position")
    columns = [r[0] for r in cur.fetchall()]
    override = {
        "id": "d.id", "thread_id": "d.thread_id", "uid": f"{int(uidnext)} + d.n - 1",
        "modseq": f"{int(modseq)} + d.n", "message_id_header": "d.msgid",
        "in_reply_to": "CASE WHEN d.n = d.first_n THEN NULL ELSE d.parent_msgid END",
        "reference_ids": "CASE WHEN d.n = d.first_n THEN '{}'::text[] "
                         "ELSE ARRAY[d.parent_msgid] END",
        "received_at": "d.recv_at", "created_at": "d.recv_at",
        "sent_at": "d.recv_at - interval '2 seconds'",
    }
    select = ", ".join(override.get(c, f"s.{c}") for c in columns)
    cur.execute(f"INSERT INTO messages ({', '.join(columns)}) SELECT {select} "
                "FROM bench_dup d JOIN messages s ON s.id = d.src_id")
    inserted = cur.rowcount
    cur.execute("UPDATE folders SET uidnext = uidnext + %s, highestmodseq = highestmodseq + %s "
                "WHERE id = %s", (dups, dups, folder_id))
    cur.execute("UPDATE blobs b SET refcount = b.refcount + x.c FROM ("
                "SELECT s.raw_blob_key AS key, count(*) AS c FROM bench_dup d "
                "JOIN messages s ON s.id = d.src_id GROUP BY s.raw_blob_key) x "
                "WHERE b.key = x.key")
    blobs = cur.rowcount
    return {"existing": existing, "sources": sources, "duplicated": inserted,
            "threads_created": threads, "blobs_updated": blobs,
            "uid_range": [int(uidnext), int(uidnext) + dups - 1]}


def check_seed(cur: Any, org_id: str, inbox_id: str) -> dict[str, Any]:
    """Consistency of the seeded data (each check must be true)."""
    checks = {
        "duplicate ids sort like received_at, below the real ones": """
            SELECT count(*) FILTER (WHERE bad) = 0
                   AND max(id) FILTER (WHERE dup) < min(id) FILTER (WHERE NOT dup)
            FROM (SELECT id, dup, dup AND received_at < lag(received_at) OVER (ORDER BY id) AS bad
                  FROM (SELECT id, received_at, message_id_header LIKE '<dup-%%' AS dup
                        FROM messages WHERE org_id = %(o)s AND inbox_id = %(i)s) m) x""",
        "ids are msg_ + 26 Crockford characters": """
            SELECT bool_and(id ~ '^msg_[0-9A-HJKMNP-TV-Z]{26}$') FROM messages
            WHERE org_id = %(o)s AND inbox_id = %(i)s""",
        "uids unique and below uidnext": """
            SELECT count(DISTINCT (m.folder_id, m.uid)) = count(*) AND max(m.uid) < max(f.uidnext)
            FROM messages m JOIN folders f ON f.id = m.folder_id
            WHERE m.org_id = %(o)s AND m.inbox_id = %(i)s""",
        "blob refcounts = referencing rows": """
            SELECT bool_and(b.refcount = (SELECT count(*) FROM messages m
                                          WHERE m.raw_blob_key = b.key)
                            + (SELECT count(*) FROM attachments a WHERE a.blob_key = b.key))
            FROM blobs b""",
        "thread message_count = members": """
            SELECT bool_and(t.message_count = (SELECT count(*) FROM messages m
                                               WHERE m.org_id = t.org_id
                                               AND m.thread_id = t.id))
            FROM threads t WHERE t.org_id = %(o)s AND t.inbox_id = %(i)s""",
    }
    out = {}
    for name, sql in checks.items():
        cur.execute(sql, {"o": org_id, "i": inbox_id})
        out[name] = bool(cur.fetchone()[0])
    return out


# --------------------------------------------------------------------------- EXPLAIN


class _Recorder:
    """A stand-in for ``storage.database.Txn`` that records the SQL instead of running it."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)
        self.calls: list[tuple[str, Any]] = []

    async def _record(self, sql: str, params: Any = None) -> None:
        self.calls.append((sql, params))

    async def execute(self, sql: str, params: Any = None) -> int:
        await self._record(sql, params)
        return 0

    async def fetchall(self, sql: str, params: Any = None) -> list[Any]:
        await self._record(sql, params)
        return []

    async def fetchone(self, sql: str, params: Any = None) -> Any:
        await self._record(sql, params)
        return None

    async def fetchval(self, sql: str, params: Any = None) -> Any:
        await self._record(sql, params)
        return None


def captured_sql(fn: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """The (sql, params) a storage function sends, without a database."""
    rec = _Recorder()
    coro = fn(rec, *args, **kwargs)
    try:
        coro.send(None)
    except StopIteration:
        pass
    else:
        coro.close()
        raise SetupError(f"{fn.__name__} waited on something other than the database")
    if len(rec.calls) != 1:
        raise SetupError(f"{fn.__name__} sent {len(rec.calls)} statements, expected 1")
    return rec.calls[0]


_NODE_RE = re.compile(r"(Index Only Scan|Index Scan|Bitmap Index Scan|Bitmap Heap Scan|Seq Scan|"
                      r"Sort|Incremental Sort)(?: Backward)?(?: using (\S+))?(?: on (\S+))?")


def explain(cur: Any, name: str, sql: str, params: Any) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) twice (the second, warm run is kept) and a verdict."""
    for _ in range(2):
        cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
        plan = [r[0] for r in cur.fetchall()]
    nodes = []
    for line in plan:
        match = _NODE_RE.search(line)
        if match:
            nodes.append(" ".join(x for x in (match.group(1),
                                              f"using {match.group(2)}" if match.group(2) else "",
                                              f"on {match.group(3)}" if match.group(3) else "")
                                  if x))
    execution = next((line.split(":", 1)[1].strip() for line in plan
                      if line.startswith("Execution Time")), None)
    removed = sum(int(m.group(1)) for line in plan
                  if (m := re.search(r"Rows Removed by Filter: (\d+)", line)))
    top = next((line for line in plan if "Buffers:" in line), "")  # the top node's
    hit = re.search(r"shared hit=(\d+)", top)
    read = re.search(r"read=(\d+)", top)
    seq = [n for n in nodes if n.startswith("Seq Scan")]
    sort = [n for n in nodes if "Sort" in n]
    index = [n for n in nodes if "Index" in n]
    return {"name": name, "index_backed": bool(index) and not seq and not sort,
            "scan_nodes": nodes, "execution_time": execution, "rows_removed_by_filter": removed,
            "buffers_hit": int(hit.group(1)) if hit else 0,
            "buffers_read": int(read.group(1)) if read else 0, "plan": plan,
            "sql": cur.mogrify(sql, params).decode(errors="replace")}


# --------------------------------------------------------------------------- bench


def page_token(last_id: str) -> str:
    """What the server hands out as next_page_token after ``last_id`` (core.pages)."""
    return base64.urlsafe_b64encode(f"c1:{last_id}".encode()).decode().rstrip("=")


class StoreBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.h = Harness("agentpost-storebench-", "storebench")
        self.h.keep_log = args.server_log
        self.inbox: dict[str, Any] = {}
        self.other: dict[str, Any] = {}
        self.org_id = ""
        self.env_ids: frozenset[str] | None = None
        self.ids: list[str] = []
        self.deep_cursors: list[str] = []

    def setup(self) -> dict[str, Any]:
        args = self.args
        pg_version = self.h.start_postgres(not args.no_fsync)
        self.h.start_server(pool_size=args.pool_size, log_level=args.log_level,
                            starttls=False)
        return {"fsync": not args.no_fsync, "postgres_version": pg_version,
                "messages_target": args.messages, "smtp_seed": args.smtp_seed,
                "duration_s": args.duration, "warmup_s": args.warmup,
                "concurrency": args.concurrency}

    # seeding ---------------------------------------------------------------------
    async def seed(self) -> dict[str, Any]:
        args, h = self.args, self.h
        self.inbox = await h.create_inbox("store-bench")
        log(f"delivering {args.smtp_seed} messages over SMTP to {self.inbox['email']}")
        t0 = time.perf_counter()
        accepted = await smtp_seed(h, self.inbox["email"], args.smtp_seed)
        smtp_s = time.perf_counter() - t0
        # A second, small inbox of the same organization: its list must not walk the
        # big one's rows (checked with EXPLAIN below).
        self.other = await h.create_inbox("store-bench-other")
        accepted_other = await smtp_seed(h, self.other["email"], OTHER_INBOX_MESSAGES)
        with h.db.cursor() as cur:
            cur.execute("SELECT org_id FROM inboxes WHERE id = %s", (self.inbox["id"],))
            self.org_id = cur.fetchone()[0]
            # The key's environment restriction, as auth.cred turns it into a Principal
            # (bootstrap's owner key is unrestricted: no environment clause in the SQL).
            cur.execute("SELECT k.env_restricted, array_remove(array_agg(e.environment_id), "
                        "NULL) FROM api_keys k LEFT JOIN api_key_environments e "
                        "ON e.org_id = k.org_id AND e.api_key_id = k.id "
                        "WHERE k.org_id = %s AND k.revoked_at IS NULL "
                        "GROUP BY k.id, k.env_restricted, k.created_at "
                        "ORDER BY k.created_at LIMIT 1", (self.org_id,))
            row = cur.fetchone()
            self.env_ids = frozenset(row[1]) if row and row[0] else None
        rows = h.count()
        if rows != accepted + accepted_other:
            raise SetupError(f"SMTP seed: {accepted + accepted_other} accepted but {rows} rows")
        log(f"duplicating rows in SQL up to {args.messages:,} messages")
        t0 = time.perf_counter()
        h.db.autocommit = False
        try:
            with h.db.cursor() as cur:
                info = seed_sql(cur, self.org_id, self.inbox["id"], args.messages)
            h.db.commit()
        except BaseException:
            h.db.rollback()
            raise
        finally:
            h.db.autocommit = True
        sql_s = time.perf_counter() - t0
        log(f"  {info.get('duplicated', 0):,} rows in {sql_s:.1f} s; VACUUM (ANALYZE)")
        t0 = time.perf_counter()
        with h.db.cursor() as cur:
            cur.execute("VACUUM (ANALYZE) messages")
            cur.execute("VACUUM (ANALYZE) threads")
            cur.execute("VACUUM (ANALYZE) blobs")
            cur.execute("VACUUM (ANALYZE) folders")
            checks = check_seed(cur, self.org_id, self.inbox["id"])
            cur.execute("SELECT count(*) FROM messages WHERE inbox_id = %s", (self.inbox["id"],))
            in_inbox = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM threads WHERE inbox_id = %s", (self.inbox["id"],))
            threads = cur.fetchone()[0]
            cur.execute("SELECT pg_size_pretty(pg_total_relation_size('messages'))")
            size = cur.fetchone()[0]
            cur.execute("SELECT id FROM messages WHERE org_id = %s AND inbox_id = %s "
                        "ORDER BY id DESC", (self.org_id, self.inbox["id"]))
            self.ids = [r[0] for r in cur.fetchall()]
        vacuum_s = time.perf_counter() - t0
        if not all(checks.values()):
            raise SetupError(f"seeded data inconsistent: {checks}")
        if in_inbox != args.messages:
            raise SetupError(f"the inbox holds {in_inbox} messages, not {args.messages}")
        rng = random.Random(3)
        # Cursors in the older half: the page after each of them is a deep page.
        half = len(self.ids) // 2
        self.deep_cursors = [self.ids[rng.randrange(half, len(self.ids) - 21)]
                             for _ in range(200)]
        return {"smtp_accepted": accepted, "smtp_seconds": round(smtp_s, 1),
                "sql": info, "sql_seconds": round(sql_s, 1),
                "vacuum_analyze_seconds": round(vacuum_s, 1), "checks": checks,
                "messages_in_inbox": in_inbox, "threads_in_inbox": threads,
                "messages_table_size": size}

    # checks ----------------------------------------------------------------------
    async def get_json(self, path: str) -> dict[str, Any]:
        response = await one_request(self.h.http_port, build_get(self.h.http_port, self.h.key,
                                                                 path), 30.0)
        if response.status != 200:
            raise SetupError(f"GET {path}: HTTP {response.status} {response.body[:300]!r}")
        return json.loads(response.body)

    async def verify(self) -> dict[str, Any]:
        inbox = self.inbox["id"]
        first = await self.get_json(f"/api/v1/inboxes/{inbox}/messages")
        got = [m["id"] for m in first["data"]]
        if got != self.ids[:20]:
            raise SetupError("first page: not the 20 newest messages")
        cursor = self.deep_cursors[0]
        deep = await self.get_json(f"/api/v1/inboxes/{inbox}/messages"
                                   f"?page_token={page_token(cursor)}")
        at = self.ids.index(cursor)
        if [m["id"] for m in deep["data"]] != self.ids[at + 1:at + 21]:
            raise SetupError("deep page: not the 20 messages after its cursor")
        one = await self.get_json(f"/api/v1/messages/{self.ids[len(self.ids) // 3]}")
        if one["id"] != self.ids[len(self.ids) // 3] or not one.get("text_body"):
            raise SetupError("get message: wrong message or no body")
        threads = await self.get_json(f"/api/v1/inboxes/{inbox}/threads")
        if len(threads["data"]) != 20 or not threads.get("next_page_token"):
            raise SetupError(f"threads: {len(threads['data'])} on the first page")
        return {"first_page_items": len(first["data"]), "deep_page_position": at + 1,
                "deep_page_items": len(deep["data"]),
                "threads_page_items": len(threads["data"]),
                "first_thread_message_count": threads["data"][0].get("message_count")}

    def explain_all(self) -> list[dict[str, Any]]:
        org, envs, inbox = self.org_id, self.env_ids, self.inbox["id"]
        common = {"thread_id": None, "labels": None, "before": None, "after": None,
                  "unread": None, "limit": 21}
        from agentpost.storage import inboxes as inbox_store

        queries = [
            ("list messages, first page",
             captured_sql(mail_store.list_messages, org, envs, inbox, after_id=None, **common)),
            ("list messages, deep page",
             captured_sql(mail_store.list_messages, org, envs, inbox,
                          after_id=self.deep_cursors[0], **common)),
            ("get message", captured_sql(mail_store.get_message, org, envs,
                                         self.ids[len(self.ids) // 3])),
            ("list attachments (get)", captured_sql(mail_store.list_attachments, org,
                                                    self.ids[len(self.ids) // 3])),
            (f"list messages, other inbox ({OTHER_INBOX_MESSAGES} msgs)",
             captured_sql(mail_store.list_messages, org, envs, self.other["id"], after_id=None,
                          **common)),
            ("list threads, first page",
             captured_sql(mail_store.list_threads, org, envs, inbox, labels=None, cursor=None,
                          limit=21)),
            ("inbox check (list)", captured_sql(inbox_store.get_inbox, org, envs, inbox)),
        ]
        with self.h.db.cursor() as cur:
            return [explain(cur, name, sql, params) for name, (sql, params) in queries]

    # load ------------------------------------------------------------------------
    async def run_all(self) -> dict[str, Any]:
        args, h = self.args, self.h
        seeded = await self.seed()
        verified = await self.verify()
        log("EXPLAIN (ANALYZE, BUFFERS) of the list and get queries")
        plans = await asyncio.to_thread(self.explain_all)
        inbox = self.inbox["id"]
        port, key = h.http_port, h.key
        rng = random.Random(11)
        first_page = build_get(port, key, f"/api/v1/inboxes/{inbox}/messages")
        threads = build_get(port, key, f"/api/v1/inboxes/{inbox}/threads")
        deep = [build_get(port, key, f"/api/v1/inboxes/{inbox}/messages"
                                     f"?page_token={page_token(c)}") for c in self.deep_cursors]
        ids = self.ids
        plan: list[tuple[str, Any]] = [
            ("list messages (first page)", lambda wid: first_page),
            ("list messages (deep page)", lambda wid: deep[rng.randrange(len(deep))]),
            ("get message (random id)",
             lambda wid: build_get(port, key, f"/api/v1/messages/{ids[rng.randrange(len(ids))]}")),
            ("list threads (first page)", lambda wid: threads),
        ]
        results = []
        pg_pid = h.pg_pid()
        for name, payload in plan:
            for conc in args.concurrency:
                log(f"{name} with {conc} client(s): {args.warmup} s warm-up + {args.duration} s")
                run = await run_scenario(Scenario("GET", conc, 200), port, payload, args.warmup,
                                         args.duration, args.timeout, h.server_pid, pg_pid)
                summary = summarize(name, run, args.duration)
                results.append(summary)
                log(f"  -> {summary['requests_per_s']:,.0f} req/s, p50 "
                    f"{summary['latency_ms']['p50']} ms, p99 {summary['latency_ms']['p99']} ms, "
                    f"errors {summary['errors']}")
                h.check_server(f"{name} c={conc}")
        return {"seed": seeded, "verify": verified, "plans": plans, "results": results}


def summarize(name: str, run: Any, duration_s: float) -> dict[str, Any]:
    lat = sorted(run.latencies)
    ok = len(lat)
    elapsed = run.elapsed or duration_s

    def ms(v: float) -> float | None:
        return None if math.isnan(v) else round(v * 1000.0, 2)

    def pct(v: float) -> float | None:
        return round(100.0 * v / elapsed, 1) if elapsed and not math.isnan(v) else None

    return {
        "endpoint": name, "concurrency": run.scenario.concurrency, "requests_ok": ok,
        "requests_per_s": round(ok / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {"p50": ms(percentile(lat, 50)), "p90": ms(percentile(lat, 90)),
                       "p99": ms(percentile(lat, 99)), "max": ms(lat[-1]) if lat else None},
        "errors": sum(run.errors.values()), "error_kinds": run.errors,
        "cpu_pct_of_one_core": {"server": pct(run.server_cpu), "postgres": pct(run.postgres_cpu),
                                "client": pct(run.client_cpu)},
        "server_cpu_ms_per_request": round(1000.0 * run.server_cpu / ok, 3) if ok else None,
        "timed_out": run.timed_out,
    }


def print_report(report: dict[str, Any]) -> None:
    m, s, r = report["machine"], report["setup"], report["run"]
    seed = r["seed"]
    out = [
        "",
        "AgentPost store benchmark (one inbox, many messages)",
        machine_line(m),
        f"  database: PostgreSQL {s['postgres_version']}, embedded cluster, "
        f"fsync={'on' if s['fsync'] else 'off'}; messages table {seed['messages_table_size']}",
        f"  data    : {seed['messages_in_inbox']:,} messages and {seed['threads_in_inbox']:,} "
        f"threads in one inbox: {seed['smtp_accepted']} delivered over SMTP "
        f"({seed['smtp_seconds']} s), {seed['sql'].get('duplicated', 0):,} duplicated in SQL "
        f"({seed['sql_seconds']} s, VACUUM ANALYZE {seed['vacuum_analyze_seconds']} s)",
        f"  checks  : {', '.join(k for k, v in seed['checks'].items() if v)}: all true",
        f"  load    : keep-alive HTTP clients (api_bench's), warm-up {s['warmup_s']} s + "
        f"{s['duration_s']} s per row; deep pages start at random positions in the older "
        f"half (first checked one: item {r['verify']['deep_page_position']:,})",
        "",
        "Query plans (EXPLAIN (ANALYZE, BUFFERS), second run, the exact SQL the server sends):",
    ]
    for p in r["plans"]:
        verdict = "INDEX-BACKED" if p["index_backed"] else "NOT index-backed"
        out.append(f"  {p['name']:<36} {verdict:<17} {'; '.join(p['scan_nodes']) or '-'}  "
                   f"(execution {p['execution_time']}, buffers hit {p['buffers_hit']} "
                   f"read {p['buffers_read']}, "
                   f"{p['rows_removed_by_filter']} rows removed by filter)")
    out.append("")
    header = (f"{'endpoint':<30}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
              f"{'max ms':>9}{'errors':>8}{'srv CPU':>9}{'pg CPU':>8}{'srv ms/req':>11}")
    out += [header, "-" * len(header)]
    for x in r["results"]:
        lat, cpu = x["latency_ms"], x["cpu_pct_of_one_core"]
        out.append(f"{x['endpoint']:<30}{x['concurrency']:>5}{fmt(x['requests_per_s'], 0):>9}"
                   f"{fmt(lat['p50'], 2):>9}{fmt(lat['p90'], 2):>9}{fmt(lat['p99'], 2):>9}"
                   f"{fmt(lat['max'], 1):>9}{x['errors']:>8}{fmt(cpu['server'], 0) + '%':>9}"
                   f"{fmt(cpu['postgres'], 0) + '%':>8}"
                   f"{fmt(x['server_cpu_ms_per_request'], 3):>11}")
        if x["error_kinds"]:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(x["error_kinds"].items()))
            out.append(f"  errors: {kinds}")
    if report.get("show_plans"):
        out.append("")
        for p in r["plans"]:
            out.append(f"-- {p['name']}")
            out.append(f"   {p['sql']}")
            out += [f"   {line}" for line in p["plan"]]
    out.append("")
    print("\n".join(out), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--messages", type=int, default=100_000,
                        help="messages in the inbox (default 100000)")
    parser.add_argument("--smtp-seed", type=int, default=300,
                        help="real messages delivered over SMTP before duplicating (default 300)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="measured seconds per endpoint (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="warm-up seconds before each measured window (default 1)")
    parser.add_argument("--concurrency", default="1",
                        help="comma-separated client counts (default 1)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="per-request timeout in seconds (default 10)")
    parser.add_argument("--no-fsync", action="store_true",
                        help="run PostgreSQL with fsync/synchronous_commit off (not durable)")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="database.pool_size for the server (default: the server default)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"],
                        help="server logging.level (default info)")
    parser.add_argument("--plans", action="store_true",
                        help="print the full EXPLAIN output and SQL, not just the verdicts")
    parser.add_argument("--server-log", metavar="FILE", default=None,
                        help="keep a copy of the server's log here (it is deleted otherwise)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout instead of the table")
    args = parser.parse_args(argv)
    try:
        args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        parser.error("--concurrency takes integers, e.g. 1,8")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency values must be >= 1")
    if args.smtp_seed < 3 or args.messages < args.smtp_seed + 100:
        parser.error("--smtp-seed must be >= 3 and --messages >= --smtp-seed + 100")
    if args.duration <= 0 or args.warmup < 0 or args.timeout <= 0:
        parser.error("--duration and --timeout must be > 0, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    machine = machine_info()
    bench = StoreBench(args)
    try:
        setup = bench.setup()
        run = asyncio.run(bench.run_all())
        stop_server(bench.h.server)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except (SetupError, EmbeddedPostgresError, MigrationError, psycopg2.Error, OSError,
            TimeoutError, ssl.SSLError) as exc:
        log(f"failed: {type(exc).__name__}: {str(exc).strip()}")
        return 1
    finally:
        bench.h.cleanup()
    report = {"machine": machine, "setup": setup, "run": run, "show_plans": args.plans}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
    return 1 if any(x["errors"] or x["timed_out"] for x in run["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
