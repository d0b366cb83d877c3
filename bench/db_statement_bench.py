"""CPU per statement of storage.Database alone: the driver's share, without HTTP or IMAP.

Why: the API and IMAP benches measure whole requests, where the driver's polling is a
slice small enough to drown in a shared machine's noise. This runs statements through
Database (reads: ``run_query``; transactions: ``run_interaction`` with two statements
and COMMIT) from C concurrent loops and reports this process's CPU and PostgreSQL's
per statement.

``--ab OLD NEW``: one PostgreSQL, then alternating runs (in child processes, each with
PYTHONPATH set to one tree, the order flipped every pair) of the same workload, and
the paired table. Without it, one run against ``--dsn`` (JSON on stdout).

Usage: ``.venv/bin/python bench/db_statement_bench.py --ab /tmp/x-old /tmp/x-new``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _child(args: argparse.Namespace) -> None:
    from twisted.internet import defer, task

    async def whole() -> None:
        print(json.dumps(await _measure(args)))

    task.react(lambda _reactor: defer.Deferred.fromCoroutine(whole()))


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    from api_bench import tree_cpu
    from twisted.internet import defer, reactor

    from agentpost.storage.database import Database

    db = Database(args.dsn, clock=reactor, reactor=reactor, pool_size=args.concurrency)

    async def txn_work(txn: Any) -> Any:
        await txn.fetchval("SELECT 1")
        return await txn.execute("SELECT 2")

    async def loop(n: int) -> None:
        for _ in range(n):
            if args.mode == "read":
                await db.run_query("bench", "SELECT 1")
            else:
                await db.run_interaction("bench", txn_work)

    async def burst(n: int) -> None:
        await defer.gatherResults([defer.Deferred.fromCoroutine(loop(n))
                                   for _ in range(args.concurrency)])

    await burst(50)
    ops = args.count // args.concurrency
    cpu0, pg0, wall0 = time.process_time(), tree_cpu(args.pg_pid), time.monotonic()
    await burst(ops)
    cpu, pg = time.process_time() - cpu0, tree_cpu(args.pg_pid) - pg0
    wall = time.monotonic() - wall0
    await db.close()
    done = ops * args.concurrency
    return {"mode": args.mode, "operations": done, "cpu_s": round(cpu, 3),
            "pg_cpu_s": round(pg, 3), "wall_s": round(wall, 3),
            "us_per_op": round(1e6 * cpu / done, 1), "pg_us_per_op": round(1e6 * pg / done, 1)}


def _ab(args: argparse.Namespace) -> None:
    from api_bench import postmaster_pid

    from agentpost.dev.embedded_pg import EmbeddedPostgres

    var = Path(tempfile.mkdtemp(prefix="agentpost-dbbench-"))
    cluster = EmbeddedPostgres(var, fsync=False, name="dbbench")
    cluster.start()
    try:
        pg_pid = postmaster_pid(cluster)
        trees = {"old": args.ab[0], "new": args.ab[1]}
        rows: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
        for i in range(args.pairs):
            for side in (("old", "new") if i % 2 == 0 else ("new", "old")):
                env = {**os.environ, "PYTHONPATH": trees[side]}
                out = subprocess.run(
                    [sys.executable, __file__, "--dsn", cluster.dsn(), "--pg-pid", str(pg_pid),
                     "--mode", args.mode, "--count", str(args.count),
                     "--concurrency", str(args.concurrency)],
                    env=env, cwd=trees[side], capture_output=True, text=True, check=True)
                rows[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"pair {i + 1} {side}: {rows[side][-1]}", file=sys.stderr)
        _table(args.mode, rows)
    finally:
        cluster.stop()


def _table(mode: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    print(f"mode {mode}: microseconds of CPU per operation (client process = the driver's "
          "side; pg = postmaster + backends)")
    print(f"{'pair':>4} {'old us':>8} {'new us':>8} {'delta':>7} {'old pg':>8} {'new pg':>8}")
    deltas = []
    for i, (o, n) in enumerate(zip(rows["old"], rows["new"], strict=True)):
        d = n["us_per_op"] / o["us_per_op"] - 1
        deltas.append(d)
        print(f"{i + 1:>4} {o['us_per_op']:>8} {n['us_per_op']:>8} {100 * d:>+6.1f}% "
              f"{o['pg_us_per_op']:>8} {n['pg_us_per_op']:>8}")
    print(f"median delta {100 * statistics.median(deltas):+.1f}% over {len(deltas)} pairs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--pg-pid", type=int, default=None)
    parser.add_argument("--mode", choices=("read", "txn"), default="read")
    parser.add_argument("--count", type=int, default=20000, help="operations per run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--ab", nargs=2, metavar=("OLD", "NEW"))
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    if args.ab:
        _ab(args)
    else:
        _child(args)


if __name__ == "__main__":
    main()
