#!/usr/bin/env python3
"""Webhook deliveries per second to a local receiver, and event commit -> receipt latency.

Reuses bench/smtp_bench.py's harness (a throw-away PostgreSQL cluster, a real
``agentpost serve``, an owner key from ``agentpost bootstrap``), configured with a
master key (to seal the endpoint's secret) and ``[webhooks] allow_networks`` for
loopback. The receiver is a minimal asyncio HTTP server in this process that answers
200 and notes when each ``webhook-id`` arrived.

For each worker-process count (``--workers 1 2``: ``[server] workers``; every process
runs a webhook worker over the same queue):

1. Burst: ``--events`` events committed straight into the event log (as the server's
   own writers do: INSERT + pg_notify in one transaction, ``--batch`` per transaction)
   as fast as one connection can; deliveries/s = events / (first commit .. last
   receipt), commit -> receipt p50/p99 (queueing included), and server CPU per delivery
   (the agentpost process tree, and PostgreSQL's backends).
2. Paced: ``--paced`` events, one per transaction, ``--rate`` per second: commit ->
   receipt p50/p99 of an unloaded queue.

Duplicates (a webhook-id received twice) are counted and printed; they should be 0.
Timing never makes it fail; exit 1 only if setup failed or deliveries never came.

Usage: ``.venv/bin/python bench/webhook_bench.py [--events 2000] [--workers 1 2]``
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import api_bench
import psycopg2
import smtp_bench
from psycopg2.extras import Json

from agentpost.model.ids import new_id

EVENTS_CHANNEL = "agentpost_events"  # storage/mail.py
_write_config = smtp_bench.write_config


def write_config(path: Path, **kw: Any) -> None:
    """smtp_bench's config plus a master key and loopback webhook receivers."""
    _write_config(path, **kw)
    key_file = path.parent / "secrets.key"
    if not key_file.exists():
        from agentpost.auth.sealing import generate_key_file

        generate_key_file(key_file)
    with open(path, "a") as f:
        f.write(f'\n[secrets]\nkey_file = "{key_file}"\n'
                '\n[webhooks]\nallow_networks = ["127.0.0.0/8"]\n')


smtp_bench.write_config = write_config


class Receiver:
    """HTTP/1.1 on 127.0.0.1: each POST answered 200, its webhook-id's arrival noted."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self.changed = asyncio.Event()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {}
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get(b"content-length", b"0")))
                now = time.perf_counter()
                msg_id = headers.get(b"webhook-id", b"").decode()
                self.hits[msg_id] += 1
                self.arrivals.setdefault(msg_id, now)
                self.changed.set()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                             b"Content-Type: text/plain\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def wait_for(self, ids: list[str], timeout_s: float) -> None:
        deadline = time.perf_counter() + timeout_s
        while any(i not in self.arrivals for i in ids):
            self.changed.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                missing = sum(1 for i in ids if i not in self.arrivals)
                raise RuntimeError(f"{missing} of {len(ids)} deliveries never arrived")
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            except TimeoutError:
                pass

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


def commit_events(dsn: str, org_id: str, count: int, batch: int,
                  rate: float | None) -> list[tuple[str, float]]:
    """Commit ``count`` events (``batch`` per transaction, optionally ``rate`` per
    second); (event id, perf_counter after its COMMIT) each."""
    conn = psycopg2.connect(dsn)
    out: list[tuple[str, float]] = []
    try:
        start = time.perf_counter()
        with conn.cursor() as cur:
            for first in range(0, count, batch):
                if rate:
                    due = start + first / rate
                    if (wait := due - time.perf_counter()) > 0:
                        time.sleep(wait)
                ids = [new_id("evt") for _ in range(min(batch, count - first))]
                for event_id in ids:
                    cur.execute(
                        "INSERT INTO events (org_id, id, type, data, created_at) "
                        "VALUES (%s, %s, 'domain.verified', %s, now()); "
                        "SELECT pg_notify(%s, %s)",
                        (org_id, event_id, Json({"bench": event_id}), EVENTS_CHANNEL,
                         json.dumps({"org_id": org_id, "id": event_id,
                                     "type": "domain.verified", "inbox_id": None})))
                conn.commit()
                done = time.perf_counter()
                out += [(i, done) for i in ids]
    finally:
        conn.close()
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


async def phase(h: Any, rx: Receiver, org_id: str, *, count: int, batch: int,
                rate: float | None) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    cpu0 = api_bench.tree_cpu(h.server_pid), api_bench.tree_cpu(h.pg_pid())
    committed = await loop.run_in_executor(None, commit_events, h.dsn, org_id, count,
                                           batch, rate)
    ids = [i for i, _ in committed]
    await rx.wait_for(ids, timeout_s=max(120.0, count / 5))
    cpu1 = api_bench.tree_cpu(h.server_pid), api_bench.tree_cpu(h.pg_pid())
    lat = [(rx.arrivals[i] - t) * 1000 for i, t in committed]
    span = max(rx.arrivals[i] for i in ids) - committed[0][1]
    return {"events": count, "deliveries_per_s": count / span if span > 0 else float("inf"),
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat),
            "duplicates": sum(rx.hits[i] - 1 for i in ids),
            "server_cpu_ms_per_delivery": (cpu1[0] - cpu0[0]) * 1000 / count,
            "pg_cpu_ms_per_delivery": (cpu1[1] - cpu0[1]) * 1000 / count,
            "uptime": uptime()}


async def run_one(h: Any, args: argparse.Namespace) -> dict[str, Any]:
    rx = Receiver()
    await rx.start()
    try:
        payload = api_bench.build_post(h.http_port, h.key, {
            "url": f"http://127.0.0.1:{rx.port}/hook"}, "/api/v1/webhooks")
        made = await api_bench.one_request(h.http_port, payload, 30.0)
        if made.status != 201:
            raise RuntimeError(f"creating the webhook: HTTP {made.status} {made.body[:300]!r}")
        org_id = h.count("SELECT min(org_id) FROM webhooks")
        await asyncio.sleep(1.0)  # every worker process up and listening
        warm = await phase(h, rx, org_id, count=50, batch=10, rate=None)
        del warm
        burst = await phase(h, rx, org_id, count=args.events, batch=args.batch, rate=None)
        paced = await phase(h, rx, org_id, count=args.paced, batch=1, rate=args.rate)
        return {"burst": burst, "paced": paced}
    finally:
        rx.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=20, help="events per transaction")
    parser.add_argument("--paced", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="paced events per second")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    results = {}
    for workers in args.workers:
        h = smtp_bench.Harness("agentpost-whbench-", "whbench")
        h.workers = workers
        h.count = lambda sql, h=h: _scalar(h, sql)
        try:
            h.start_postgres(fsync=True)
            h.start_server(pool_size=None, log_level="warn", starttls=False)
            results[workers] = asyncio.run(run_one(h, args))
        except Exception as exc:
            print(f"webhook_bench failed ({workers} worker processes): {exc}",
                  file=sys.stderr)
            return 1
        finally:
            h.cleanup()
        b, p = results[workers]["burst"], results[workers]["paced"]
        print(f"{workers} worker process(es): burst of {b['events']} events "
              f"({args.batch}/transaction): {b['deliveries_per_s']:.0f} deliveries/s, "
              f"commit -> receipt p50 {b['p50_ms']:.0f} ms, p99 {b['p99_ms']:.0f} ms; "
              f"CPU/delivery server {b['server_cpu_ms_per_delivery']:.2f} ms, PostgreSQL "
              f"{b['pg_cpu_ms_per_delivery']:.2f} ms; duplicates {b['duplicates']}")
        print(f"   uptime: {b['uptime']}")
        print(f"  paced {p['events']} events at {args.rate:.0f}/s: commit -> receipt p50 "
              f"{p['p50_ms']:.1f} ms, p99 {p['p99_ms']:.1f} ms, max {p['max_ms']:.1f} ms; "
              f"duplicates {p['duplicates']}")
        print(f"   uptime: {p['uptime']}")
        sys.stdout.flush()
    print(json.dumps(results, indent=1))
    return 0


def _scalar(h: Any, sql: str) -> Any:
    with h.db.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
