#!/usr/bin/env python3
"""Peak memory of ingesting one large message, stage by stage, as a multiple of its size.

Why: the delivery path must hold a 10 MB message a small number of times, not ten (the
goal: a plain-text message peaks under 3x its size above idle; an attachment ~1.5x).
Each measurement runs in a fresh child process, so one message's heap growth cannot
hide the next one's:

* ``analyse``: the parsing thread's work, exactly as ingest runs it
  (:func:`agentpost.core.ingest._analyse_indexed`: the MIME tree, the API fields with
  :mod:`agentpost.mail.largeparts`, the IMAP renderings, the SEARCH/SORT keys), plus the
  preview that the message row takes;
* ``quote``: then psycopg2 quoting the row's text values as the INSERT does (what the
  driver adds on top, with the parsed message still alive): large values piece by
  piece, as storage.message_bodies sends them (the ``chunked`` prototype below, now the
  real path).

For each it prints the peak RSS above the child's idle RSS (``VmHWM`` after resetting
it, Linux; falls back to ``ru_maxrss``) and tracemalloc's peak of Python allocations,
both divided by the message size. ``--server`` also runs ``bench/smtp_bench.py``'s
large-message measurement against a real ``agentpost serve`` (SMTP in, PostgreSQL with
fsync on): the whole delivery path, including the SMTP reader and the driver.

Usage: ``.venv/bin/python bench/memory_bench.py [--size 10M] [--server] [--json]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

MIB = 1024 * 1024
KINDS = ("text", "attachment")
STAGES = ("analyse", "quote")


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _message(kind: str, size: int) -> bytes:
    from smtp_bench import SHARED_DOMAIN, MessageFactory

    factory = MessageFactory(size, kind=kind, seed=7)
    return factory.head(1, 1, "rcpt@" + SHARED_DOMAIN) + factory.body


def _quote_row(parsed: Any) -> int:
    """What psycopg2 makes of the row's large text values (bytes of SQL literals), the
    way the INSERT sends them: values above storage.message_bodies.LARGE_CHARS one
    piece at a time (only one piece is ever quoted at once), the rest whole."""
    from psycopg2.extensions import QuotedString

    from agentpost.storage import message_bodies

    def quote(value: str) -> int:
        quoted = QuotedString(value)
        quoted.encoding = "UTF8"
        return len(quoted.getquoted())

    total = 0
    step = message_bodies.CHUNK_CHARS
    for value in (parsed.text_body, parsed.html_body, parsed.extracted_text):
        if value is None:
            continue
        if len(value) > message_bodies.LARGE_CHARS:
            total += sum(quote(value[p:p + step]) for p in range(0, len(value), step))
        else:
            total += quote(value)
    return total


#: The prototype of passing a large text value without quoting it whole (``chunked``):
#: 1 MiB pieces into a temporary table, joined by the INSERT on the server.
CHUNK_CHARS = 1024 * 1024
_TEMP = ("CREATE TEMP TABLE IF NOT EXISTS body_parts (col text, n int, part text) "
         "ON COMMIT DELETE ROWS")
_PLAIN = "INSERT INTO bench_bodies (id, text_body, html_body) VALUES (%s, %s, %s)"
_JOINED = ("INSERT INTO bench_bodies (id, text_body, html_body) SELECT %s, "
           "coalesce(%s, (SELECT string_agg(part, '' ORDER BY n) FROM body_parts "
           "              WHERE col = 'text')), "
           "coalesce(%s, (SELECT string_agg(part, '' ORDER BY n) FROM body_parts "
           "              WHERE col = 'html'))")


def _insert(conn: Any, parsed: Any, chunked: bool) -> None:
    """The row's bodies into PostgreSQL: in the statement (as storage.mail does today),
    or (``chunked``) bodies above CHUNK_CHARS sent piece by piece first."""
    values: list[str | None] = [parsed.text_body, parsed.html_body]
    with conn.cursor() as cur:
        if chunked:
            cur.execute(_TEMP)
            for i, (col, value) in enumerate(zip(("text", "html"), values, strict=True)):
                if value is None or len(value) <= CHUNK_CHARS:
                    continue
                for n, pos in enumerate(range(0, len(value), CHUNK_CHARS)):
                    cur.execute("INSERT INTO body_parts VALUES (%s, %s, %s)",
                                (col, n, value[pos:pos + CHUNK_CHARS]))
                values[i] = None
        cur.execute(_JOINED if chunked else _PLAIN, ("m", *values))
        cur.execute("DELETE FROM bench_bodies")
    conn.commit()


def _child(kind: str, size: int, stage: str, dsn: str | None, out: Any) -> None:
    """One measurement in a fresh process; sends its figures back on ``out``."""
    from agentpost.core import ingest

    conn = None
    if dsn is not None:
        import psycopg2

        conn = psycopg2.connect(dsn)
    warm = _message(kind, 64 * 1024)
    parsed = ingest._analyse_indexed(warm)[0]  # imports, caches and code paths exist
    if conn is not None:
        _insert(conn, parsed, stage == "chunked")
    parsed.discard()
    raw = _message(kind, size)
    time.sleep(0.05)
    idle = _status("VmRSS")
    reset = _reset_hwm()
    rusage0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    t0 = time.perf_counter()
    parsed, _imap, _index = ingest._analyse_indexed(raw)
    _preview = parsed.preview
    if stage == "quote":
        _quote_row(parsed)
    elif conn is not None:
        _insert(conn, parsed, stage == "chunked")
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    parsed.discard()
    peak = _status("VmHWM") if reset else None
    if peak is None:  # no clear_refs: the high-water mark since start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        idle = max(idle or 0, rusage0)
    above = peak - (idle or 0)
    out.send({"kind": kind, "stage": stage, "size_bytes": len(raw),
              "idle_rss_mib": round((idle or 0) / MIB, 1),
              "peak_above_idle_mib": round(above / MIB, 1),
              "rss_ratio": round(above / len(raw), 2),
              "traced_peak_ratio": round(traced_peak / len(raw), 2),
              "seconds": round(seconds, 2), "hwm_reset": reset})
    out.close()


def measure(kind: str, size: int, stage: str, dsn: str | None = None) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(kind, size, stage, dsn, send))
    proc.start()
    send.close()
    try:
        result: dict[str, Any] = receive.recv()
    except EOFError:
        result = {"kind": kind, "stage": stage, "error": f"child exited {proc.exitcode}"}
    proc.join()
    return result


def database_figures(size: int) -> list[dict[str, Any]]:
    """The ``insert`` and ``chunked`` stages against a throw-away cluster (fsync on)."""
    import psycopg2
    import smtp_bench

    h = smtp_bench.Harness("agentpost-membench-", "membench")
    try:
        h.start_postgres(True)
        with h.db.cursor() as cur:
            cur.execute("CREATE TABLE bench_bodies (id text, text_body text, html_body text)")
        return [measure(kind, size, stage, h.dsn) for kind in KINDS
                for stage in ("insert", "chunked")]
    except psycopg2.Error as exc:
        return [{"kind": "-", "stage": "insert", "error": str(exc)}]
    finally:
        h.cleanup()


def server_figures(size: int) -> list[dict[str, Any]]:
    """smtp_bench's large-message measurement: a real server, SMTP in, fsync on."""
    import asyncio

    import smtp_bench

    args = smtp_bench.parse_args(["--big-size", str(size), "--big-kinds", "attachment,text",
                                  "--inboxes", "1"])
    bench = smtp_bench.SMTPBench(args)
    try:
        bench.setup()

        async def run() -> list[dict[str, Any]]:
            await bench.prepare()
            await bench.warm()
            out = []
            for kind in KINDS:
                await asyncio.to_thread(bench.h.restart_server)  # a clean heap for each
                await bench.warm()
                out.append(await bench.big_message(kind, size))
            return out

        return asyncio.run(run())
    finally:
        bench.h.cleanup()


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for suffix, factor in (("M", MIB), ("K", 1024)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--size", type=parse_size, default=10 * MIB - 4096,
                        help="message size (default just under 10 MiB, the default limit)")
    parser.add_argument("--server", action="store_true",
                        help="also measure a real agentpost serve over SMTP (~30 s)")
    parser.add_argument("--database", action="store_true",
                        help="also INSERT the bodies into a throw-away PostgreSQL: in the "
                        "statement, and chunked (a prototype)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = [measure(kind, args.size, stage) for kind in KINDS for stage in STAGES]
    if args.database:
        results += database_figures(args.size)
    server = server_figures(args.size) if args.server else []
    if args.json:
        print(json.dumps({"stages": results, "server": server}, indent=2))
        return 0
    print(f"\none message of {args.size:,} bytes; peak above idle / message size")
    print("| message | stage | RSS peak | Python allocations peak (tracemalloc) | seconds |")
    print("|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['kind']} | {r['stage']} | {r['error']} | | |")
            continue
        print(f"| {r['kind']} | {r['stage']} | {r['rss_ratio']}x "
              f"({r['peak_above_idle_mib']} MiB) | {r['traced_peak_ratio']}x | "
              f"{r['seconds']} |")
    for s in server:
        print(f"| {s['kind']} | server (SMTP in, stored) | {s['ratio_to_size']}x "
              f"({s['peak_above_idle_mib']} MiB) | - | {s['latency_ms'] / 1000:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
