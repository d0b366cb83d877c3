"""IMAP BINARY (RFC 3516) on the real store over real sockets: FETCH BINARY[...],
BINARY.PEEK, BINARY.SIZE with each Content-Transfer-Encoding, literal8 for NUL,
UNKNOWN-CTE and PARSE refusals, streaming of large parts in bounded memory, and APPEND
of a literal8 stored byte-exact."""

from __future__ import annotations

import base64
import re
import tracemalloc
from collections.abc import Callable
from typing import TypeVar

import pytest
import pytest_twisted

from agentpost.imap.commands.binaryfetch import render_binary
from agentpost.imap.interfaces import FetchRow
from agentpost.imap.parser import parse_fetch_items
from agentpost.imap.parser import tokenize as imap_tokenize
from agentpost.mail import imapformat
from tests.imap_client import Client, Lit, new_inbox, session

_T = TypeVar("_T")
BYTES = bytes(range(256))
B64 = base64.encodebytes(BYTES).replace(b"\n", b"\r\n")


def _message(to: str) -> bytes:
    """Parts: 1 QP text, 2 base64 octets (with NUL), 3 8bit text, 4 binary with NUL,
    5 an unknown CTE, 6 corrupt base64, 7 a multipart holding 7.1 base64 text."""
    return (f"From: a@example.org\r\nTo: {to}\r\nSubject: binary\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'.encode()
            + b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: Quoted-Printable\r\n\r\ncaf=C3=A9 =\r\nsoft\r\n"
            b"--b\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64 (by hand)\r\n\r\n" + B64
            + b"\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
            b"--b\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: binary\r\n\r\nab\x00cd\r\n"
            b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
            b"begin 644 x\r\n"
            b"--b\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nAAAA!!!!\r\n"
            b'--b\r\nContent-Type: multipart/alternative; boundary="c"\r\n\r\n'
            b"--c\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"aGVsbG8=\r\n--c--\r\n"
            b"--b--\r\n")


async def _setup(server, name: str, raw: bytes) -> tuple[dict, str]:
    inbox, key = await new_inbox(server, name)
    await server.deliver(raw, [inbox["email"]])
    return inbox, key


async def _selected(server, inbox: dict, key: str, work: Callable[[Client], _T]) -> _T:
    """``work`` on a session with INBOX selected."""

    def selected(c: Client) -> _T:
        c.transcript(b"SELECT INBOX")
        return work(c)

    return await session(server.imap_port, inbox["email"], key, selected)


def _item(response: bytes, label: bytes) -> tuple[bytes, bytes]:
    """(literal marker, octets) of ``label`` in a FETCH response."""
    at = response.index(label + b" ") + len(label) + 1
    m = re.compile(rb"(~?)\{(\d+)\}\r\n").match(response, at)
    assert m is not None, response[at:at + 40]
    return m.group(1), response[m.end():m.end() + int(m.group(2))]


def _size(response: bytes, label: bytes) -> int:
    m = re.search(re.escape(label) + rb" (\d+)", response)
    assert m is not None, response
    return int(m.group(1))


@pytest_twisted.ensureDeferred
async def test_binary_undoes_each_transfer_encoding_and_sizes_match(server):
    """QP, base64, 8bit and binary parts come back decoded; a NUL in the decoded octets
    makes a literal8 (``~{n}``), text a plain literal; BINARY.SIZE equals the length
    returned; PEEK leaves \\Seen alone."""
    inbox, key = await _setup(server, "bin-ctes", _message("x"))

    def work(wire: Client):
        return wire.transcript(b"FETCH 1 (BINARY.PEEK[1] BINARY.PEEK[2] BINARY.PEEK[3] "
                               b"BINARY.PEEK[4] BINARY.SIZE[1] BINARY.SIZE[2] BINARY.SIZE[3] "
                               b"BINARY.SIZE[4] BINARY.PEEK[7.1] BINARY.SIZE[7.1] FLAGS)")

    out = await _selected(server, inbox, key, work)
    assert out.rstrip().endswith(b"OK FETCH completed"), out
    assert _item(out, b"BINARY[1]") == (b"", b"caf\xc3\xa9 soft")
    assert _item(out, b"BINARY[2]") == (b"~", BYTES)
    assert _item(out, b"BINARY[3]") == (b"", b"Gr\xc3\xbc\xc3\x9fe")
    assert _item(out, b"BINARY[4]") == (b"~", b"ab\x00cd")
    assert _item(out, b"BINARY[7.1]") == (b"", b"hello")
    for part, data in ((b"1", b"caf\xc3\xa9 soft"), (b"2", BYTES), (b"3", "Grüße".encode()),
                       (b"4", b"ab\x00cd"), (b"7.1", b"hello")):
        assert _size(out, b"BINARY.SIZE[" + part + b"]") == len(data)
    assert b"\\Seen" not in out


@pytest_twisted.ensureDeferred
async def test_partial_binary_counts_decoded_octets_and_whole_message_is_as_stored(server):
    """<origin.count> addresses the decoded octets; the literal kind follows what is
    returned; BINARY[] is the stored message; a missing part is empty."""
    raw = _message("x")
    inbox, key = await _setup(server, "bin-partial", raw)

    def work(wire: Client):
        out = [wire.transcript(b"FETCH 1 (BINARY.PEEK[2]<250.10>)"),
               wire.transcript(b"FETCH 1 (BINARY.PEEK[2]<0.3>)"),
               wire.transcript(b"FETCH 1 (BINARY.PEEK[2]<900.5>)"),
               wire.transcript(b"FETCH 1 (BINARY.PEEK[] BINARY.SIZE[] RFC822.SIZE)"),
               wire.transcript(b"FETCH 1 (BINARY.PEEK[9] BINARY.SIZE[9])")]
        return out

    tail, head, beyond, whole, missing = await _selected(server, inbox, key, work)
    assert _item(tail, b"BINARY[2]<250>") == (b"", BYTES[250:])
    assert _item(head, b"BINARY[2]<0>") == (b"~", b"\x00\x01\x02")
    assert _item(beyond, b"BINARY[2]<900>") == (b"", b"")
    assert _item(whole, b"BINARY[]") == (b"~", raw)  # part 4 holds a NUL
    assert _size(whole, b"BINARY.SIZE[]") == len(raw) == _size(whole, b"RFC822.SIZE")
    assert _item(missing, b"BINARY[9]") == (b"", b"")
    assert _size(missing, b"BINARY.SIZE[9]") == 0


@pytest_twisted.ensureDeferred
async def test_binary_refusals_speak_imap(server):
    """Unknown CTE: NO [UNKNOWN-CTE]; corrupt base64: NO [PARSE]; a multipart: NO
    [CANNOT]; bad syntax: BAD. The session goes on, and a failed BINARY marks nothing
    after it."""
    inbox, key = await _setup(server, "bin-errors", _message("x"))

    def work(wire: Client):
        out = {name: wire.transcript(command) for name, command in (
            ("unknown", b"FETCH 1 (BINARY.PEEK[5])"),
            ("unknown-size", b"FETCH 1 (BINARY.SIZE[5])"),
            ("corrupt", b"FETCH 1 BINARY.PEEK[6]"),
            ("multipart", b"FETCH 1 (BINARY.PEEK[7])"),
            ("size-partial", b"FETCH 1 (BINARY.SIZE[1]<0.5>)"),
            ("text-section", b"FETCH 1 (BINARY[1.TEXT.MIME])"),
            ("zero", b"FETCH 1 (BINARY[0])"),
            ("still", b"FETCH 1 (BINARY.PEEK[7.1])"))}
        return out

    out = await _selected(server, inbox, key, work)
    assert re.search(rb"t\d+ NO \[UNKNOWN-CTE\] .*x-uuencode", out["unknown"]), out["unknown"]
    assert b"NO [UNKNOWN-CTE]" in out["unknown-size"]
    assert b"NO [PARSE]" in out["corrupt"]
    assert b"NO [CANNOT]" in out["multipart"]
    for name in ("size-partial", "text-section", "zero"):
        assert re.search(rb"t\d+ BAD ", out[name]), out[name]
    assert _item(out["still"], b"BINARY[7.1]") == (b"", b"hello")
    assert b"Traceback" not in b"".join(out.values())


@pytest_twisted.ensureDeferred
async def test_binary_without_peek_sets_seen(server):
    """BINARY[...] is a body fetch: \\Seen is set and reported, as for BODY[...]."""
    inbox, key = await _setup(server, "bin-seen", _message("x"))

    def work(wire: Client):
        first = wire.transcript(b"FETCH 1 (BINARY[1])")
        flags = wire.transcript(b"FETCH 1 (FLAGS)")
        return first, flags

    first, flags = await _selected(server, inbox, key, work)
    assert _item(first, b"BINARY[1]") == (b"", b"caf\xc3\xa9 soft")
    assert b"\\Seen" in first and b"\\Seen" in flags


def _big(to: str, size: int) -> tuple[bytes, bytes]:
    payload = (BYTES * (size // 256 + 1))[:size]
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    raw = (f"From: big@example.org\r\nTo: {to}\r\nSubject: large\r\nMIME-Version: 1.0\r\n"
           'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
           "--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
           "--b1\r\nContent-Type: application/octet-stream\r\n"
           "Content-Transfer-Encoding: base64\r\n\r\n").encode() + encoded + b"\r\n--b1--\r\n"
    return raw, payload


@pytest_twisted.ensureDeferred
async def test_large_base64_part_streams_decoded_from_the_section_map(server):
    """A 3 MB attachment (over the stream threshold) is decoded from the blob store a
    chunk at a time: whole, partial and size agree with the original octets."""
    inbox, key = await new_inbox(server, "bin-large")
    raw, payload = _big(inbox["email"], 3_000_000)
    await server.deliver(raw, [inbox["email"]])

    def work(wire: Client):
        out = [wire.transcript(b"FETCH 1 (BINARY.SIZE[2] BINARY.PEEK[2])"),
               wire.transcript(b"FETCH 1 (BINARY.PEEK[2]<1000001.300000>)")]
        return out

    whole, part = await _selected(server, inbox, key, work)
    assert _size(whole, b"BINARY.SIZE[2]") == len(payload)
    assert _item(whole, b"BINARY[2]") == (b"~", payload)
    assert _item(part, b"BINARY[2]<1000001>") == (b"~", payload[1000001:1300001])


class _BlobFolder:
    """A folder whose one message lives in memory, read only by ranges (the streaming
    path: no whole-message read)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    async def read_range(self, row: FetchRow, start: int, length: int) -> bytes:
        return self.raw[start:start + length]

    async def read_message(self, row: FetchRow) -> bytes:  # pragma: no cover
        raise AssertionError("the whole message must not be read")


class _Sink:
    """Stands for the session: counts what is written, never blocks."""

    def __init__(self) -> None:
        from agentpost.imap.states import State

        self.state = State.SELECTED
        self.clock = None  # no thread pool: decoded inline
        self.written = 0
        self.tail = b""

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.tail = bytes(data[-16:])

    async def drain(self) -> None:
        return None


@pytest_twisted.ensureDeferred
async def test_a_20_mb_base64_attachment_is_decoded_in_bounded_memory():
    """BINARY[2] of a 20 MB attachment: the decoded 15 MB never sit in memory (two
    passes over the stored bytes, a chunk at a time)."""
    raw, payload = _big("x@example.org", 15_000_000)
    folder = _BlobFolder(raw)
    row = FetchRow(uid=1, modseq=1, flags=frozenset(), size=len(raw),
                   sections=imapformat.section_map(raw), blob_ref="k")
    [item] = parse_fetch_items(imap_tokenize(b"BINARY.PEEK[2]")[0])
    sink = _Sink()
    tracemalloc.start()
    try:
        segments = await render_binary(folder, row, None, item)  # type: ignore[arg-type]
        for segment in segments:
            if isinstance(segment, bytes):
                sink.write(segment)
            else:
                await segment.stream(sink, folder)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    header = b"BINARY[2] ~{%d}\r\n" % len(payload)
    assert sink.written == len(header) + len(payload)
    assert sink.tail == payload[-16:]
    assert peak < 8 * 1024 * 1024, peak


@pytest.mark.parametrize("sync", [True, False])
@pytest_twisted.ensureDeferred
async def test_append_literal8_stores_the_octets_byte_exact(server, sync):
    """APPEND with ``~{n}`` (and ``~{n+}``) takes any octet, NUL included, and BINARY[]
    returns exactly those bytes; a literal8 anywhere else is BAD."""
    inbox, key = await new_inbox(server, f"bin-append-{sync}")
    message = (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: nul\r\n"
               b"Content-Type: application/octet-stream\r\n"
               b"Content-Transfer-Encoding: binary\r\n\r\n" + BYTES + b"\r\nend\r\n")

    def work(wire: Client):
        appended = wire.transcript(b"APPEND INBOX (\\Flagged) ",
                                   Lit(message, sync=sync, binary=True))
        wire.transcript(b"SELECT INBOX")
        body = wire.transcript(b"FETCH 1 (BODY.PEEK[] BINARY.PEEK[] BINARY.PEEK[1] FLAGS)")
        refused = wire.transcript(b"SELECT ", Lit(b"INBOX", binary=True))
        search = wire.transcript(b"SEARCH TEXT ", Lit(b"x", binary=True))
        return appended, body, refused, search

    appended, body, refused, search = await session(server.imap_port, inbox["email"], key,
                                                    work)
    assert re.search(rb"t\d+ OK \[APPENDUID \d+ 1\]", appended), appended
    # BINARY[] gives the stored octets; BODY[]'s literal may not carry NUL (RFC 3501 §9
    # CHAR8): it goes out as 0x80, as Dovecot sends it, the length kept.
    assert _item(body, b"BINARY[]") == (b"~", message)
    assert _item(body, b"BODY[]")[1] == message.replace(b"\x00", b"\x80")
    assert _item(body, b"BINARY[1]") == (b"~", BYTES + b"\r\nend\r\n")
    assert b"\\Flagged" in body
    assert re.search(rb"t\d+ BAD ", refused), refused
    assert re.search(rb"t\d+ BAD ", search), search


@pytest_twisted.ensureDeferred
async def test_large_part_is_decoded_in_the_thread_pool_byte_exact(server, monkeypatch):
    """A 4 MB base64 body (over binaryfetch.THREAD_BYTES): FETCH BINARY[1] and
    BINARY.SIZE[1] give exactly the original octets, decoded in the reactor's thread
    pool a chunk per hop -- never the whole body in one call, never on the reactor."""
    from agentpost.imap.commands import binaryfetch

    hops: list[int] = []
    original = binaryfetch.deferToThreadPool

    def spy(reactor, pool, fn, chunk):  # type: ignore[no-untyped-def]
        hops.append(len(chunk))
        return original(reactor, pool, fn, chunk)

    monkeypatch.setattr(binaryfetch, "deferToThreadPool", spy)
    inbox, key = await new_inbox(server, "bin-thread")
    payload = (BYTES * (4_000_000 // 256 + 1))[:4_000_000]
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    raw = (f"From: big@example.org\r\nTo: {inbox['email']}\r\nSubject: one part\r\n"
           "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
           "Content-Transfer-Encoding: base64\r\n\r\n").encode() + encoded
    await server.deliver(raw, [inbox["email"]])

    def work(wire: Client):
        return (wire.transcript(b"FETCH 1 (BINARY.SIZE[1] BINARY.PEEK[1])"),
                wire.transcript(b"FETCH 1 (BINARY.PEEK[1]<3999000.5000>)"))

    whole, tail = await _selected(server, inbox, key, work)
    assert _size(whole, b"BINARY.SIZE[1]") == len(payload)
    assert _item(whole, b"BINARY[1]") == (b"~", payload)
    assert _item(tail, b"BINARY[1]<3999000>") == (b"~", payload[3999000:])
    assert hops and max(hops) <= binaryfetch.CHUNK_BYTES
    assert sum(hops) >= 3 * len(encoded)  # size pass, measuring pass, streaming pass...


def test_small_or_identity_bodies_are_decoded_inline():
    """The pool is for bodies worth a thread hop: small ones, octets with nothing to
    undo, and a clock without a pool (task.Clock) decode inline."""
    from twisted.internet import reactor
    from twisted.internet.task import Clock

    from agentpost.imap.commands.binaryfetch import THREAD_BYTES, _Body, _pool

    big = THREAD_BYTES + 1
    assert _pool(reactor, _Body(0, big, "base64")) is reactor
    assert _pool(reactor, _Body(0, THREAD_BYTES, "base64")) is None
    assert _pool(reactor, _Body(0, big, "binary")) is None
    assert _pool(reactor, _Body(0, big, None)) is None
    assert _pool(Clock(), _Body(0, big, "base64")) is None
