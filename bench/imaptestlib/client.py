"""A blocking IMAP connection for the runner, and imaptest's mbox message source."""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from .args import Arg, tokenize

_LIT_END = re.compile(rb"~?\{(\d+)\+?\}\r\n$")


class Closed(ConnectionError):
    pass


@dataclass
class Response:
    kind: str          # "*", "+" or "tagged"
    tag: str
    text: str          # the line after "* "/tag, literals inline as {n}\r\n<data>
    args: list[Arg] = field(default_factory=list)


class Conn:
    def __init__(self, host: str, port: int, cid: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.cid = cid
        self.buf = b""
        self.next_tag = 1
        self.count = 0
        self.caps: list[str] = []
        self.closed = False
        self.seen_bye = False
        self.transcript: list[str] = []

    def send(self, data: bytes) -> None:
        self.transcript.append("C: " + data.decode("latin-1").rstrip("\r\n")[:300])
        self.sock.sendall(data)

    def new_tag(self) -> str:
        tag = f"{self.cid}.{self.next_tag}"
        self.next_tag += 1
        return tag

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out waiting for the server")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except TimeoutError as exc:
            raise TimeoutError("timed out waiting for the server") from exc
        except OSError as exc:
            self.closed = True
            raise Closed(str(exc)) from exc
        if not data:
            self.closed = True
            raise Closed("connection closed by the server")
        self.buf += data

    def read(self, timeout: float) -> Response:
        deadline = time.monotonic() + timeout
        raw = b""
        while True:
            while b"\r\n" not in self.buf:
                self._fill(deadline)
            line, self.buf = self.buf.split(b"\r\n", 1)
            raw += line + b"\r\n"
            m = _LIT_END.search(raw)
            if not m:
                break
            size = int(m.group(1))
            while len(self.buf) < size:
                self._fill(deadline)
            raw += self.buf[:size]
            self.buf = self.buf[size:]
        text = raw[:-2].decode("latin-1")
        self.transcript.append("S: " + text[:300].replace("\r\n", "\\r\\n"))
        head, _, rest = text.partition(" ")
        if head == "*":
            resp = Response("*", "", rest, tokenize(rest))
        elif head == "+":
            resp = Response("+", "", rest)
        else:
            resp = Response("tagged", head, rest, tokenize(rest))
        self._track(resp)
        return resp

    def _track(self, r: Response) -> None:
        if r.kind == "+" or not r.args:
            return
        a0 = (r.args[0].atom or "").upper()
        a1 = (r.args[1].atom or "").upper() if len(r.args) > 1 else ""
        if a0 == "CAPABILITY":
            self.caps = [a.atom or "" for a in r.args[1:]]
        elif a0 in ("OK", "NO", "BAD", "BYE") and len(r.args) > 1 and \
                (r.args[1].atom or "").upper() == "[CAPABILITY":
            caps = []
            for a in r.args[2:]:
                word = a.atom or ""
                caps.append(word.rstrip("]"))
                if word.endswith("]"):
                    break
            self.caps = caps
        if r.kind == "*" and a0 == "BYE":
            self.seen_bye = True
        if r.kind == "*" and a0.isdigit():
            if a1 == "EXISTS":
                self.count = int(a0)
            elif a1 == "EXPUNGE" and self.count > 0:
                self.count -= 1

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_FROM = re.compile(r"^From \S+\s+\w{3} (\w{3})\s+(\d+) (\d+):(\d+):(\d+) (\d{4})(?: ([+-]\d{4}))?")


def _datetime(line: str) -> str | None:
    m = _FROM.match(line)
    if not m:
        return None
    mon, day, hh, mi, ss, year, tz = m.groups()
    return f"{int(day):02d}-{mon}-{year} {int(hh):02d}:{mi}:{ss} {tz or '+0000'}"


class MboxSource:
    """Messages between mbox From_ lines, line ends made CRLF, wrapping at the end."""

    def __init__(self, path: Path) -> None:
        lines = path.read_bytes().decode("latin-1").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        self.messages: list[tuple[bytes, str]] = []
        cur: list[str] | None = None
        date = ""
        for ln in lines:
            d = _datetime(ln) if ln.startswith("From ") else None
            if d is not None and (cur is None or cur):
                if cur is not None:
                    self.messages.append((self._body(cur), date))
                cur, date = [], d
                continue
            if cur is not None:
                cur.append(ln)
        if cur:
            self.messages.append((self._body(cur), date))
        if not self.messages:
            raise ValueError(f"no messages in {path}")
        self.pos = 0

    @staticmethod
    def _body(lines: list[str]) -> bytes:
        return "".join(ln.rstrip("\r") + "\r\n" for ln in lines).encode("latin-1")

    def eof(self) -> bool:
        return self.pos >= len(self.messages)

    def next(self) -> tuple[bytes, str]:
        if self.pos >= len(self.messages):
            self.pos = 0
        msg = self.messages[self.pos]
        self.pos += 1
        return msg

