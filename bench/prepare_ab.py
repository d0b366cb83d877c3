"""Prepared statements A/B (issue 12): ``[database] prepare_threshold`` 0 and 3
alternating on one server build, 4 KiB MX messages from smtp-source at 20 sessions
(one inbox, then 20), printing app and PostgreSQL CPU per message with the load.

    .venv/bin/python bench/prepare_ab.py [ROUNDS]   # default 2; needs smtp-source (postfix)
"""
import asyncio
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_smtp import (
    KIB,
    Harness,
    Work,
    process_cpu,
    run_smtp_source,
    stop_server,
    tree_cpu,
)

h = Harness("agentpost-ab-", "ab")


def set_threshold(n: int) -> None:
    p = h.tmp / "agentpost.toml"
    s = p.read_text()
    s = re.sub(r"\nprepare_threshold = \d+", "", s)
    s = s.replace("[database]\n", f"[database]\nprepare_threshold = {n}\n")
    p.write_text(s)
    stop_server(h.server)
    h._spawn()


try:
    h.start_postgres(True)
    h.start_server(pool_size=None, log_level="warn", starttls=False)
    rcpts = [asyncio.run(h.create_inbox(f"bench-rcpt-{i:03d}"))["email"] for i in range(20)]
    run_smtp_source(h.mx_port, Work(4*KIB, 20, 1, 300), rcpts, 60)
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    for r in range(rounds):
        for thr in ([0, 3] if r % 2 == 0 else [3, 0]):
            set_threshold(thr)
            run_smtp_source(h.mx_port, Work(4*KIB, 20, 20, 200), rcpts, 60)  # warm
            for sessions, inboxes, n in [(20, 1, 1000), (20, 20, 1000)]:
                w = Work(4*KIB, sessions, inboxes, n)
                a0, p0 = process_cpu(h.server_pid), tree_cpu(h.pg_pid())
                el = run_smtp_source(h.mx_port, w, rcpts, 120)
                a, p = process_cpu(h.server_pid)-a0, tree_cpu(h.pg_pid())-p0
                load = os.getloadavg()[0]
                print(f"thr={thr} s={sessions} inboxes={inboxes}: {n / el:.0f} msg/s "
                      f"app {a * 1000 / n:.2f} pg {p * 1000 / n:.2f} ms/msg load {load:.1f}",
                      flush=True)
finally:
    stop_server(h.server)
    h.cleanup()
