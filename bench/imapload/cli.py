"""The command line of bench/imap_mixed.py: options, the server to start, the runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

from .report import print_append_only, print_load, print_mixed
from .servers import AgentPost, Dovecot
from .workload import KEYWORD_SETS, run_append, run_mixed

Server = Dovecot | AgentPost
DESCRIPTION = "Mixed IMAP load with a strict client: rates, latencies and *protocol errors*."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=143)
    p.add_argument("--tls", action="store_true", help="implicit TLS")
    p.add_argument("--starttls", action="store_true")
    p.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    p.add_argument("--cafile", default=None)
    p.add_argument("--user", default="bench")
    p.add_argument("--password", default="bench")
    p.add_argument("--clients", type=int, default=10, help="concurrent clients")
    p.add_argument("--client-list", default=None, help="e.g. 10,50: one run per count")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=30.0, help="per command")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seed-messages", type=int, default=100,
                   help="messages put in each mailbox before the run")
    p.add_argument("--max-messages", type=int, default=300,
                   help="above this many in the selected mailbox, expunge more, append less")
    p.add_argument("--keywords", choices=sorted(KEYWORD_SETS), default="imap",
                   help="keywords STORE/APPEND use (api-safe: lowercase ones only)")
    p.add_argument("--append-only", action="store_true", help="one client, sequential APPEND/s")
    p.add_argument("--append-mailbox", default="INBOX")
    p.add_argument("--load", type=int, default=None, metavar="M",
                   help="loader mode: APPEND M messages over --clients connections")
    p.add_argument("--start-agentpost", action="store_true")
    p.add_argument("--start-dovecot", action="store_true")
    p.add_argument("--dovecot-port", type=int, default=10143)
    p.add_argument("--no-fsync", action="store_true", help="(--start-agentpost) fsync off")
    p.add_argument("--pool-size", type=int, default=None, help="(--start-agentpost)")
    p.add_argument("--pg-stats", action="store_true",
                   help="(--start-agentpost) pg_stat_statements, top statements after each run")
    p.add_argument("--server-log", default=None, help="(--start-agentpost) keep the server log")
    p.add_argument("--hold", type=float, default=0.0,
                   help="keep the started server this many seconds before the runs "
                        "(attach py-spy)")
    p.add_argument("--py-spy", default=None, metavar="PREFIX",
                   help="(--start-agentpost) py-spy record the server during each run to "
                        "PREFIX-<run>.txt")
    p.add_argument("--gil", action="store_true",
                   help="(--py-spy) sample only the thread holding the GIL")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    return p


def make_server(cfg: argparse.Namespace) -> Server | None:
    """The server the options ask to start (None: use --host/--port as given)."""
    if cfg.start_dovecot:
        return Dovecot(cfg.dovecot_port)
    if cfg.start_agentpost:
        return AgentPost(cfg)
    return None


def start_server(cfg: argparse.Namespace, server: Server) -> None:
    """Start it and point cfg.port, cfg.user and cfg.password at it."""
    if isinstance(server, Dovecot):
        server.start()
        cfg.port, cfg.user, cfg.password = cfg.dovecot_port, "bench", "bench"
    else:
        cfg.port, cfg.user, cfg.password = server.start()


def run_mixed_counts(cfg: argparse.Namespace, server: Server | None) -> list[dict[str, Any]]:
    """One mixed-load run per client count, each with its profiler and statistics."""
    results: list[dict[str, Any]] = []
    counts = [int(x) for x in cfg.client_list.split(",")] if cfg.client_list else [cfg.clients]
    agentpost = server if isinstance(server, AgentPost) else None
    if server is not None:
        cfg.cpu_probe = server.cpu
    if agentpost is not None:
        cfg.after_seed = agentpost.analyze
    for n in counts:
        cfg.clients = n
        spy = None
        if cfg.py_spy and agentpost is not None:
            spy = agentpost.start_py_spy(cfg.py_spy, n, cfg.duration + cfg.warmup + 10,
                                         gil=cfg.gil)
        if cfg.pg_stats and agentpost is not None:
            agentpost.pg_reset()
        res = asyncio.run(run_mixed(cfg))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        print_mixed(res)
        if cfg.pg_stats and agentpost is not None:
            print("\n-- pg_stat_statements, top by total time:\n" + agentpost.pg_report())
        results.append({"mode": "mixed", **res})
    return results


def run_all(cfg: argparse.Namespace, server: Server | None) -> list[dict[str, Any]]:
    if cfg.hold:
        time.sleep(cfg.hold)
    if cfg.append_only:
        res = asyncio.run(run_append(cfg, None, 1))
        print_append_only(res)
        return [{"mode": "append-only", **res}]
    if cfg.load is not None:
        res = asyncio.run(run_append(cfg, cfg.load, cfg.clients))
        print_load(res)
        return [{"mode": "load", **res}]
    return run_mixed_counts(cfg, server)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    cfg = p.parse_args(argv)
    if cfg.start_agentpost and cfg.start_dovecot:
        p.error("one server at a time")
    server: Server | None = None
    results: list[dict[str, Any]] = []
    try:
        server = make_server(cfg)  # assigned first, so that finally stops what started
        if server is not None:
            start_server(cfg, server)
        results = run_all(cfg, server)
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            server.stop()
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(results, indent=1))
    return 0
