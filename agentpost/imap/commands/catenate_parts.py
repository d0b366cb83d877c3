"""CATENATE (RFC 4469): the bytes a ``URL`` cat-part names, copied into a new message.

Why a module of its own: APPEND's handler (:mod:`agentpost.imap.commands.append`)
assembles each CATENATE message from its TEXT literals (spooled by the reader) and
its URLs; resolving a URL is a read of another stored message, and what it may read
is the whole tenancy question of CATENATE:

- A URL is parsed by :func:`agentpost.mail.catenate.parse_catenate_url` (relative IMAP
  URLs only: absolute ``imap://`` URLs, URLAUTH and search URLs are BADURL), resolved
  against the selected mailbox, and looked up **through this session's own account**,
  so a mailbox of another inbox is simply "no such mailbox": ``NO [BADURL url]``, as
  are a UIDVALIDITY that does not match, a missing UID and a missing section part.
- The bytes are byte-exact, exactly what ``FETCH BODY.PEEK[section]<partial>`` returns
  (the section map written at ingest, :mod:`agentpost.mail.imapformat`), read as byte
  ranges of the stored message, so a small part of a large message never loads it.
- Every copy is bounded by what is left of the APPENDLIMIT before anything is read
  (``NO [TOOBIG]``, RFC 4469 §4.2).
- A message stored without a section map (rare: not pre-rendered at ingest) is read
  whole to map it -- except for the top-level ``HEADER`` and ``HEADER.FIELDS[.NOT]``,
  which need only the header block: :func:`agentpost.mail.catenate.read_top_header`
  reads it with a few range reads, ending it where the section map would.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING

from agentpost.imap.commands.common import account
from agentpost.imap.commands.offload import cut
from agentpost.imap.errors import no
from agentpost.imap.interfaces import FetchRow, FetchWants, IMAPFolder
from agentpost.imap.states import State
from agentpost.mail import imapformat
from agentpost.mail.catenate import BadUrl, PartReference, parse_catenate_url, read_top_header
from agentpost.model import errors

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

#: One read from the blob store while copying a referenced part.
COPY_CHUNK_BYTES = 1024 * 1024
_WHOLE = imapformat.SectionSpec()


def too_big() -> Exception:
    """The refusal of a message over the APPENDLIMIT (RFC 4469 §4.2, RFC 7889)."""
    return no("The message would be too large", "TOOBIG")


async def copy_url(session: IMAP4ServerProtocol, url: str, out: IO[bytes],
                   budget: int) -> int:
    """Append to ``out`` the bytes ``url`` names; the number of bytes written.

    Raises :class:`BadUrl` (``NO [BADURL]``) for a URL that does not name a part of a
    message of this account, and ``NO [TOOBIG]`` when the part is over ``budget``.
    """
    view = session.selected if session.state is State.SELECTED else None
    ref = parse_catenate_url(url, selected_mailbox=view.name if view is not None else None)
    folder, row = await _locate_message(session, url, ref)
    spec = ref.section_spec or _WHOLE
    raw: bytes | None = None
    sections = row.sections
    if sections is None:  # not pre-rendered at ingest (rare): map it from the bytes
        if row.size is not None and row.size > 4 * session.max_append_bytes:
            raise too_big()
        if row.size is not None and not spec.part and spec.text in _HEADER_TEXTS:
            return await _copy_top_header(session, url, folder, row, ref, out, budget)
        raw = await folder.read_message(row)
        sections = await cut(session.clock, imapformat.section_map, raw)
    try:
        plan = imapformat.plan_section(sections, spec)
    except ValueError:  # an unreadable map: the stored message is broken
        raise BadUrl(url, "the message cannot be read") from None
    if spec.part and (plan.start, plan.end) == (0, 0):
        raise BadUrl(url, "no such section")
    if plan.fields is not None:  # HEADER.FIELDS[.NOT]: a filtered header
        if plan.length > session.max_append_bytes:
            raise too_big()
        header = raw[plan.start:plan.end] if raw is not None else \
            await _read(url, folder, row, plan.start, plan.length)
        filtered = await cut(session.clock, imapformat.filter_header_fields, header,
                             *plan.fields)
        data = _partial(filtered, ref.partial)
        if len(data) > budget:
            raise too_big()
        out.write(data)
        return len(data)
    start, end = plan.start, plan.end
    if ref.partial is not None:
        offset, length = ref.partial
        start = min(end, start + offset)
        end = end if length is None else min(end, start + length)
    if end - start > budget:
        raise too_big()
    if raw is not None:
        out.write(raw[start:end])
    else:
        pos = start
        while pos < end:
            take = min(COPY_CHUNK_BYTES, end - pos)
            out.write(await _read(url, folder, row, pos, take))
            pos += take
    return end - start


#: Top-level sections that are the header block alone (filtered or not).
_HEADER_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"})


async def _copy_top_header(session: IMAP4ServerProtocol, url: str, folder: IMAPFolder,
                           row: FetchRow, ref: PartReference, out: IO[bytes],
                           budget: int) -> int:
    """:func:`copy_url` for the top-level HEADER or HEADER.FIELDS[.NOT] of a message
    without a section map: only the header block is read; the same bytes and the same
    refusals as mapping the whole message."""
    spec = ref.section_spec or _WHOLE
    assert row.size is not None

    async def read(start: int, length: int) -> bytes:
        return await _read(url, folder, row, start, length)

    header = await read_top_header(read, row.size, 4 * session.max_append_bytes)
    if header is None:
        raise too_big()
    if spec.text == "HEADER":
        data = _partial(header, ref.partial)
    else:
        if len(header) > session.max_append_bytes:
            raise too_big()
        filtered = await cut(session.clock, imapformat.filter_header_fields, header,
                             spec.fields, spec.text == "HEADER.FIELDS")
        data = _partial(filtered, ref.partial)
    if len(data) > budget:
        raise too_big()
    out.write(data)
    return len(data)


async def _locate_message(session: IMAP4ServerProtocol, url: str,
                          ref: PartReference) -> tuple[IMAPFolder, FetchRow]:
    """The folder and row of the message a URL names, in this account only."""
    view = session.selected if session.state is State.SELECTED else None
    if view is not None and view.name == ref.mailbox:
        folder, uidvalidity = view.folder, view.snapshot.uidvalidity
    else:
        try:
            folder, uidvalidity = await account(session).open_folder(ref.mailbox)
        except errors.NotFound:
            raise BadUrl(url, "no such mailbox") from None
    if ref.uidvalidity is not None and ref.uidvalidity != uidvalidity:
        raise BadUrl(url, "the UIDVALIDITY does not match")
    try:
        rows = await folder.fetch([ref.uid], FetchWants(content=True))
    except errors.NotFound:
        raise BadUrl(url, "no such mailbox") from None
    if not rows:
        raise BadUrl(url, "no such message")
    return folder, rows[0]


async def _read(url: str, folder: IMAPFolder, row: FetchRow, start: int,
                length: int) -> bytes:
    """``length`` bytes of the stored message; the blob must hold them (no short copy)."""
    if not length:
        return b""
    try:
        data = await folder.read_range(row, start, length)
    except (errors.NotFound, KeyError):  # KeyError: collected meanwhile (expunged)
        raise BadUrl(url, "the message is gone") from None
    if len(data) != length:
        raise errors.StorageFailure()
    return data


def _partial(data: bytes, partial: tuple[int, int | None] | None) -> bytes:
    if partial is None:
        return data
    offset, length = partial
    return data[offset:] if length is None else data[offset:offset + length]
