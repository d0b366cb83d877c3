"""FETCH ``BINARY[part]<o.n>``, ``BINARY.PEEK[...]`` and ``BINARY.SIZE[part]`` (RFC 3516).

A part's body is returned with its Content-Transfer-Encoding undone
(:mod:`agentpost.mail.binary`). Why it is shaped this way:

- **The literal is known before a byte is written.** Decoding can fail part-way
  (bad base64), and once ``{n}`` is on the wire no ``NO`` can follow it. So the part
  is decoded once to learn its size, whether the returned octets hold a NUL (then
  ``~{n}``, a literal8, RFC 3516 §4.3) and whether it decodes at all; a failure is the
  command's ``NO [UNKNOWN-CTE]`` / ``NO [PARSE]`` (:mod:`agentpost.imap.errors`), before
  this message's response starts.
- **Memory stays bounded.** The encoded body is read a chunk at a time (from the
  message in memory, or from the blob store by the section map for large messages)
  through a push decoder. A result up to :data:`INLINE_BYTES` is kept from that first
  pass; a larger one is decoded a second time while it is sent, chunk by chunk, waiting
  for the transport to drain: a 20 MB base64 attachment never sits in memory, decoded
  or not. The cost is reading the part twice.
- **The reactor is not held.** Decoding is CPU work on the reactor thread, which
  serves every session of every tenant: a body over :data:`THREAD_BYTES` is decoded
  in the reactor's thread pool, one chunk per hop (the push decoder's state is a few
  octets and only one hop runs at a time), so memory stays one chunk per pass. A test
  clock, which has no pool, decodes inline.
- **Sections address leaves.** ``BINARY[]`` is the whole message as stored; a part
  number must name a non-multipart part (decoding a multipart is meaningless, RFC 3516
  §4.2) -- ``NO [CANNOT]``; a part that does not exist is an empty string, as for
  ``BODY[part]``.
- **Section texts, beyond RFC 3516.** Its grammar allows only a part path; like Dovecot
  (and what imaptest expects), ``HEADER``, ``HEADER.FIELDS[.NOT]`` and ``MIME`` are
  accepted and returned exactly as ``BODY[...]`` returns them (a header has no
  transfer encoding to undo), and ``TEXT`` is the addressed message's body decoded
  with that message's Content-Transfer-Encoding -- or, for a multipart body, as it is
  (RFC 2045 §6.4 allows a multipart no other encoding than 7bit, 8bit or binary).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

from agentpost.imap.commands.offload import cut
from agentpost.imap.errors import no
from agentpost.imap.interfaces import FetchRow, IMAPFolder
from agentpost.imap.parser import FetchItem
from agentpost.imap.states import State
from agentpost.mail import binary, imapformat
from agentpost.model import errors

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

__all__ = ["INLINE_BYTES", "DecodedRange", "render_binary"]

#: Encoded octets read (or sliced) at a time.
CHUNK_BYTES = 256 * 1024
#: Decoded results up to this size are kept from the measuring pass and sent as they
#: are; larger ones are decoded again while they are streamed.
INLINE_BYTES = 256 * 1024
#: Most of a part's header read to find its Content-Transfer-Encoding.
MAX_HEADER_BYTES = 256 * 1024
#: Encoded bodies larger than this are decoded in the reactor's thread pool.
THREAD_BYTES = 512 * 1024


@dataclass(frozen=True)
class _Body:
    """The encoded body: ``[start, end)`` of the stored message, and its CTE header
    value (None: the octets as they are)."""

    start: int
    end: int
    cte: str | None


@dataclass(frozen=True)
class DecodedRange:
    """A literal's octets to stream: decoded octets ``[skip, skip + length)`` of a body
    (a fetch segment, sent by :meth:`stream`)."""

    row: FetchRow
    raw: bytes | None
    body: _Body
    skip: int
    length: int

    async def stream(self, session: IMAP4ServerProtocol, folder: IMAPFolder) -> None:
        """Decode the body again and write the window; a short literal is never sent
        (StorageFailure: the caller hangs up)."""
        sent = 0
        async for pos, chunk in _decoded(folder, self.row, self.raw, self.body,
                                         session.clock):
            lo = max(self.skip - pos, 0)
            hi = min(self.skip + self.length - pos, len(chunk))
            if hi > lo:
                if session.state is State.LOGOUT:
                    return
                session.write(chunk[lo:hi])
                sent += hi - lo
                await session.drain()
            if pos + len(chunk) >= self.skip + self.length:
                break
        if sent != self.length:
            raise errors.StorageFailure()


async def _encoded(folder: IMAPFolder, row: FetchRow, raw: bytes | None,
                   body: _Body) -> AsyncIterator[bytes | memoryview]:
    """The encoded body a chunk at a time."""
    view = memoryview(raw) if raw is not None else None
    pos = body.start
    while pos < body.end:
        length = min(body.end - pos, CHUNK_BYTES)
        if view is not None:
            chunk: bytes | memoryview = view[pos:pos + length]
        else:
            chunk = await folder.read_range(row, pos, length)
            if len(chunk) != length:  # the blob is shorter than its section map says
                raise errors.StorageFailure()
        yield chunk
        pos += length


def _pool(clock: Any, body: _Body) -> Any:
    """The reactor to decode ``body`` in the thread pool of, or None: inline."""
    if body.end - body.start <= THREAD_BYTES or body.cte is None or \
            not IReactorThreads.providedBy(clock):
        return None
    if binary.transfer_encoding(body.cte) in binary.IDENTITY_ENCODINGS:
        return None  # nothing to decode: the octets are copied as they are
    return clock


async def _decoded(folder: IMAPFolder, row: FetchRow, raw: bytes | None,
                   body: _Body, clock: Any = None) -> AsyncIterator[tuple[int, bytes]]:
    """(decoded offset, decoded chunk) pairs; the CTE errors of
    :mod:`agentpost.mail.binary` on the way. ``clock``: the session's reactor, whose
    thread pool decodes a large body (:data:`THREAD_BYTES`)."""
    decoder = binary.decoder(body.cte)
    reactor = _pool(clock, body)
    pos = 0
    async for chunk in _encoded(folder, row, raw, body):
        if reactor is not None:
            out = await deferToThreadPool(reactor, reactor.getThreadPool(), decoder.feed,
                                          chunk)
        else:
            out = decoder.feed(chunk)
        if out:
            yield pos, out
            pos += len(out)
    tail = decoder.finish()
    if tail:
        yield pos, tail


#: Section texts whose octets are returned as ``BODY[...]`` returns them: headers carry
#: no Content-Transfer-Encoding to undo.
_HEADER_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "MIME"})


async def _locate_header(folder: IMAPFolder, row: FetchRow, raw: bytes | None,
                         spec: imapformat.SectionSpec, clock: Any = None) -> _Body | bytes:
    """A HEADER, HEADER.FIELDS[.NOT] or MIME section, without its partial range: the
    octets (from the message in memory, or a filtered header), or a range to stream."""
    whole = imapformat.SectionSpec(spec.part, spec.text, spec.fields)
    if raw is None and row.sections is not None:
        try:
            plan = imapformat.plan_section(row.sections, whole)
        except ValueError:  # an unreadable section map: work on the message itself
            raw = await folder.read_message(row)
        else:
            if plan.fields is None:
                return _Body(plan.start, plan.end, None)
            header = await folder.read_range(row, plan.start, plan.length) \
                if plan.length else b""
            return await cut(clock, imapformat.filter_header_fields, header, *plan.fields)
    return await cut(clock, imapformat.section, raw or b"", whole)


async def _locate(folder: IMAPFolder, row: FetchRow, raw: bytes | None,
                  spec: imapformat.SectionSpec, clock: Any = None) -> _Body | bytes | None:
    """The body ``BINARY[spec]`` decodes (None: no such part), or a header section's
    octets."""
    part = spec.part
    if spec.text in _HEADER_TEXTS:
        return await _locate_header(folder, row, raw, spec, clock)
    if not part and not spec.text:
        size = len(raw) if raw is not None else row.size or 0
        return _Body(0, size, None)
    find = imapformat.locate_message if spec.text == "TEXT" else imapformat.locate_part
    loc = None
    if raw is None and row.sections is not None:
        try:
            loc = find(row.sections, part)
        except ValueError:  # an unreadable section map: work on the message itself
            raw = await folder.read_message(row)
    if raw is not None:
        loc = find(raw, part)
    if loc is None:
        return None
    if loc.multipart:
        if spec.text == "TEXT":
            # A multipart's only encodings are 7bit, 8bit and binary (RFC 2045 §6.4):
            # its text is returned as it is, each part keeping its own header.
            return _Body(loc.bstart, loc.end, None)
        raise no("BINARY applies to single parts, not to a multipart", "CANNOT")
    length = min(loc.bstart - loc.hstart, MAX_HEADER_BYTES)
    if raw is not None:
        header = raw[loc.hstart:loc.hstart + length]
    else:
        header = await folder.read_range(row, loc.hstart, length) if length else b""
    cte = imapformat.header_value(header, "content-transfer-encoding")
    binary.transfer_encoding(cte)  # UNKNOWN-CTE now, before any reading
    return _Body(loc.bstart, loc.end, cte)


@dataclass
class _Scan:
    """What the measuring pass learnt: the decoded size, and for the requested window
    whether it holds a NUL and (when small) its octets."""

    size: int = 0
    nul: bool = False
    kept: bytearray | None = None


async def _scan(folder: IMAPFolder, row: FetchRow, raw: bytes | None, body: _Body,
                window: tuple[int, int] | None, size_only: bool, clock: Any) -> _Scan:
    """Decode the whole body once (a decoding error surfaces here)."""
    scan = _Scan(kept=None if size_only else bytearray())
    skip, count = window if window is not None else (0, None)
    async for pos, chunk in _decoded(folder, row, raw, body, clock):
        scan.size = pos + len(chunk)
        if size_only:
            continue
        lo = max(skip - pos, 0)
        hi = len(chunk) if count is None else min(skip + count - pos, len(chunk))
        if hi <= lo:
            continue
        # (bytes.find, not needs_literal8 on a memoryview: "in" on a view is per item)
        scan.nul = scan.nul or chunk.find(b"\x00", lo, hi) >= 0
        if scan.kept is not None:
            scan.kept += memoryview(chunk)[lo:hi]
            if len(scan.kept) > INLINE_BYTES:
                scan.kept = None  # too large to keep: decoded again while sent
    return scan


async def render_binary(folder: IMAPFolder, row: FetchRow, raw: bytes | None,
                        item: FetchItem, clock: Any = None) -> list[bytes | DecodedRange]:
    """The ``BINARY[...]`` or ``BINARY.SIZE[...]`` part of one message's FETCH response.
    ``clock``: the session's reactor (its thread pool decodes large bodies)."""
    assert item.section is not None
    partial = item.section.partial
    path = imapformat.SectionSpec(item.section.part, item.section.text,
                                  item.section.fields).render()
    body = await _locate(folder, row, raw, item.section, clock)
    if isinstance(body, bytes):  # a header section: nothing to decode
        return _header_literal(item, path, body)
    if item.name == "BINARY.SIZE":
        size = 0
        if body is not None:
            identity = binary.transfer_encoding(body.cte) in binary.IDENTITY_ENCODINGS
            size = (body.end - body.start if identity
                    else (await _scan(folder, row, raw, body, None, True, clock)).size)
        return [b"BINARY.SIZE[%s] %d" % (path.encode(), size)]
    label = b"BINARY[%s]" % path.encode()
    if partial is not None:
        label += b"<%d>" % partial[0]
    if body is None:
        return [label + b" {0}\r\n"]
    scan = await _scan(folder, row, raw, body, partial, False, clock)
    skip, length = 0, scan.size
    if partial is not None:
        skip = min(partial[0], scan.size)
        length = min(partial[1], scan.size - skip)
    marker = b"~{%d}\r\n" if scan.nul else b"{%d}\r\n"
    head = label + b" " + marker % length
    if scan.kept is not None:
        return [head + bytes(scan.kept)]
    return [head, DecodedRange(row, raw, body, skip, length)]


def _header_literal(item: FetchItem, path: str, data: bytes) -> list[bytes | DecodedRange]:
    """``BINARY.SIZE[...]`` or ``BINARY[...]<o.n>`` of a header section's octets."""
    if item.name == "BINARY.SIZE":
        return [b"BINARY.SIZE[%s] %d" % (path.encode(), len(data))]
    label = b"BINARY[%s]" % path.encode()
    assert item.section is not None
    if item.section.partial is not None:
        origin, count = item.section.partial
        label += b"<%d>" % origin
        data = data[origin:origin + count]
    marker = b"~{%d}\r\n" if b"\x00" in data else b"{%d}\r\n"
    return [label + b" " + marker % len(data) + data]
