"""A raw IMAP client for transcript tests against a running server (STARTTLS, LOGIN,
whole command lines, APPEND with LITERAL+), blocking: run it with ``deferToThread``."""

from __future__ import annotations

import socket
import ssl
import time

from tests.conftest import _DEV_TLS


class Client:
    """One IMAP session; :meth:`cmd` returns every line up to the tagged one."""

    def __init__(self, port: int, user: str, key: str) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"s STARTTLS\r\n")
        f.readline()
        ctx = ssl.create_default_context(cafile=_DEV_TLS["ca"])
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.f = self.sock.makefile("rb")
        assert self.cmd("l", f'LOGIN "{user}" "{key}"')[-1].startswith(b"l OK")

    def line(self) -> bytes:
        line = self.f.readline()
        if not line:
            raise ConnectionError("closed")
        return line.rstrip(b"\r\n")

    def response(self, tag: str) -> list[bytes]:
        """Lines up to (and with) the tagged one."""
        lines: list[bytes] = []
        while True:
            lines.append(self.line())
            if lines[-1].startswith(tag.encode() + b" "):
                return lines

    def cmd(self, tag: str, text: str) -> list[bytes]:
        self.sock.sendall(f"{tag} {text}\r\n".encode())
        return self.response(tag)

    def append(self, mailbox: str, message: bytes) -> int:
        """APPEND with a LITERAL+ literal; the new UID (APPENDUID)."""
        self.sock.sendall(b"ap APPEND %s {%d+}\r\n" % (mailbox.encode(), len(message))
                          + message + b"\r\n")
        done = self.response("ap")[-1]
        assert done.startswith(b"ap OK [APPENDUID "), done
        return int(done.split(b"]")[0].split()[-1])

    def until(self, needle: bytes, timeout_s: float = 10.0) -> list[bytes]:
        """Unsolicited lines up to the first containing ``needle`` (IDLE)."""
        deadline = time.monotonic() + timeout_s
        seen: list[bytes] = []
        self.sock.settimeout(timeout_s)
        try:
            while time.monotonic() < deadline:
                seen.append(self.line())
                if needle in seen[-1]:
                    return seen
        finally:
            self.sock.settimeout(30)
        raise AssertionError(f"{needle!r} not seen in {seen!r}")

    def close(self) -> None:
        self.sock.close()


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


async def new_inbox(server, name: str) -> tuple[str, str]:
    """(address, key) of a fresh inbox in a fresh organization."""
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": name}, key=key)).json
    return inbox["email"], key
