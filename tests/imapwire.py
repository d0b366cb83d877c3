"""A raw IMAP client for byte-level transcripts over a real socket: STARTTLS, LOGIN,
then commands whose whole response (untagged lines, literals and ``~{n}`` literal8s
included) comes back as bytes. imaplib hides the literal markers; these tests are
about them."""

from __future__ import annotations

import re
import socket
import ssl

from tests.conftest import _DEV_TLS

_LITERAL_AT_END = re.compile(rb"~?\{(\d+)\}\r\n$")


class Wire:
    """One session, logged in and ready (not selected)."""

    def __init__(self, port: int, user: str, key: str) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        plain = sock.makefile("rb")
        plain.readline()  # greeting
        sock.sendall(b"s STARTTLS\r\n")
        assert plain.readline().startswith(b"s OK")
        ctx = ssl.create_default_context(cafile=_DEV_TLS["ca"])
        self.sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")
        self.count = 0
        out = self.run(b"LOGIN " + user.encode() + b" " + key.encode())
        assert out.endswith(b"OK LOGIN completed\r\n") or b" OK " in out, out

    def _tag(self) -> bytes:
        self.count += 1
        return b"t%d" % self.count

    def read_until(self, tag: bytes) -> bytes:
        """Everything up to and including the tagged response of ``tag``."""
        out = bytearray()
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(bytes(out))
            out += line
            m = _LITERAL_AT_END.search(line)
            if m is not None:
                out += self.file.read(int(m.group(1)))
                continue
            if line.startswith(tag + b" "):
                return bytes(out)

    def run(self, command: bytes) -> bytes:
        """Send one command (no synchronizing literal) and read its whole response."""
        tag = self._tag()
        self.sock.sendall(tag + b" " + command + b"\r\n")
        return self.read_until(tag)

    def run_literal(self, head: bytes, data: bytes, tail: bytes = b"",
                    sync: bool = True) -> bytes:
        """``head`` ending with a literal marker, the literal, ``tail``: waits for the
        continuation when ``sync`` (and returns the refusal if one comes instead)."""
        tag = self._tag()
        self.sock.sendall(tag + b" " + head + b"\r\n")
        if sync:
            line = self.file.readline()
            if not line.startswith(b"+"):
                return line
        self.sock.sendall(data + tail + b"\r\n")
        return self.read_until(tag)

    def close(self) -> None:
        try:
            self.run(b"LOGOUT")
        finally:
            self.sock.close()
