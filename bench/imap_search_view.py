#!/usr/bin/env python3
"""CPU per flag/keyword SEARCH: the server's and PostgreSQL's, one client, no other load.

Why apart from ``imap_mixed.py``: there SEARCH is 8 % of the commands and the mixed
load's CPU per command moves by more than SEARCH costs whenever the machine is shared;
here every command is one of the mixed load's SEARCHes that the session's view can
answer (issue 10: ``agentpost/imap/view_search.py``), so the figure is what one of them
costs. Starts a throw-away PostgreSQL and ``agentpost serve`` (bench/imap_bench.py's
harness), APPENDs ``--messages`` messages with varied flags and keywords, selects INBOX
and sends ``--commands`` SEARCH / UID SEARCH in turn; prints server and PostgreSQL CPU
ms per SEARCH and the latency p50/p95. Run it from a snapshot with
``PYTHONPATH=DIR .venv/bin/python bench/imap_search_view.py`` to compare two trees.
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import random
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.append(str(BENCH))

from api_bench import process_cpu, tree_cpu  # noqa: E402
from imap_bench import IMAPHarness  # noqa: E402

#: The mixed load's SEARCH keys the view decides (bench/imapload/workload.py SEARCHES).
KEYS = ("ALL", "UNSEEN", "FLAGGED", "DELETED", "KEYWORD $Forwarded", "KEYWORD $Label1",
        "UNKEYWORD bench_custom", "OR SEEN FLAGGED", "NOT ANSWERED")
FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "\\Deleted", "$Forwarded", "$Label1",
         "bench_custom", "$label1")


def _message(n: int) -> bytes:
    return (f"From: a@example.com\r\nTo: b@example.com\r\nSubject: m {n}\r\n"
            f"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <{n}@example.com>\r\n"
            f"\r\nbody {n}\r\n").encode()


def run(port: int, user: str, password: str, messages: int, commands: int,
        cpu: dict[str, object]) -> dict[str, float]:
    rng = random.Random(1)
    client = imaplib.IMAP4("127.0.0.1", port)
    client.login(user, password)
    for n in range(messages):
        flags = " ".join(f for f in FLAGS if rng.random() < 0.3)
        typ, _ = client.append("INBOX", f"({flags})", None, _message(n))
        assert typ == "OK"
    client.select("INBOX")
    for key in KEYS:  # warm-up: every key once
        client.uid("SEARCH", key)
    probe = cpu["probe"]
    before = probe()  # type: ignore[operator]
    times = []
    start = time.perf_counter()
    for i in range(commands):
        key = KEYS[i % len(KEYS)]
        t0 = time.perf_counter()
        typ, _ = client.uid("SEARCH", key) if i % 2 else client.search(None, key)
        times.append(time.perf_counter() - t0)
        assert typ == "OK"
    wall = time.perf_counter() - start
    after = probe()  # type: ignore[operator]
    client.logout()
    times.sort()
    return {"server_ms": 1000 * (after[0] - before[0]) / commands,
            "postgres_ms": 1000 * (after[1] - before[1]) / commands,
            "p50_ms": 1000 * statistics.median(times),
            "p95_ms": 1000 * times[int(0.95 * len(times))],
            "per_s": commands / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=300)
    p.add_argument("--commands", type=int, default=3000)
    a = p.parse_args()
    h = IMAPHarness("imap-search-view-", "imapsearchview")
    try:
        h.start_postgres(True)
        h.start_imap_server(pool_size=None, log_level="warn", imap_max_per_ip=100,
                            imap_max_total=100, max_append=1 << 20)
        inbox = asyncio.run(h.create_inbox("search-bench"))

        def probe() -> tuple[float, float]:
            return process_cpu(h.server_pid), tree_cpu(h.pg_pid())

        out = run(h.imap_port, inbox["email"], h.key, a.messages, a.commands,
                  {"probe": probe})
        print(f"SEARCH x{a.commands} over {a.messages} messages: "
              f"server {out['server_ms']:.3f} ms, postgres {out['postgres_ms']:.3f} ms "
              f"CPU per SEARCH; p50 {out['p50_ms']:.2f} ms, p95 {out['p95_ms']:.2f} ms, "
              f"{out['per_s']:.0f}/s")
    finally:
        h.cleanup()


if __name__ == "__main__":
    main()
