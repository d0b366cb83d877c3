#!/usr/bin/env python3
"""WebSocket event stream: SMTP accept -> frame latency, and fan-out to 1,000 sockets.

Reuses bench/smtp_bench.py's harness (a throw-away PostgreSQL cluster, a real
``agentpost serve`` process, an owner key from ``agentpost bootstrap``), with
``[websocket] max_connections_per_key`` raised so one key may hold every socket.

1. Latency: one WebSocket; N messages sent one after another by SMTP to the MX; for
   each, the time from the 250 after DATA (accepted) to the event frame on the socket,
   and from the start of the SMTP transaction to the frame. p50/p99/max are printed.
2. Fan-out: C sockets (default 1,000) open on the same key; the server's RSS before and
   after gives memory per connection; then one message, and the time until every
   socket has its frame (first and last arrival).

The client is a tiny asyncio WebSocket reader (stdlib only, loopback only). Timing
never makes it fail; exit 1 only if setup failed or a frame never came.

Usage: ``.venv/bin/python bench/ws_bench.py [--messages 200] [--clients 1000]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import smtplib
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import smtp_bench

_write_config = smtp_bench.write_config


def write_config(path: Path, **kw: Any) -> None:
    """smtp_bench's config plus a per-key socket cap large enough for the fan-out."""
    _write_config(path, **kw)
    with open(path, "a") as f:
        f.write("\n[websocket]\nmax_connections_per_key = 5000\n")


smtp_bench.write_config = write_config


class Socket:
    """A minimal client: the upgrade, then unmasked server text frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, key: str) -> Socket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        nonce = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws?token={key} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                     .encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"upgrade refused: {head[:200]!r}")
        return cls(reader, writer)

    async def frame(self) -> dict[str, Any]:
        while True:
            b0, b1 = await self.reader.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await self.reader.readexactly(length)
            if b0 & 0x0F == 0x1:
                return json.loads(payload)
            if b0 & 0x0F == 0x9:  # ping: answer (masked, as a client must)
                mask = os.urandom(4)
                body = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
                self.writer.write(bytes([0x8A, 0x80 | len(payload)]) + mask + body)
            if b0 & 0x0F == 0x8:
                raise RuntimeError("closed by the server")

    def close(self) -> None:
        self.writer.close()


def send_mail(port: int, rcpt: str, n: int) -> tuple[float, float]:
    """One SMTP transaction; (start, accepted) perf_counter times."""
    start = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.test", timeout=30) as smtp:
        smtp.sendmail("bench@example.com", [rcpt],
                      f"From: bench@example.com\r\nTo: {rcpt}\r\nSubject: ws {n}\r\n"
                      f"Message-ID: <ws{n}.{time.time()}@bench>\r\n\r\nhello\r\n")
        accepted = time.perf_counter()
    return start, accepted


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def latency(h: Any, rcpt: str, messages: int) -> dict[str, float]:
    ws = await Socket.open(h.http_port, h.key)
    loop = asyncio.get_running_loop()
    after_accept, end_to_end = [], []
    for n in range(messages):
        sent = loop.run_in_executor(None, send_mail, h.mx_port, rcpt, n)
        await asyncio.wait_for(ws.frame(), 30)
        arrived = time.perf_counter()
        start, accepted = await sent
        after_accept.append(max(0.0, arrived - accepted) * 1000)
        end_to_end.append((arrived - start) * 1000)
    ws.close()
    return {"p50_after_250_ms": pct(after_accept, 50), "p99_after_250_ms": pct(after_accept, 99),
            "p50_from_connect_ms": pct(end_to_end, 50),
            "p99_from_connect_ms": pct(end_to_end, 99), "max_from_connect_ms": max(end_to_end),
            "mean_from_connect_ms": statistics.mean(end_to_end)}


async def fanout(h: Any, rcpt: str, clients: int) -> dict[str, float]:
    rss_before = smtp_bench.proc_status(h.server_pid).get("VmRSS", 0)
    sockets = []
    for start in range(0, clients, 100):
        sockets += await asyncio.gather(*[Socket.open(h.http_port, h.key)
                                          for _ in range(min(100, clients - start))])
    await asyncio.sleep(1.0)
    rss_after = smtp_bench.proc_status(h.server_pid).get("VmRSS", 0)
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []

    async def wait(s: Socket) -> None:
        await asyncio.wait_for(s.frame(), 60)
        arrivals.append(time.perf_counter())

    waiting = [asyncio.ensure_future(wait(s)) for s in sockets]
    _, accepted = await loop.run_in_executor(None, send_mail, h.mx_port, rcpt, -1)
    await asyncio.gather(*waiting)
    for s in sockets:
        s.close()
    return {"clients": clients, "first_ms": (min(arrivals) - accepted) * 1000,
            "all_ms": (max(arrivals) - accepted) * 1000,
            "rss_per_connection_kib": (rss_after - rss_before) / clients / 1024}


async def run(h: Any, args: argparse.Namespace) -> dict[str, Any]:
    inbox = await h.create_inbox("wsbench")
    return {"latency": await latency(h, inbox["email"], args.messages),
            "fanout": await fanout(h, inbox["email"], args.clients)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--clients", type=int, default=1000)
    args = parser.parse_args()
    h = smtp_bench.Harness("agentpost-wsbench-", "wsbench")
    try:
        h.start_postgres(fsync=True)
        h.start_server(pool_size=None, log_level="warn", starttls=False)
        report = asyncio.run(run(h, args))
    except Exception as exc:
        print(f"ws_bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        h.cleanup()
    lat, fan = report["latency"], report["fanout"]
    print(f"SMTP accept -> WebSocket frame ({args.messages} messages, one socket): "
          f"p50 {lat['p50_after_250_ms']:.1f} ms, p99 {lat['p99_after_250_ms']:.1f} ms after "
          f"the 250; from SMTP connect p50 {lat['p50_from_connect_ms']:.1f} ms, "
          f"p99 {lat['p99_from_connect_ms']:.1f} ms, max {lat['max_from_connect_ms']:.1f} ms")
    print(f"fan-out to {fan['clients']} sockets: first frame {fan['first_ms']:.1f} ms, "
          f"all {fan['all_ms']:.1f} ms after the 250; server RSS "
          f"{fan['rss_per_connection_kib']:.1f} KiB per connection")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
