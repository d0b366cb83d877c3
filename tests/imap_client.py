"""The raw IMAP client of the tests that talk to a running server over a real socket.

Blocking: run it in a thread (``deferToThread``, or :func:`session`). It connects with
STARTTLS (or implicit TLS, or in the clear) against the dev CA and logs in; a command
returns every line up to and with its tagged response, each line without its CRLF and
with any literal it announces read into it (a literal8's ``~{n}`` marker stays
visible); :meth:`Client.transcript` gives the same bytes exactly as they came over the
wire. Unsolicited lines are read with :meth:`Client.until` and :meth:`Client.quiet`;
:meth:`Client.send` writes raw bytes (IDLE, DONE, hand-framed literals), and
:class:`Lit` pieces frame synchronizing, LITERAL+ and literal8 literals in a command.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from twisted.internet.threads import deferToThread

from tests.conftest import _DEV_TLS

_LITERAL_AT_END = re.compile(rb"~?\{(\d+)\}\r\n$")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Lit:
    """A literal in a command: ``{n}`` (waits for ``+``) or ``{n+}`` (LITERAL+); with
    ``binary`` a literal8, ``~{n}`` or ``~{n+}``."""

    data: bytes
    sync: bool = True
    binary: bool = False

    def marker(self) -> bytes:
        return b"%s{%d%s}\r\n" % (b"~" if self.binary else b"", len(self.data),
                                  b"" if self.sync else b"+")


class Client:
    """One IMAP session: logged in when ``user`` is given, not selected.

    ``tls``: ``"starttls"`` on the plain port, ``"implicit"`` on the TLS port, or
    ``"none"`` (the greeting and commands in the clear, before any login)."""

    def __init__(self, port: int, user: str | None = None, key: str | None = None, *,
                 tls: Literal["starttls", "implicit", "none"] = "starttls",
                 timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.buffer = bytearray()
        self.count = 0
        self.tag = ""  # the tag of the last command sent
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        context = ssl.create_default_context(cafile=_DEV_TLS["ca"])
        self.sock: socket.socket = raw
        if tls == "implicit":
            self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.greeting = self.line()
        if tls == "starttls":
            reply = self.tagged("s", "STARTTLS")
            assert reply[-1].startswith(b"s OK") and not self.buffer, reply
            self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        if user is not None:
            self.ok(f'LOGIN "{user}" "{key}"')

    # ------------------------------------------------------------------ reading

    def _read(self, size: int | None) -> bytes:
        """A line (``size`` None) or ``size`` bytes; what is left at the end of the stream."""
        while True:
            if size is None:
                end = self.buffer.find(b"\n") + 1
                ready = end > 0
            else:
                end, ready = size, len(self.buffer) >= size
            if ready:
                out = bytes(self.buffer[:end])
                del self.buffer[:end]
                return out
            data = self.sock.recv(65536)
            if not data:
                out = bytes(self.buffer)
                self.buffer.clear()
                return out
            self.buffer += data

    def line(self) -> bytes:
        """One response line without its CRLF, the literals it announces read into it."""
        line = self._read(None)
        if not line:
            raise ConnectionError("the server closed the connection")
        while (m := _LITERAL_AT_END.search(line)) is not None:
            line += self._read(int(m.group(1)))
            line += self._read(None)
        return line.removesuffix(b"\r\n")

    def response(self, tag: str) -> list[bytes]:
        """Lines up to and with the tagged response of ``tag``."""
        lines: list[bytes] = []
        while True:
            lines.append(self.line())
            if lines[-1].startswith(tag.encode() + b" "):
                return lines

    def until(self, needle: bytes, timeout_s: float = 10.0) -> list[bytes]:
        """Unsolicited lines up to the first containing ``needle`` (IDLE, NOTIFY)."""
        seen: list[bytes] = []
        self.sock.settimeout(timeout_s)
        try:
            while True:
                seen.append(self.line())
                if needle in seen[-1]:
                    return seen
        except TimeoutError:
            raise AssertionError(f"{needle!r} not seen in {seen!r}") from None
        finally:
            self.sock.settimeout(self.timeout)

    def quiet(self, seconds: float = 1.0) -> list[bytes]:
        """Whatever arrives within ``seconds`` or before the server closes (nothing,
        when all is well)."""
        seen: list[bytes] = []
        self.sock.settimeout(seconds)
        try:
            while True:
                seen.append(self.line())
        except (TimeoutError, ConnectionError):
            return seen
        finally:
            self.sock.settimeout(self.timeout)

    # ------------------------------------------------------------------ commands

    def send(self, data: bytes) -> None:
        """Raw bytes, as they are (IDLE's DONE, a literal framed by hand)."""
        self.sock.sendall(data)

    def tagged(self, tag: str, *pieces: str | bytes | Lit) -> list[bytes]:
        """Send ``tag piece piece ...`` (pieces joined as given) and return the response;
        at a refused synchronizing literal the refusal ends the command."""
        self.tag = tag
        out = tag.encode() + b" "
        for piece in pieces:
            if isinstance(piece, Lit):
                out += piece.marker()
                if piece.sync:
                    self.sock.sendall(out)
                    out = b""
                    line = self.line()
                    if not line.startswith(b"+"):
                        return [line]
                out += piece.data
            else:
                out += piece.encode() if isinstance(piece, str) else piece
        self.sock.sendall(out + b"\r\n")
        return self.response(tag)

    def cmd(self, *pieces: str | bytes | Lit) -> list[bytes]:
        """:meth:`tagged` with the next of the tags t1, t2, ... (LOGIN had t1)."""
        self.count += 1
        return self.tagged(f"t{self.count}", *pieces)

    def ok(self, *pieces: str | bytes | Lit) -> list[bytes]:
        """The untagged lines of a command that must succeed."""
        lines = self.cmd(*pieces)
        assert lines[-1].split(b" ")[1] == b"OK", lines
        return lines[:-1]

    def transcript(self, *pieces: str | bytes | Lit) -> bytes:
        """:meth:`cmd`'s response as the bytes that came over the wire."""
        return b"".join(line + b"\r\n" for line in self.cmd(*pieces))

    def append(self, mailbox: str, message: bytes) -> int:
        """APPEND with a LITERAL+ literal; the new UID (APPENDUID)."""
        done = self.tagged("ap", f"APPEND {mailbox} ", Lit(message, sync=False))[-1]
        assert done.startswith(b"ap OK [APPENDUID "), done
        return int(done.split(b"]")[0].split()[-1])

    def logout(self) -> None:
        try:
            self.cmd("LOGOUT")
        finally:
            self.close()

    def close(self) -> None:
        self.sock.close()


async def session(port: int, user: str, key: str, work: Callable[[Client], _T]) -> _T:
    """``work`` on a fresh logged-in session, in a thread; the session closed after."""

    def run() -> _T:
        client = Client(port, user, key)
        try:
            return work(client)
        finally:
            client.close()

    return await deferToThread(run)


async def new_inbox(server, name: str) -> tuple[dict, str]:
    """(inbox, key) of a fresh inbox in a fresh organization."""
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": name}, key=key)).json
    return inbox, key


async def new_login(server, name: str) -> tuple[str, str]:
    """(address, key) of a fresh inbox in a fresh organization."""
    inbox, key = await new_inbox(server, name)
    return inbox["email"], key


def message(n: int | str, subject: str, *, msgid: str | None = None, refs: str = "",
            reply_to: str = "", day: int = 1, size: int = 0) -> bytes:
    """A small message; ``msgid`` defaults to ``<n@example.com>``."""
    headers = ["From: a@example.com", "To: b@example.com", f"Subject: {subject}",
               f"Date: Mon, {day:02d} Jan 2024 10:00:00 +0000",
               f"Message-ID: {msgid or f'<{n}@example.com>'}"]
    if refs:
        headers.append(f"References: {refs}")
    if reply_to:
        headers.append(f"In-Reply-To: {reply_to}")
    body = f"body {n}\r\n" + "x" * size
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


def on_both_paths(client: Client, sent: list[str], command: str, module: Any,
                  read: str, *, reads_only_if_ok: bool = False
                  ) -> tuple[list[bytes], list[bytes]]:
    """``command`` answered with ``module.FROM_VIEW`` on (the session's view), then off
    (the database path), each without its tag (the tagged line's, and a quoted one an
    ESEARCH carries, become nothing and ``TAG``). Asserts the view path sent no SQL
    containing ``read`` and the database path did (with ``reads_only_if_ok``: only for
    an OK answer), so the comparison is between the two paths, not one path twice."""
    answers = []
    for from_view in (True, False):
        module.FROM_VIEW = from_view
        try:
            sent.clear()
            lines = client.cmd(command)
        finally:
            module.FROM_VIEW = True
        ok = lines[-1].split(b" ", 2)[1] == b"OK"
        if ok or not reads_only_if_ok:
            assert any(read in sql for sql in sent) is not from_view, \
                (command, from_view, sent)
        tag = b'"' + client.tag.encode() + b'"'
        answers.append([line.replace(tag, b"TAG") for line in lines[:-1]]
                       + [lines[-1].split(b" ", 1)[1]])
    return answers[0], answers[1]
