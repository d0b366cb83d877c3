"""A scriptable ESMTP sink on loopback for the smarthost tests.

Speaks just enough ESMTP to stand in for a relay: STARTTLS or implicit TLS (with the
test run's development certificate; the SNI of each handshake is recorded), AUTH PLAIN
and LOGIN, PIPELINING, 8BITMIME, SMTPUTF8 and SIZE (each can be switched off), and
per-recipient replies from a script. It records connections, every command (with the
network read it arrived in, so a test can see pipelining), and every message it
accepted.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import protocol
from twisted.protocols.basic import LineOnlyReceiver

from agentpost.tls import server_tls_options


@dataclass
class Received:
    """One accepted message."""

    connection: int
    mail_from: str
    mail_params: str
    recipients: list[str]
    data: bytes
    tls: bool
    user: str | None


@dataclass
class Command:
    connection: int
    read: int  # the network read (dataReceived call) it arrived in
    verb: str
    line: str


@dataclass
class SinkScript:
    """What the sink offers and answers."""

    starttls: bool = True
    pipelining: bool = True
    eightbitmime: bool = True
    smtputf8: bool = True
    size: int = 0
    users: dict[str, str] = field(default_factory=dict)  # AUTH offered when not empty
    require_auth: bool = False
    auth: str = "PLAIN LOGIN"  # mechanisms offered
    #: address -> replies for successive RCPTs of it (the last one repeats)
    rcpt: dict[str, list[str]] = field(default_factory=dict)
    data_reply: Callable[[int], str] = lambda n: f"250 2.0.0 Ok: queued as Q{n}"
    hang_after_data: bool = False  # never answer the end of data (deadline tests)
    inject_after_starttls: bool = False  # a plain-text reply smuggled behind the 220
    #: TLS from the first byte (RFC 8314, port 465): listen with reactor.listenSSL and
    #: the sink's tls_options; STARTTLS is then not offered.
    implicit_tls: bool = False


class SinkProtocol(LineOnlyReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 10_000_000

    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink
        self.script = sink.script
        self.tls = self.script.implicit_tls
        self.user: str | None = None
        self.read = 0
        self._reset()
        self._data: list[bytes] | None = None
        self._auth_step: Callable[[str], None] | None = None

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_params = ""
        self.accepted: list[str] = []

    def connectionMade(self) -> None:
        self.sink.connections += 1
        self.number = self.sink.connections
        self.sink.open.add(self)
        self.reply("220 sink.test ESMTP test sink")

    def connectionLost(self, reason: Any = None) -> None:
        self.sink.open.discard(self)

    def reply(self, text: str) -> None:
        self.transport.write(text.encode("utf-8") + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.read += 1
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._data is not None:
            self._data_line(line)
            return
        text = line.decode("utf-8", "replace")
        if self._auth_step is not None:
            step, self._auth_step = self._auth_step, None
            step(text)
            return
        verb = text.split(" ", 1)[0].upper()
        logged = text if verb != "AUTH" else "AUTH " + text.split(" ")[1] if " " in text else text
        self.sink.commands.append(Command(self.number, self.read, verb, logged))
        handler = getattr(self, f"do_{verb}", None)
        if handler is None:
            self.reply("502 5.5.2 command not recognised")
            return
        handler(text[len(verb):].strip())

    # -- commands

    def do_EHLO(self, arg: str) -> None:
        s = self.script
        lines = ["sink.test greets you"]
        if s.pipelining:
            lines.append("PIPELINING")
        if s.eightbitmime:
            lines.append("8BITMIME")
        if s.smtputf8:
            lines.append("SMTPUTF8")
        if s.size:
            lines.append(f"SIZE {s.size}")
        if s.starttls and not self.tls:
            lines.append("STARTTLS")
        if s.users and self.tls:
            lines.append("AUTH " + s.auth)
        self._reset()
        for line in lines[:-1]:
            self.reply("250-" + line)
        self.reply("250 " + lines[-1])

    def do_HELO(self, arg: str) -> None:
        self.reply("250 sink.test")

    def do_STARTTLS(self, arg: str) -> None:
        if not self.script.starttls or self.tls:
            self.reply("502 5.5.1 no STARTTLS here")
            return
        if self.script.inject_after_starttls:
            self.transport.write(b"220 2.0.0 go ahead\r\n250-sink.test\r\n250 AUTH PLAIN\r\n")
        else:
            self.reply("220 2.0.0 go ahead")
        self.transport.startTLS(self.sink.tls_options)
        self.tls = True
        self._reset()

    def do_AUTH(self, arg: str) -> None:
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if not self.script.users or not self.tls:
            self.reply("503 5.5.1 AUTH not available")
        elif mechanism not in self.script.auth.split():
            self.reply("504 5.5.4 mechanism not offered")
        elif mechanism == "PLAIN":
            if initial:
                self._plain(initial)
            else:
                self.reply("334 ")
                self._auth_step = self._plain
        elif mechanism == "LOGIN":
            self.reply("334 VXNlcm5hbWU6")
            self._auth_step = self._login_user
        else:
            self.reply("504 5.5.4 unknown mechanism")

    def _plain(self, token: str) -> None:
        try:
            _, user, password = base64.b64decode(token).decode().split("\0")
        except ValueError:
            self.reply("501 5.5.2 bad PLAIN token")
            return
        self._check(user, password)

    def _login_user(self, token: str) -> None:
        user = base64.b64decode(token).decode()
        self.reply("334 UGFzc3dvcmQ6")
        self._auth_step = lambda t: self._check(user, base64.b64decode(t).decode())

    def _check(self, user: str, password: str) -> None:
        self.sink.auth_attempts.append(user)
        if self.script.users.get(user) == password:
            self.user = user
            self.reply("235 2.7.0 Authentication successful")
        else:
            self.reply("535 5.7.8 Authentication credentials invalid")

    def do_MAIL(self, arg: str) -> None:
        if self.script.require_auth and self.user is None:
            self.reply("530 5.7.0 Authentication required")
            return
        address, _, params = arg[len("FROM:"):].partition(">")
        self.mail_from = address.lstrip("<")
        self.mail_params = params.strip()
        self.accepted = []
        self.reply("250 2.1.0 Ok")

    def do_RCPT(self, arg: str) -> None:
        if self.mail_from is None:
            self.reply("503 5.5.1 need MAIL first")
            return
        address = arg[len("TO:"):].strip().strip("<>")
        script = self.script.rcpt.get(address)
        answer = "250 2.1.5 Ok"
        if script:
            answer = script.pop(0) if len(script) > 1 else script[0]
        if answer.startswith("2"):
            self.accepted.append(address)
        self.reply(answer)

    def do_DATA(self, arg: str) -> None:
        if self.mail_from is None or not self.accepted:
            self.reply("554 5.5.1 no valid recipients")
            return
        self._data = []
        self.reply("354 End data with <CR><LF>.<CR><LF>")

    def _data_line(self, line: bytes) -> None:
        assert self._data is not None
        if line != b".":
            self._data.append(line[1:] if line.startswith(b".") else line)
            return
        data = b"".join(chunk + b"\r\n" for chunk in self._data)
        self._data = None
        self.sink.messages.append(Received(self.number, self.mail_from or "",
                                           self.mail_params, list(self.accepted), data,
                                           self.tls, self.user))
        if not self.script.hang_after_data:
            self.reply(self.script.data_reply(len(self.sink.messages)))
        self._reset()

    def do_RSET(self, arg: str) -> None:
        self._reset()
        self.reply("250 2.0.0 Ok")

    def do_NOOP(self, arg: str) -> None:
        self.reply("250 2.0.0 Ok")

    def do_QUIT(self, arg: str) -> None:
        self.sink.quits += 1
        self.reply("221 2.0.0 Bye")
        self.transport.loseConnection()


class SMTPSink(protocol.Factory):
    """Listen with ``reactor.listenTCP(0, sink, interface="127.0.0.1")``."""

    def __init__(self, cert: str, key: str, script: SinkScript | None = None) -> None:
        self.script = script or SinkScript()
        self.tls_options = server_tls_options(cert, key)
        self.connections = 0
        self.quits = 0
        self.open: set[SinkProtocol] = set()
        self.messages: list[Received] = []
        self.commands: list[Command] = []
        self.auth_attempts: list[str] = []
        self.server_names: list[bytes | None] = []  # SNI of every TLS handshake
        self.tls_options.getContext().set_tlsext_servername_callback(
            lambda conn: self.server_names.append(conn.get_servername()))

    def buildProtocol(self, addr: Any) -> SinkProtocol:
        return SinkProtocol(self)

    def verbs(self) -> list[str]:
        return [c.verb for c in self.commands]

    def drop_all(self) -> None:
        """Close every connection from the server side (as an idle timeout would)."""
        for proto in list(self.open):
            proto.transport.loseConnection()
