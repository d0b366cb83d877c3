"""The strict IMAP client: one connection, its view of the selected mailbox, and the
protocol errors it counts (see bench/imap_mixed.py's docstring for the kinds)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import random
import re
import ssl
import time
from dataclasses import dataclass
from typing import Any

from .report import Stats
from .wire import LITERAL_AT_END, ParseFailure, compact, parse_set, quote, tokenize

EXPUNGE_BREAKERS = ("FETCH", "STORE", "SEARCH")  # RFC 3501 §7.4.1, without UID
MUST_NOT_NO = {"FETCH", "STORE", "COPY", "MOVE", "EXPUNGE", "APPEND", "SELECT", "EXAMINE",
               "SEARCH", "NOOP", "UID FETCH", "UID STORE", "UID COPY", "UID MOVE",
               "UID EXPUNGE", "UID SEARCH", "IDLE", "LOGIN", "CLOSE", "CHECK", "STATUS",
               "LIST", "LOGOUT"}
_NUMBERED = re.compile(rb"\* (\d+) (EXISTS|RECENT|EXPUNGE|FETCH)\b", re.I)
_OTHER_UNTAGGED = re.compile(
    rb"\* (OK|NO|BAD|PREAUTH|FLAGS|LIST|LSUB|STATUS|CAPABILITY|ENABLED|ID|"
    rb"NAMESPACE|QUOTA|QUOTAROOT|THREAD)\b", re.I)

Untagged = list[tuple[list[bytes], list[bytes]]]


class ServerClosed(ConnectionError):
    pass


@dataclass
class Reply:
    name: str
    status: str
    text: str
    untagged: Untagged
    seconds: float


def command_name(text: str) -> str:
    words = text.split()
    name = " ".join(words[:2]) if words[0].upper() == "UID" else words[0]
    return name.upper()


class Session:
    """One strict IMAP connection."""

    def __init__(self, cfg: argparse.Namespace, stats: Stats, rng: random.Random, ident: int):
        self.cfg = cfg
        self.stats = stats
        self.rng = rng
        self.ident = ident
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.tag = 0
        self.caps: set[str] = set()
        self.transcript: collections.deque[str] = collections.deque(maxlen=40)
        self.selected: str | None = None
        self.readonly = False
        self.uids: list[int | None] = []  # index = seq - 1
        self.flags: dict[int, set[str]] = {}  # by UID, as last reported
        self.bye = False
        self.current: str = ""
        self.qresync = False
        self._last_fetch: dict[Any, set[str]] = {}
        self._cmd_flags: dict[Any, set[str]] = {}  # seq -> FLAGS reported during this command

    # transport ---------------------------------------------------------------------
    def _note(self, who: str, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        if len(text) > 300:
            text = text[:300] + f"...(+{len(text) - 300})"
        self.transcript.append(f"{who}: {text}")

    def err(self, kind: str, tolerated: bool = False) -> None:
        self.stats.error(kind, [f"[client {self.ident}]", *self.transcript], tolerated=tolerated)

    def _learn_caps(self, reply: Reply) -> None:
        for segs, _ in reply.untagged:
            if segs[0].upper().startswith(b"* CAPABILITY"):
                self.caps = set(segs[0].decode().upper().split()[2:])

    async def connect(self) -> None:
        ctx = None
        if self.cfg.tls or self.cfg.starttls:
            ctx = ssl.create_default_context(cafile=self.cfg.cafile)
            if self.cfg.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        self.reader, self.writer = await asyncio.open_connection(
            self.cfg.host, self.cfg.port, ssl=ctx if self.cfg.tls else None, limit=1 << 24)
        greeting, _ = await self._read_response()
        if not greeting[0].startswith(b"* OK"):
            raise ServerClosed(f"greeting {greeting[0][:100]!r}")
        if self.cfg.starttls:
            r = await self.command("STARTTLS")
            if r.status != "OK":
                raise ServerClosed("STARTTLS refused")
            await self.writer.start_tls(ctx)
        self._learn_caps(await self.command("CAPABILITY"))

    async def login(self) -> None:
        await self.connect()
        r = await self.command(f"LOGIN {quote(self.cfg.user)} {quote(self.cfg.password)}",
                               name="LOGIN")
        if r.status != "OK":
            raise ServerClosed(f"LOGIN {r.status} {r.text}")
        self._learn_caps(await self.command("CAPABILITY"))

    async def _read_response(self) -> tuple[list[bytes], list[bytes]]:
        assert self.reader is not None
        segments: list[bytes] = []
        literals: list[bytes] = []
        while True:
            line = await self.reader.readuntil(b"\r\n")
            line = line[:-2]
            segments.append(line)
            m = LITERAL_AT_END.search(line)
            if m:
                data = await self.reader.readexactly(int(m.group(1)))
                literals.append(data)
                continue
            break
        if not literals:
            self._note("S", b" ".join(segments))
        else:
            self._note("S", b"".join(
                s + (b"<%d octets> " % len(literals[i]) if i < len(literals) else b"")
                for i, s in enumerate(segments)))
        return segments, literals

    def _write(self, data: bytes) -> None:
        assert self.writer is not None
        self._note("C", data.rstrip(b"\r\n"))
        self.writer.write(data)

    async def _send_literal(self, tag: str, text: str, name: str, literal: bytes, t0: float,
                            untagged: Untagged) -> Reply | None:
        """Send a command with one trailing literal; a Reply if the server completes the
        command instead of asking for the literal (synchronising literals only)."""
        assert self.writer is not None
        plus = "LITERAL+" in self.caps
        self._write(f"{tag} {text} {{{len(literal)}{'+' if plus else ''}}}\r\n".encode())
        if not plus:
            await self.writer.drain()
            while True:
                segs, lits = await self._read_response()
                if segs[0].startswith(b"+"):
                    break
                if segs[0].startswith(tag.encode() + b" "):
                    return self._tagged(name, tag, segs, t0, untagged)
                self._untagged(segs, lits, untagged)
        self.writer.write(literal + b"\r\n")
        self._note("C", b"<%d octets>" % len(literal))
        return None

    async def command(self, text: str, *, name: str | None = None, literal: bytes | None = None,
                      idle: float = 0.0) -> Reply:
        """Send one command (optionally with one trailing literal), read to its tagged
        completion, checking every untagged response against the view."""
        if name is None:
            name = command_name(text)
        self.current = name
        self._last_fetch = {}
        self._cmd_flags = {}
        self.tag += 1
        tag = f"a{self.tag}"
        t0 = time.perf_counter()
        untagged: Untagged = []
        if literal is not None:
            early = await self._send_literal(tag, text, name, literal, t0, untagged)
            if early is not None:
                return early
        else:
            self._write(f"{tag} {text}\r\n".encode())
        await self.writer.drain()  # type: ignore[union-attr]
        async with asyncio.timeout(self.cfg.timeout):
            while True:
                segs, lits = await self._read_response()
                first = segs[0]
                if first.startswith(b"+") and idle:
                    await asyncio.sleep(idle)
                    self._write(b"DONE\r\n")
                    continue
                if first.startswith(b"* "):
                    self._untagged(segs, lits, untagged)
                    continue
                if first.startswith(tag.encode() + b" "):
                    return self._tagged(name, tag, segs, t0, untagged)
                if first.startswith(b"+"):
                    self.err("malformed: unexpected continuation")
                    continue
                self.err("malformed: unknown tag or garbage")
        raise AssertionError("unreachable")

    def _tagged(self, name: str, tag: str, segs: list[bytes], t0: float,
                untagged: Untagged) -> Reply:
        seconds = time.perf_counter() - t0
        rest = segs[0][len(tag) + 1:].decode("utf-8", "replace")
        status, _, text = rest.partition(" ")
        status = status.upper()
        if status not in ("OK", "NO", "BAD"):
            self.err("malformed: tagged status")
        self.stats.record(name, seconds, status)
        if status == "BAD":
            self.err(f"BAD {name}")
        elif status == "NO" and name in MUST_NOT_NO:
            code = re.match(r"\[([A-Z-]+)", text)
            code_s = f" [{code.group(1)}]" if code else ""
            if code and code.group(1) == "EXPUNGEISSUED":
                self.err(f"NO {name}{code_s}", tolerated=True)
            else:
                self.err(f"NO {name}{code_s}")
        self.current = ""
        return Reply(name, status, text, untagged, seconds)

    # untagged bookkeeping -----------------------------------------------------------
    def _untagged(self, segs: list[bytes], lits: list[bytes], untagged: Untagged) -> None:
        untagged.append((segs, lits))
        first = segs[0]
        if self.bye and self.current == "LOGOUT":
            self.err("data after BYE")
        m = _NUMBERED.match(first)
        if m:
            self._numbered(int(m.group(1)), m.group(2).upper(), segs, lits)
        elif re.match(rb"\* VANISHED ", first, re.I):
            self._vanished(first)
        elif re.match(rb"\* BYE", first, re.I):
            self.bye = True
        elif re.match(rb"\* (SEARCH|ESEARCH|SORT)\b", first, re.I):
            self._search_response(first)
        elif _OTHER_UNTAGGED.match(first):
            if re.match(rb"\* BAD", first, re.I):
                self.err("untagged BAD")
        else:
            self.err("malformed: unknown untagged response")

    def _numbered(self, n: int, kind: bytes, segs: list[bytes], lits: list[bytes]) -> None:
        """``* n EXISTS``, ``* n RECENT``, ``* n EXPUNGE`` and ``* n FETCH``."""
        if kind == b"EXISTS":
            if n < len(self.uids):
                self.err("EXISTS decreased")
                del self.uids[n:]
            else:
                self.uids.extend([None] * (n - len(self.uids)))
        elif kind == b"EXPUNGE":
            if self.current in EXPUNGE_BREAKERS:
                self.err(f"EXPUNGE during {self.current}")
            if not 1 <= n <= len(self.uids):
                self.err("EXPUNGE out of range")
                return
            uid = self.uids.pop(n - 1)
            if uid is not None:
                self.flags.pop(uid, None)
        elif kind == b"FETCH":
            self._fetch_response(n, segs, lits)

    def _vanished(self, first: bytes) -> None:
        earlier = b"(EARLIER)" in first.upper()
        if not earlier and self.current in EXPUNGE_BREAKERS:
            self.err(f"EXPUNGE during {self.current}")
        try:
            gone = set(parse_set(first.split()[-1].decode()))
        except ValueError:
            self.err("malformed: VANISHED")
            return
        if not earlier:
            self.uids = [u for u in self.uids if u not in gone]

    def _search_response(self, first: bytes) -> None:
        nums = first.split()[2:]
        if first.upper().startswith(b"* SEARCH") and not self.current.startswith("UID"):
            try:
                values = [int(x) for x in nums if not x.startswith(b"(")]
            except ValueError:
                self.err("malformed: SEARCH")
                return
            if any(not 1 <= v <= len(self.uids) for v in values):
                self.err("SEARCH out of range")

    def _fetch_pairs(self, segs: list[bytes], lits: list[bytes]) -> dict[str, Any] | None:
        """The items of a FETCH response by upper-case name, or None (error counted)."""
        try:
            tokens = tokenize(segs, lits)
            items = tokens[3]
            if not isinstance(items, list) or len(items) % 2:
                raise ParseFailure("FETCH items are not a list of pairs")
        except (ParseFailure, IndexError) as exc:
            self.err("malformed: FETCH")
            self.transcript.append(f"   ({exc})")
            return None
        pairs: dict[str, Any] = {}
        for i in range(0, len(items), 2):
            key = items[i]
            if not isinstance(key, bytes):
                self.err("malformed: FETCH key")
                return None
            k = key.decode().upper()
            k = re.sub(r"<\d+>$", "", k)
            pairs[k] = items[i + 1]
        return pairs

    def _fetch_response(self, n: int, segs: list[bytes], lits: list[bytes]) -> None:
        if not 1 <= n <= len(self.uids):
            self.err("FETCH out of range")
            return
        pairs = self._fetch_pairs(segs, lits)
        if pairs is None:
            return
        if "UID" in pairs:
            try:
                uid = int(pairs["UID"])
            except (TypeError, ValueError):
                self.err("malformed: FETCH UID")
                return
            known = self.uids[n - 1]
            if known is not None and known != uid:
                self.err("UID changed")
            self.uids[n - 1] = uid
        if "FLAGS" in pairs:
            self._fetched_flags(n, pairs["FLAGS"])
        if "ENVELOPE" in pairs:
            env = pairs["ENVELOPE"]
            if not isinstance(env, list) or len(env) != 10:
                self.err("malformed: ENVELOPE")
        self._last_fetch.setdefault(self.key(n), set()).update(pairs)

    def _fetched_flags(self, n: int, flags: Any) -> None:
        if not isinstance(flags, list) or not all(isinstance(f, bytes) for f in flags):
            self.err("malformed: FLAGS")
        else:
            self._cmd_flags[self.key(n)] = {f.decode().lower() for f in flags}
        uid = self.uids[n - 1]
        if isinstance(flags, list) and uid is not None:
            self.flags[uid] = {f.decode().lower() for f in flags}

    def key(self, n: int) -> Any:
        """What a FETCH response is about: its UID when known, else its number."""
        uid = self.uids[n - 1] if 1 <= n <= len(self.uids) else None
        return ("s", n) if uid is None else ("u", uid)

    # helpers ----------------------------------------------------------------------
    def known_uids(self) -> list[int]:
        return [u for u in self.uids if u is not None]

    async def run_checked(self, text: str, *, name: str | None = None,
                          literal: bytes | None = None, idle: float = 0.0) -> Reply:
        return await self.command(text, name=name, literal=literal, idle=idle)

    async def select(self, mailbox: str, readonly: bool) -> None:
        verb = "EXAMINE" if readonly else "SELECT"
        self.uids = []
        self.flags = {}
        self.selected = None
        r = await self.run_checked(f"{verb} {quote(mailbox)}")
        if r.status != "OK":
            return
        self.selected = mailbox
        self.readonly = readonly or "[READ-ONLY]" in r.text.upper()
        if not any(re.match(rb"\* \d+ EXISTS", s[0]) for s, _ in r.untagged):
            self.err("malformed: SELECT without EXISTS")
        if self.uids:
            before = len(self.uids)
            r2 = await self.run_checked("FETCH 1:* (UID FLAGS)")
            if r2.status == "OK":
                missing = [i + 1 for i, u in enumerate(self.uids[:before]) if u is None]
                if missing:
                    self.transcript.append(f"   (client: no FETCH for seq {compact(missing)} "
                                           f"of {before} in view)")
                    self.err("FETCH incomplete")

    async def logout(self) -> None:
        self.bye = False
        with contextlib.suppress(Exception):
            r = await self.run_checked("LOGOUT")
            if not self.bye and r.status == "OK":
                self.err("malformed: LOGOUT without BYE")
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        self.writer = self.reader = None
        self.selected = None
        self.uids = []
