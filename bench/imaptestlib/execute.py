"""Running one parsed test against a server account, the way imaptest does.

Set-up per connection: greeting, LOGIN, CAPABILITY (skip the test when a required
capability is missing), LIST/LSUB of ``<mailbox>*`` with DELETE/UNSUBSCRIBE of what is
found (state ``auth``), CREATE unless the mailbox is INBOX (``created``), APPEND of the
messages from the mbox with their From_ dates (``appended``), SELECT on every connection
(``selected``). Then each command group is sent on its connection and only that
connection is read until every command of the group has its tagged reply. Every untagged
reply is matched against the group's expectations that are not yet found (one reply may
satisfy several); ``!`` expectations must not match; at the end every ``*`` expectation
must have matched. Failures are recorded per group and the test goes on, as imaptest does.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from dataclasses import dataclass, field

from .args import ATOM, LIST, Arg, render, tokenize
from .client import Closed, Conn, MboxSource, Response
from .match import FULL, Vars
from .script import MUST, MUST_NOT, Group, Test

_LIT = re.compile(r"(~?)\{(\d+)(\+?)\}\r\n")


@dataclass
class Failure:
    group: int
    line: int
    command: str
    message: str


@dataclass
class Result:
    name: str
    status: str = "PASS"          # PASS, FAIL, SKIP
    reason: str = ""
    groups: int = 0
    failures: list[Failure] = field(default_factory=list)
    fail_count: int = 0
    extension: bool = False


@dataclass
class Account:
    host: str
    port: int
    user: str
    password: str
    mailbox: str = "INBOX"


class Abort(Exception):
    pass


def quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mailbox_url(name: str) -> str:
    return urllib.parse.quote(name, safe="!$&'()*+,;=:@")


class Runner:
    def __init__(self, test: Test, acct: Account, timeout: float = 15.0,
                 default_messages: int | None = None) -> None:
        self.t, self.acct, self.timeout = test, acct, timeout
        self.res = Result(test.name, extension=test.capabilities is not None)
        self.v = Vars()
        self.source = MboxSource(test.mbox)
        self.conns: list[Conn] = []
        self.gi = 0
        self.messages = test.messages if test.messages is not None else default_messages

    # -- failures ---------------------------------------------------------------------
    def fail(self, msg: str, group: Group | None = None) -> None:
        line, cmd = 0, "(set-up)"
        if group is not None:
            c = group.commands[0] if group.commands else None
            line, cmd = (c.line, c.text) if c else (group.untagged[0].line, "(greeting)")
        self.res.fail_count += 1
        self.res.failures.append(Failure(self.gi + 1, line, cmd, msg))
        self.res.status = "FAIL"

    # -- set-up -----------------------------------------------------------------------
    def simple(self, conn: Conn, command: str, ok_no: bool = False) -> Response:
        tag = conn.new_tag()
        conn.send(f"{tag} {command}\r\n".encode("latin-1"))
        while True:
            r = conn.read(self.timeout)
            if r.kind == "tagged" and r.tag == tag:
                status = (r.args[0].atom or "").upper() if r.args else ""
                if status != "OK" and not (ok_no and status == "NO"):
                    raise Abort(f"{command.split(' ')[0]} failed: {r.text}")
                return r

    def collect(self, conn: Conn, command: str) -> list[Response]:
        tag = conn.new_tag()
        conn.send(f"{tag} {command}\r\n".encode("latin-1"))
        out = []
        while True:
            r = conn.read(self.timeout)
            if r.kind == "tagged" and r.tag == tag:
                if (r.args[0].atom or "").upper() != "OK":
                    raise Abort(f"{command} failed: {r.text}")
                return out
            out.append(r)

    def append_head(self, tag: str, args: str | None) -> tuple[bytes, bytes]:
        body, date = self.source.next()
        head = f"{tag} APPEND {args}" if args is not None else \
            f"{tag} APPEND {quote(self.acct.mailbox)} {quote(date)}"
        return f"{head} {{{len(body)}}}\r\n".encode("latin-1"), body + b"\r\n"

    def setup(self) -> bool:
        t, a = self.t, self.acct
        for i in range(t.connections):
            self.conns.append(Conn(a.host, a.port, i + 1, self.timeout))
        for c in self.conns:
            greeting = c.read(self.timeout)
            if t.banner_check and c is self.conns[0]:
                self.check_banner(greeting)
        for i, _conn in enumerate(self.conns):
            suffix = "" if i == 0 else str(i + 1)
            self.v.values["user" + suffix] = a.user
            self.v.values["username" + suffix] = a.user.split("@")[0]
            self.v.values["domain" + suffix] = a.user.split("@")[1] if "@" in a.user else a.host
            self.v.values["password" + suffix] = a.password
        self.v.values["mailbox"] = a.mailbox
        self.v.values["mailbox_url"] = _mailbox_url(a.mailbox)
        if t.state == "nonauth":
            c = self.conns[0]
            if not c.caps:
                self.simple(c, "CAPABILITY")
            return self.have_caps(c)
        for c in self.conns:
            self.simple(c, f"LOGIN {quote(a.user)} {quote(a.password)}")
        first = self.conns[0]
        self.simple(first, "CAPABILITY")
        if not self.have_caps(first):
            return False
        mask = quote(a.mailbox + "*")
        boxes, subs = [], []
        for r in self.collect(first, f'LIST "" {mask}'):
            if r.args and (r.args[0].atom or "").upper() == "LIST" and len(r.args) > 3:
                boxes.append(r.args[3].astring or "")
        for r in self.collect(first, f'LSUB "" {mask}'):
            if r.args and (r.args[0].atom or "").upper() == "LSUB" and len(r.args) > 3:
                subs.append(r.args[3].astring or "")
        for b in sorted(boxes, key=str.lower, reverse=True):
            self.simple(first, f"DELETE {quote(b)}", ok_no=True)
        for b in sorted(subs, key=str.lower, reverse=True):
            self.simple(first, f"UNSUBSCRIBE {quote(b)}", ok_no=True)
        if t.state == "auth":
            return True
        if a.mailbox.upper() != "INBOX":
            self.simple(first, f"CREATE {quote(a.mailbox)}")
        if t.state == "created":
            return True
        left = self.messages
        while (left is None and not self.source.eof()) or (left is not None and left > 0):
            tag = first.new_tag()
            head, body = self.append_head(tag, None)
            first.send(head)
            while True:
                r = first.read(self.timeout)
                if r.kind == "+":
                    first.send(body)
                elif r.kind == "tagged" and r.tag == tag:
                    if (r.args[0].atom or "").upper() != "OK":
                        raise Abort(f"APPEND failed: {r.text}")
                    break
            left = None if left is None else left - 1
        if t.state == "appended":
            return True
        for c in self.conns:
            self.simple(c, f"SELECT {quote(a.mailbox)}")
        return True

    def have_caps(self, c: Conn) -> bool:
        have = {x.upper() for x in c.caps}
        missing = [x for x in (self.t.capabilities or []) if x.upper() not in have]
        if missing:
            self.res.status, self.res.reason = "SKIP", "missing capability " + " ".join(missing)
            return False
        return True

    def check_banner(self, greeting: Response) -> None:
        g = self.t.groups[0]
        self.begin(g, self.conns[0])
        self.on_untagged(self.conns[0], greeting, g)
        self.finish(g)
        self.gi = 1

    # -- groups -----------------------------------------------------------------------
    def begin(self, g: Group, conn: Conn) -> None:
        self.found = [False] * len(g.untagged)
        self.best: list[tuple[int, str]] = [(0, "")] * len(g.untagged)
        self.mismatches = 0
        self.first_extra: str | None = None
        self.v.seqmap = list(range(1, conn.count + 1))
        self.cur_tag: str | None = None

    def on_untagged(self, conn: Conn, r: Response, g: Group | None) -> None:
        if g is not None and (g.untagged or not self.t.ignore_extra_untagged):
            self.match_untagged(g, r.args)
        a = r.args
        if len(a) > 1 and (a[0].atom or "").isdigit() and (a[1].atom or "").upper() == "EXPUNGE":
            self.v.expunge(int(a[0].atom or 0))

    def match_untagged(self, g: Group, args: list[Arg]) -> None:
        first = (args[0].atom or "").upper() if args else ""
        prefix = first in ("OK", "NO", "BAD", "BYE")
        self.v.added.clear()
        found_some = False
        for i, ut in enumerate(g.untagged):
            if self.found[i]:
                continue
            if self.cur_tag:
                self.v.values["tag"] = self.cur_tag
            n = self.v.match_args(ut.args, args, prefix=prefix)
            self.v.values.pop("tag", None)
            if n == FULL:
                if ut.existence == MUST_NOT:
                    self.fail(f"Unexpected untagged match:\n   Match: {render(ut.args)}\n"
                              f"   Reply: {render(args)}", g)
                    return
                self.found[i] = True
                found_some = True
                self.v.added.clear()
                if g.ordered:
                    break
                continue
            if self.best[i][0] < n:
                self.best[i] = (n, render(args))
            self.v.rollback()
            if g.ordered and ut.existence == MUST:
                break
        if not found_some:
            self.mismatches += 1
            if not self.t.ignore_extra_untagged and self.first_extra is None:
                self.first_extra = render(args)

    def finish(self, g: Group) -> None:
        missing = [i for i, ut in enumerate(g.untagged)
                   if ut.existence == MUST and not self.found[i]]
        if missing:
            ut = g.untagged[missing[0]]
            expanded = self.v.expand_all(render(ut.args), skip_unset=True)
            self.fail(f"Missing {len(missing)} untagged replies ({self.mismatches} mismatches)\n"
                      f"   - first unexpanded: {render(ut.args)}\n"
                      f"   - first expanded:   {expanded}\n"
                      f"   - best match:       {self.best[missing[0]][1]}", g)
        if self.first_extra is not None:
            self.fail(f"{self.mismatches} unexpected untagged replies, "
                      f"first: {self.first_extra}", g)
        if g.sleep_ms:
            time.sleep(g.sleep_ms / 1000)
        self.res.groups += 1

    def send_command(self, conn: Conn, g: Group, text: str, tag: str,
                     pending: dict[str, object]) -> None:
        low = text.lower()
        if low == "append" or (low.startswith("append ") and not self.append_has_body(text[7:])):
            head, body = self.append_head(tag, None if low == "append" else text[7:])
            conn.send(head)
            if self.wait_continuation(conn, g, tag, pending):
                conn.send(body)
            return
        pos = 0
        for m in _LIT.finditer(text):
            sync = m.group(3) != "+"
            conn.send(f"{tag} {text[:m.end()]}".encode("latin-1") if pos == 0
                      else text[pos:m.end()].encode("latin-1"))
            pos = m.end()
            if sync and not self.wait_continuation(conn, g, tag, pending):
                return
            size = int(m.group(2))
            conn.send(text[pos:pos + size].encode("latin-1"))
            pos += size
        tail = text[pos:] + "\r\n"
        conn.send((f"{tag} {tail}" if pos == 0 else tail).encode("latin-1"))

    @staticmethod
    def append_has_body(rest: str) -> bool:
        try:
            args = tokenize(rest)
        except ValueError:
            return False
        i = 1
        if i < len(args) and args[i].kind == LIST:
            i += 1
        if i < len(args) and args[i].kind == "string":
            i += 1
        return i < len(args) and (args[i].kind == "literal" or
                                  (args[i].kind == ATOM and args[i].value.lower() == "catenate"))

    def wait_continuation(self, conn: Conn, g: Group, tag: str, pending: dict[str, object]) -> bool:
        while True:
            r = conn.read(self.timeout)
            if r.kind == "+":
                return True
            if r.kind == "tagged":
                self.on_tagged(g, r, pending)
                if r.tag == tag:
                    return False
            else:
                self.on_untagged(conn, r, g)

    def on_tagged(self, g: Group, r: Response, pending: dict[str, object]) -> None:
        cmd = pending.pop(r.tag, None)
        if cmd is None:
            return
        self.v.values["tag"] = r.tag
        n = self.v.match_args(cmd.reply, r.args, prefix=True)  # type: ignore[attr-defined]
        self.v.values.pop("tag", None)
        if n != FULL:
            self.fail(f"Expected tagged reply '{render(cmd.reply)}', got '{r.text}'", g)  # type: ignore[attr-defined]

    def run_group(self, g: Group) -> bool:
        conn = self.conns[g.conn]
        if conn.closed:
            self.fail("Unexpected disconnection (connection already closed)", g)
            return False
        self.begin(g, conn)
        pending: dict[str, object] = {}
        for cmd in g.commands:
            try:
                text = self.v.expand_all(cmd.text)
            except KeyError as exc:
                self.fail(str(exc), g)
                self.res.groups += 1
                return True
            tag = conn.new_tag()
            if self.cur_tag is None:
                self.cur_tag = tag
            pending[tag] = cmd
            self.send_command(conn, g, text, tag, pending)
        try:
            while pending:
                r = conn.read(self.timeout)
                if r.kind == "tagged":
                    self.on_tagged(g, r, pending)
                elif r.kind == "*":
                    self.on_untagged(conn, r, g)
        except Closed:
            if g.have_bye and conn.seen_bye:
                for cmd in g.commands:
                    if not (len(cmd.reply) == 1 and cmd.reply[0].value == ""):  # type: ignore[union-attr,arg-type]
                        self.fail("only \"\" is allowed as tagged reply when BYE happens", g)
                self.finish(g)
                return True
            if all(c.text.lower() == "logout" for c in g.commands) and not pending:
                self.finish(g)
                return True
            self.fail("Unexpected disconnection", g)
            self.res.groups += 1
            return False
        except TimeoutError:
            self.fail(f"Timed out waiting for the tagged reply ({self.timeout:.0f} s)", g)
            self.res.groups += 1
            return False
        self.finish(g)
        return True

    def run(self) -> Result:
        try:
            if not self.setup():
                self.close()
                return self.res
        except (Abort, Closed, TimeoutError, OSError) as exc:
            self.res.status, self.res.reason = "FAIL", f"initialization failed: {exc}"
            self.res.fail_count += 1
            self.close()
            return self.res
        groups = self.t.groups[self.gi:]
        for g in groups:
            if not self.run_group(g):
                break
            self.gi += 1
        self.close()
        return self.res

    def close(self) -> None:
        for c in self.conns:
            c.close()

