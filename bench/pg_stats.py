"""pg_stat_statements with planning time, for the benchmarks' own clusters (``--pg-stats``).

Why: a statement PostgreSQL plans on every EXECUTE (``plan_cache_mode = auto`` keeping
custom plans) costs planning CPU that ``total_exec_time`` does not show; with
``track_planning`` on, ``plans`` next to ``calls`` and ``total_plan_time`` next to
``total_exec_time`` show which statements are planned each time and what that costs.

``pg_stat_statements.track_planning`` exists only once the library is loaded, so it is
set after the restart that loads it, then the configuration is reloaded.
"""

from __future__ import annotations

from typing import Any

import psycopg2


def enable(cluster: Any, dbnames: list[str]) -> None:
    """Load pg_stat_statements into ``cluster`` (an EmbeddedPostgres: restarted), create
    the extension in each of ``dbnames`` and turn planning-time tracking on."""
    _admin(cluster.dsn(), "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    cluster.stop()
    cluster.start()
    _admin(cluster.dsn(), "ALTER SYSTEM SET pg_stat_statements.track_planning = on",
           "SELECT pg_reload_conf()")
    for dbname in dbnames:
        _admin(cluster.dsn(dbname), "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def _admin(dsn: str, *statements: str) -> None:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for sql in statements:
                cur.execute(sql)
    finally:
        conn.close()


def reset(conn: Any) -> None:
    """Forget the counts so far (setup's statements are not the measured ones), the
    WAL's and the buffer writers' included (:func:`io_report`)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_stat_statements_reset(), pg_stat_reset_shared('wal'), "
                    "pg_stat_reset_shared('bgwriter')")


def io_report(conn: Any, messages: int) -> str:
    """What the server wrote since :func:`reset`, per message: WAL bytes and full-page
    images, and the pages written out by backends, the background writer and the
    checkpointer. Why: at 100 KiB most of PostgreSQL's CPU was copying bytes into the
    page cache (perf, bench/README.md fourteenth pass), which the statements' timings
    do not show."""
    with conn.cursor() as cur:
        cur.execute("SELECT w.wal_bytes, w.wal_fpi, b.buffers_backend, b.buffers_clean, "
                    "b.buffers_checkpoint FROM pg_stat_wal w, pg_stat_bgwriter b")
        wal, fpi, backend, clean, checkpoint = cur.fetchone()
    n = max(messages, 1)
    return (f"pg writes per message ({messages} messages): WAL {int(wal) / n / 1024:.1f} KiB "
            f"({fpi / n:.2f} full-page images), pages written {8 * backend / n:.1f} KiB by "
            f"backends, {8 * clean / n:.1f} KiB by the bgwriter, "
            f"{8 * checkpoint / n:.1f} KiB at checkpoints")


def report(conn: Any, limit: int = 15, width: int = 150) -> str:
    """Totals and the statements that took the most planning time, as text."""
    with conn.cursor() as cur:
        cur.execute("SELECT coalesce(sum(calls), 0), coalesce(sum(plans), 0), "
                    "coalesce(sum(total_plan_time), 0), coalesce(sum(total_exec_time), 0) "
                    "FROM pg_stat_statements")
        calls, plans, plan_ms, exec_ms = cur.fetchone()
        cur.execute("SELECT calls, plans, total_plan_time, total_exec_time, "
                    "left(regexp_replace(query, '\\s+', ' ', 'g'), %s) "
                    "FROM pg_stat_statements ORDER BY total_plan_time DESC LIMIT %s",
                    (width, limit))
        rows = cur.fetchall()
        cur.execute("SELECT calls, plans, total_plan_time, total_exec_time, "
                    "left(regexp_replace(query, '\\s+', ' ', 'g'), %s) "
                    "FROM pg_stat_statements ORDER BY calls DESC LIMIT %s",
                    (width, limit))
        by_calls = cur.fetchall()
    lines = [f"pg_stat_statements: calls {calls}, plans {plans}, plan {plan_ms:.1f} ms, "
             f"exec {exec_ms:.1f} ms (plan = {100 * plan_ms / max(exec_ms, 1e-9):.0f}% "
             f"of exec)",
             f"{'calls':>8} {'plans':>8} {'plan ms':>9} {'exec ms':>9}  query"]
    lines += [f"{c:>8} {p:>8} {pt:>9.1f} {et:>9.1f}  {q}" for c, p, pt, et, q in rows]
    lines.append("the most called:")
    lines += [f"{c:>8} {p:>8} {pt:>9.1f} {et:>9.1f}  {q}" for c, p, pt, et, q in by_calls]
    return "\n".join(lines)
