"""The load: the random command mix each client runs (``Worker``), the seeding of the
mailboxes, and the mixed and APPEND runs."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import resource
import time
from typing import Any

from .report import Stats, summarize, summarize_append
from .session import ServerClosed, Session
from .wire import compact, parse_set, quote

KEYWORD_SETS = {
    "imap": ("$Forwarded", "$Label1", "$Label3", "$MDNSent", "NonJunk", "bench_custom", "Work2"),
    # only what the API's label rule accepts (lowercase...): shows what else goes wrong
    "api-safe": ("bench_custom", "work2", "label1"),
}
SYSTEM_FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "\\Draft")
FETCH_ITEMS = [
    ("FLAGS", ("FLAGS",)),
    ("(UID FLAGS)", ("UID", "FLAGS")),
    ("(FLAGS BODY.PEEK[HEADER])", ("FLAGS", "BODY[HEADER]")),
    ("(UID RFC822.SIZE ENVELOPE)", ("UID", "RFC822.SIZE", "ENVELOPE")),
    ("(BODY[])", ("BODY[]",)),
    ("(UID BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])",
     ("UID", "BODY[HEADER.FIELDS (FROM SUBJECT DATE)]")),
    ("(INTERNALDATE BODYSTRUCTURE)", ("INTERNALDATE", "BODYSTRUCTURE")),
    ("ENVELOPE", ("ENVELOPE",)),
]
SEARCHES = ("ALL", "UNSEEN", "FLAGGED", "DELETED", "KEYWORD $Forwarded", "KEYWORD $Label1",
            "UNKEYWORD bench_custom", "SUBJECT report", "FROM alice", "SINCE 1-Jan-2020",
            "LARGER 500", "OR SEEN FLAGGED", "NOT ANSWERED", "TEXT lorem")
MAILBOXES = ("INBOX", "bench-a", "bench-b")
WEIGHTS = {"select": 4, "fetch": 30, "store": 20, "expunge": 6, "append": 12, "copy": 4,
           "search": 8, "noop": 5, "idle": 1, "relogin": 1}


def make_message(rng: random.Random, n: int, to: str) -> bytes:
    who = rng.choice(("Alice Smith <alice@example.com>", "Bob Jones <bob@example.org>",
                      "Carol <carol@corp.example>", "\"Dave, D.\" <dave@example.net>"))
    subject = rng.choice(("quarterly report", "build failed", "meeting notes", "lunch?",
                          "invoice", "deploy schedule", "re: review request"))
    body_lines = [f"Line {i} lorem ipsum dolor sit amet {rng.random():.6f}"
                  for i in range(rng.randint(5, 60))]
    sent = time.gmtime(time.time() - rng.randint(0, 10**7))
    when = time.strftime("%a, %d %b %Y %H:%M:%S +0000", sent)
    msg = (f"From: {who}\r\nTo: {to}\r\nSubject: {subject} {n}\r\nDate: {when}\r\n"
           f"Message-ID: <{n}.{rng.getrandbits(48):x}@bench.example>\r\nMIME-Version: 1.0\r\n"
           f"Content-Type: text/plain; charset=utf-8\r\n\r\n" + "\r\n".join(body_lines) + "\r\n")
    return msg.encode()


class Worker:
    """One client of the mixed load: a Session and its random command mix."""

    def __init__(self, cfg: argparse.Namespace, stats: Stats, ident: int, deadline: float,
                 counter: list[int]) -> None:
        self.cfg = cfg
        self.stats = stats
        self.rng = random.Random(cfg.seed * 1000 + ident)
        self.ident = ident
        self.deadline = deadline
        self.s = Session(cfg, stats, self.rng, ident)
        self.counter = counter
        self.n = 0
        self.keywords = KEYWORD_SETS[cfg.keywords]

    def pick_set(self, uid: bool, size: int = 3) -> str | None:
        s = self.s
        count = len(s.uids)
        if count == 0:
            return None
        if uid:
            known = s.known_uids()
            if not known:
                return None
            start = self.rng.randrange(len(known))
            return compact(known[start:start + self.rng.randint(1, size)])
        start = self.rng.randint(1, count)
        end = min(count, start + self.rng.randint(0, size - 1))
        return str(start) if start == end else f"{start}:{end}"

    def targets(self, seqset: str, uid: bool) -> list[int]:
        """Sequence numbers a set addresses in the view *now* (after the command: no
        EXPUNGE may renumber during FETCH/STORE without UID)."""
        if uid:
            want = set(parse_set(seqset))
            return [i + 1 for i, x in enumerate(self.s.uids) if x in want]
        lo, _, hi = seqset.partition(":")
        return list(range(int(lo), int(hi or lo) + 1))

    async def run(self) -> None:
        while time.monotonic() < self.deadline:
            try:
                if self.s.writer is None:
                    await self.s.login()
                    await self.s.select(self.rng.choice(MAILBOXES), False)
                await self.step()
            except (OSError, asyncio.IncompleteReadError, ServerClosed, TimeoutError,
                    asyncio.LimitOverrunError) as exc:
                self.s.transcript.append(f"!! {type(exc).__name__}: {exc}")
                if time.monotonic() < self.deadline:
                    self.s.err("connection")
                self.s.close()
                await asyncio.sleep(0.05)
        if self.s.writer is not None:
            await self.s.logout()

    def weights(self) -> dict[str, int]:
        s = self.s
        count = len(s.uids)
        weights = dict(WEIGHTS)
        if s.readonly:
            for k in ("store", "expunge"):
                weights[k] = 0
        if s.selected is None:  # a strict client sends no selected-state command
            for k in ("fetch", "store", "expunge", "copy", "search"):
                weights[k] = 0
        if count > self.cfg.max_messages:
            weights["append"] = 1
            weights["expunge"] *= 3
        elif count < self.cfg.max_messages // 4:
            weights["append"] *= 3
        return weights

    async def step(self) -> None:
        weights = self.weights()
        op = self.rng.choices(list(weights), list(weights.values()))[0]
        uid = self.rng.random() < 0.5
        handler = getattr(self, f"op_{op}")
        if await handler(uid):
            self.counter[0] += 1

    # one method per kind of step; False when it fell back to a NOOP -----------------
    async def _noop(self) -> bool:
        await self.s.run_checked("NOOP")
        return False

    async def op_select(self, uid: bool) -> bool:
        await self.s.select(self.rng.choice(MAILBOXES), self.rng.random() < 0.25)
        return True

    async def op_fetch(self, uid: bool) -> bool:
        s = self.s
        seqset = self.pick_set(uid, 8)
        if seqset is None:
            return await self._noop()
        items, expect = self.rng.choice(FETCH_ITEMS)
        u = "UID " if uid else ""
        r = await s.run_checked(f"{u}FETCH {seqset} {items}")
        if uid and r.status == "OK":
            for keys in s._last_fetch.values():
                if "UID" not in keys and not ({"FLAGS"} >= keys):
                    s.err("malformed: UID FETCH without UID")
                    break
        if r.status == "OK":
            wanted = set(expect)
            for n in self.targets(seqset, uid):
                got = s._last_fetch.get(s.key(n), set()) | s._last_fetch.get(("s", n), set())
                if not wanted <= got:
                    s.transcript.append(f"   (client: seq {n} uid {s.uids[n - 1]} lacks "
                                        f"{sorted(wanted - got)})")
                    s.err("FETCH incomplete")
                    break
        return True

    async def op_store(self, uid: bool) -> bool:
        s, rng = self.s, self.rng
        seqset = self.pick_set(uid, 3)
        if seqset is None:
            return await self._noop()
        mode = rng.choice(("+", "+", "-", ""))
        pool = list(SYSTEM_FLAGS) + list(self.keywords)
        flags = rng.sample(pool, rng.randint(1, 3))
        if rng.random() < 0.12 and mode != "-":
            flags.append("\\Deleted")
        silent = rng.random() < 0.25
        u = "UID " if uid else ""
        r = await s.run_checked(
            f"{u}STORE {seqset} {mode}FLAGS{'.SILENT' if silent else ''} ({' '.join(flags)})")
        if r.status == "OK" and not silent and mode:
            lowered = {f.lower() for f in flags}
            for n in self.targets(seqset, uid):
                have = s._cmd_flags.get(s.key(n), s._cmd_flags.get(("s", n)))
                if have is None:
                    continue
                if (mode == "+" and not lowered <= have) or (mode == "-" and lowered & have):
                    s.err("STORE result differs (concurrent change?)", tolerated=True)
                    break
        return True

    async def op_expunge(self, uid: bool) -> bool:
        if uid and "UIDPLUS" in self.s.caps:
            seqset = self.pick_set(True, 5)
            if seqset is None:
                return await self._noop()
            await self.s.run_checked(f"UID EXPUNGE {seqset}")
        else:
            await self.s.run_checked("EXPUNGE")
        return True

    async def op_append(self, uid: bool) -> bool:
        rng = self.rng
        box = rng.choice(MAILBOXES)
        flags = rng.sample(list(SYSTEM_FLAGS) + list(self.keywords), rng.randint(0, 3))
        self.n += 1
        msg = make_message(rng, self.ident * 1_000_000 + self.n, self.cfg.user)
        fl = f" ({' '.join(flags)})" if flags else ""
        await self.s.run_checked(f"APPEND {quote(box)}{fl}", name="APPEND", literal=msg)
        return True

    async def op_copy(self, uid: bool) -> bool:
        s, rng = self.s, self.rng
        seqset = self.pick_set(uid, 3)
        if seqset is None:
            return await self._noop()
        dest = rng.choice([b for b in MAILBOXES if b != s.selected])
        move = "MOVE" in s.caps and not s.readonly and rng.random() < 0.5
        verb = "MOVE" if move else "COPY"
        u = "UID " if uid else ""
        await s.run_checked(f"{u}{verb} {seqset} {quote(dest)}")
        return True

    async def op_search(self, uid: bool) -> bool:
        u = "UID " if uid else ""
        await self.s.run_checked(f"{u}SEARCH {self.rng.choice(SEARCHES)}")
        return True

    async def op_noop(self, uid: bool) -> bool:
        await self.s.run_checked("NOOP")
        return True

    async def op_idle(self, uid: bool) -> bool:
        if "IDLE" in self.s.caps:
            await self.s.run_checked("IDLE", idle=0.2)
        else:
            await self.s.run_checked("NOOP")
        return True

    async def op_relogin(self, uid: bool) -> bool:
        await self.s.logout()
        await self.s.login()
        await self.s.select(self.rng.choice(MAILBOXES), False)
        return True


async def prepare(cfg: argparse.Namespace) -> None:
    """Create the mailboxes and seed each with --seed-messages messages."""
    s = Session(cfg, Stats(), random.Random(1), -1)
    await s.login()
    for box in MAILBOXES[1:]:
        await s.command(f"CREATE {quote(box)}")
    rng = random.Random(7)
    for box in MAILBOXES:
        r = await s.command(f"STATUS {quote(box)} (MESSAGES)")
        have = 0
        for segs, _ in r.untagged:
            m = re.search(rb"MESSAGES (\d+)", segs[0])
            if m:
                have = int(m.group(1))
        for i in range(max(0, cfg.seed_messages - have)):
            flags = rng.sample(list(SYSTEM_FLAGS), rng.randint(0, 2))  # keywords: in the run
            fl = f" ({' '.join(flags)})" if flags else ""
            r = await s.command(f"APPEND {quote(box)}{fl}", name="APPEND",
                                literal=make_message(rng, i, cfg.user))
            if r.status != "OK":
                raise SystemExit(f"seeding {box}: APPEND {r.status} {r.text}")
    await s.logout()


async def run_mixed(cfg: argparse.Namespace) -> dict[str, Any]:
    await prepare(cfg)
    after_seed = getattr(cfg, "after_seed", None)  # e.g. ANALYZE on a started server
    if after_seed is not None:
        after_seed()
    stats = Stats()
    counter = [0]
    start = time.monotonic()
    deadline = start + cfg.warmup + cfg.duration
    workers = [Worker(cfg, stats, i, deadline, counter) for i in range(cfg.clients)]
    tasks = [asyncio.ensure_future(w.run()) for w in workers]
    await asyncio.sleep(cfg.warmup)
    probe = getattr(cfg, "cpu_probe", None)  # the started server's CPU seconds, if any
    cpu0 = {**(probe() if probe else {}), "client": self_cpu()}
    stats.measuring = True
    t0 = time.perf_counter()
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    elapsed = time.perf_counter() - t0
    stats.measuring = False
    cpu1 = {**(probe() if probe else {}), "client": self_cpu()}
    load = os.getloadavg()
    await asyncio.wait(tasks, timeout=cfg.timeout + 5)
    for t in tasks:
        t.cancel()
    res = summarize(cfg, stats, elapsed)
    res["cpu_s"] = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0}
    res["loadavg"] = [round(x, 2) for x in load]
    return res


def self_cpu() -> float:
    """CPU seconds this load generator has used (it shares the machine's cores)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_append(cfg: argparse.Namespace, messages: int | None,
                     clients: int) -> dict[str, Any]:
    """Sequential APPENDs (one at a time per connection) for --duration seconds, or until
    ``messages`` are stored over ``clients`` connections."""
    stats = Stats(measuring=True)
    sessions = [Session(cfg, stats, random.Random(i), i) for i in range(clients)]
    for s in sessions:
        await s.login()
    rng = random.Random(3)
    pool = [make_message(rng, i, cfg.user) for i in range(500)]
    done = [0]
    t0 = time.perf_counter()
    stop_at = time.monotonic() + cfg.duration

    async def one(s: Session) -> None:
        while True:
            if messages is not None:
                if done[0] >= messages:
                    return
            elif time.monotonic() >= stop_at:
                return
            done[0] += 1
            r = await s.command(f"APPEND {quote(cfg.append_mailbox)}", name="APPEND",
                                literal=pool[done[0] % len(pool)])
            if r.status != "OK":
                raise SystemExit(f"APPEND {r.status} {r.text}")

    await asyncio.gather(*(one(s) for s in sessions))
    elapsed = time.perf_counter() - t0
    for s in sessions:
        await s.logout()
    return summarize_append(cfg, stats, clients, elapsed)
