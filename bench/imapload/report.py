"""Statistics the sessions fill, the JSON-ready summary of a run and the printed report."""

from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import dataclass, field
from typing import Any


def log(message: str) -> None:
    print(f"[imap_mixed] {message}", file=sys.stderr, flush=True)


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list))
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    tolerated: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    measuring: bool = False

    def record(self, name: str, seconds: float, status: str) -> None:
        if self.measuring:
            self.latencies[name].append(seconds)
            self.statuses[f"{name} {status}"] += 1

    def error(self, kind: str, transcript: list[str], *, tolerated: bool = False) -> None:
        counter = self.tolerated if tolerated else self.errors
        counter[kind] += 1
        if len(self.samples[kind]) < 3:
            self.samples[kind].append("\n".join(transcript[-14:]))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def summarize(cfg: argparse.Namespace, stats: Stats, elapsed: float) -> dict[str, Any]:
    commands = {}
    total = 0
    for name, values in sorted(stats.latencies.items()):
        total += len(values)
        commands[name] = {
            "count": len(values), "per_s": len(values) / elapsed,
            "p50_ms": pct(values, 50) * 1000, "p95_ms": pct(values, 95) * 1000,
            "avg_ms": sum(values) / len(values) * 1000,
            "no": stats.statuses.get(f"{name} NO", 0),
            "bad": stats.statuses.get(f"{name} BAD", 0),
        }
    return {"server": f"{cfg.host}:{cfg.port}", "clients": cfg.clients, "seconds": elapsed,
            "commands": commands, "completed": total, "completed_per_s": total / elapsed,
            "protocol_errors": sum(stats.errors.values()), "errors": dict(stats.errors),
            "tolerated": dict(stats.tolerated), "samples": dict(stats.samples)}


def summarize_append(cfg: argparse.Namespace, stats: Stats, clients: int,
                     elapsed: float) -> dict[str, Any]:
    values = stats.latencies["APPEND"]
    return {"server": f"{cfg.host}:{cfg.port}", "clients": clients, "messages": len(values),
            "seconds": elapsed, "per_s": len(values) / elapsed,
            "p50_ms": pct(values, 50) * 1000, "p95_ms": pct(values, 95) * 1000,
            "protocol_errors": sum(stats.errors.values()), "errors": dict(stats.errors)}


def print_mixed(res: dict[str, Any]) -> None:
    print(f"\n== mixed load: {res['clients']} clients, {res['seconds']:.1f} s "
          f"against {res['server']}")
    print(f"{'command':<14}{'count':>8}{'/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'avg ms':>9}"
          f"{'NO':>6}{'BAD':>6}")
    for name, c in res["commands"].items():
        print(f"{name:<14}{c['count']:>8}{c['per_s']:>8.1f}{c['p50_ms']:>9.1f}{c['p95_ms']:>9.1f}"
              f"{c['avg_ms']:>9.1f}{c['no']:>6}{c['bad']:>6}")
    print(f"completed commands: {res['completed']} ({res['completed_per_s']:.1f}/s)")
    print(f"protocol errors: {res['protocol_errors']}")
    cpu, done = res.get("cpu_s") or {}, max(1, res["completed"])
    if cpu:
        print("CPU seconds in the window (ms per completed command): " + ", ".join(
            f"{k} {v:.1f} ({1000 * v / done:.2f})" for k, v in cpu.items()))
    if res.get("loadavg"):
        print("load average at the end: " + " ".join(f"{x:.2f}" for x in res["loadavg"]))
    for kind, n in sorted(res["errors"].items(), key=lambda kv: -kv[1]):
        print(f"  {n:>6}  {kind}")
    if res["tolerated"]:
        print("tolerated (not counted):")
        for kind, n in res["tolerated"].items():
            print(f"  {n:>6}  {kind}")
    for kind, samples in res["samples"].items():
        print(f"\n--- sample transcript: {kind}")
        print(samples[0])


def print_append_only(res: dict[str, Any]) -> None:
    print(f"\n== APPEND, one client, sequential: {res['messages']} in {res['seconds']:.1f} s "
          f"= {res['per_s']:.1f}/s, p50 {res['p50_ms']:.1f} ms, p95 {res['p95_ms']:.1f} ms")


def print_load(res: dict[str, Any]) -> None:
    print(f"\n== load: {res['messages']} messages over {res['clients']} clients in "
          f"{res['seconds']:.1f} s = {res['per_s']:.1f}/s")
