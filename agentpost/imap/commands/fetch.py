"""FETCH and UID FETCH, with CONDSTORE/QRESYNC modifiers (RFC 7162 CHANGEDSINCE, VANISHED).

- **Only what was asked for is read**: :class:`FetchWants` tells the backend which
  columns the items need, so ``FETCH 1:* (FLAGS)`` never reads bodies.
- **Byte-exact bodies**: sections are slices of the stored message
  (:mod:`agentpost.mail.imapformat`), partial ranges included.
- **Large bodies are streamed**: above the session's ``stream_threshold`` a body
  section is a byte range of the stored message (the section map written at ingest),
  sent in chunks that wait for the transport to drain, so memory per FETCH stays at a
  chunk. Smaller bodies are read a few messages ahead of the one being sent.
- Each FETCH item has its own small renderer (:data:`_SIMPLE_ITEMS`, :func:`_content`).
- **UID / FLAGS / MODSEQ only: answered from the session's view**, no database read
  (:func:`_fetch_from_view`). That is most client polling (``FETCH 1:* (UID FLAGS)``
  after every sync, CONDSTORE's ``(CHANGEDSINCE n)``), and the view
  (:class:`SelectedMailbox` ``meta``) already holds every message's UID, MODSEQ and
  flags: this session's own STORE and implicit \\Seen write into it, and other writers'
  changes reach it through the folder's process-wide mirror, which the dispatcher asks
  after every such FETCH, before the tagged OK (``IMAP4ServerProtocol._after``), as
  Dovecot answers from its index and syncs it after the command. So a flag change made
  elsewhere and not yet taken into the view is told as an unsolicited FETCH right after
  this FETCH's own responses, instead of inside them; the client ends the command with
  the same state. A change by another session of this process is in the mirror by its
  OK; one by another process or the API is once its NOTIFY is heard (a moment after its
  commit; until then the next command tells it, where the database path would have
  shown it already). The bytes of each response are those the database path renders
  for the same state (UID first for UID FETCH, MODSEQ after FLAGS once CONDSTORE is on,
  RFC 7162 §3.1.4.1). A message another session expunged stays in the view until the
  expunge may be told (never during FETCH, RFC 3501 §7.4.1), and is described with the
  UID, flags and MODSEQ the session knows, as RFC 2180 §4.1.3 allows and as the database
  path already did for these items (it ends OK, not NO [EXPUNGEISSUED]: nothing asked
  for is missing); the EXPUNGE (or VANISHED) follows at the next command that may carry
  it. VANISHED (EARLIER) and the CHANGEDSINCE filter were computed from the view
  already. INTERNALDATE and RFC822.SIZE are not in the view and still go to the
  database, as does anything with a body.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from agentpost.imap.commands.binaryfetch import DecodedRange, render_binary
from agentpost.imap.commands.common import arguments, selected
from agentpost.imap.commands.offload import cut
from agentpost.imap.errors import Answered, no
from agentpost.imap.interfaces import FetchRow, FetchWants, IMAPFolder, MessageMeta
from agentpost.imap.parser import (
    Command,
    FetchItem,
    ParseError,
    SavedResult,
    number,
    parse_fetch_items,
    parse_seqset,
    resolve_seqset,
)
from agentpost.imap.selected import SelectedMailbox
from agentpost.imap.states import State
from agentpost.imap.updates import enable_condstore
from agentpost.imap.wire import internaldate, literal, no_nul, no_nul_text
from agentpost.mail import imapformat
from agentpost.model import errors

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

log = logging.getLogger(__name__)

#: One read from the blob store while streaming a literal.
STREAM_CHUNK_BYTES = 256 * 1024
#: Bodies (each under the stream threshold) read ahead of the FETCH response being sent.
READ_AHEAD = 8


@dataclass(frozen=True)
class _Range:
    """Literal bytes to stream from the stored message: ``length`` octets from ``start``."""

    row: FetchRow
    start: int
    length: int


Segment = bytes | _Range | DecodedRange

_WHOLE = imapformat.SectionSpec()
_RFC822_SPECS = {"RFC822": _WHOLE, "RFC822.HEADER": imapformat.SectionSpec(text="HEADER"),
                 "RFC822.TEXT": imapformat.SectionSpec(text="TEXT")}


def _content_spec(item: FetchItem) -> imapformat.SectionSpec | None:
    """The body section a FETCH item returns, if it returns one."""
    if item.section is not None:
        return item.section
    return _RFC822_SPECS.get(item.name)


# ---------------------------------------------------------------------- the command

async def fetch(session: IMAP4ServerProtocol, command: Command) -> None:
    view = selected(session)
    args = arguments(command, 2, 3)
    requested = parse_seqset(args[0], saved=True)
    uids = view.seq_uids(requested, command.uid)
    items = parse_fetch_items(args[1])
    changedsince, vanished = (_modifiers(session, command, args[2]) if len(args) == 3
                              else (None, False))
    if changedsince is not None or any(i.name == "MODSEQ" for i in items):
        enable_condstore(session)
    if changedsince is not None:
        if vanished:
            # RFC 7162 §3.2.6: UIDs of the set that are gone, before the FETCHes.
            # ("$" names only UIDs still in the view: nothing of it is gone.)
            gone = "" if isinstance(requested, SavedResult) else \
                view.missing(resolve_seqset(requested, view.top_uid))
            if gone:
                session.send(f"* VANISHED (EARLIER) {gone}")
        uids = [u for u in uids if view.meta[u].modseq > changedsince]
        if not any(i.name == "MODSEQ" for i in items):
            items.append(FetchItem("MODSEQ"))
    if command.uid and not any(i.name == "UID" for i in items):
        items.insert(0, FetchItem("UID"))
    if not uids:
        return
    await _fetch(session, view, uids, items)


async def fetch_for_notify(session: IMAP4ServerProtocol, view: SelectedMailbox,
                           uids: list[int], items: list[FetchItem]) -> None:
    """NOTIFY's MessageNew fetch attributes (RFC 5465 §5.2) for messages just announced
    by EXISTS: the responses a UID FETCH of them would send (UID first), through the
    same renderers and streaming. NO [EXPUNGEISSUED] when some are gone meanwhile."""
    if not any(i.name == "UID" for i in items):
        items = [FetchItem("UID"), *items]
    await _fetch(session, view, uids, items)


def _modifiers(session: IMAP4ServerProtocol, command: Command,
               mod: Any) -> tuple[int | None, bool]:
    """(CHANGEDSINCE modseq, VANISHED) of ``FETCH set items (modifiers)``."""
    if not isinstance(mod, list) or not mod:
        raise ParseError("Unknown FETCH modifier")
    changedsince = None
    vanished = False
    i = 0
    while i < len(mod):
        name = str(mod[i]).upper()
        if name == "CHANGEDSINCE" and i + 1 < len(mod):
            changedsince = number(mod[i + 1], "CHANGEDSINCE")
            i += 2
        elif name == "VANISHED" and command.uid and session.qresync:
            vanished = True
            i += 1
        else:
            raise ParseError("Unknown FETCH modifier")
    if vanished and changedsince is None:
        raise ParseError("VANISHED needs CHANGEDSINCE")
    return changedsince, vanished


def _wants(items: list[FetchItem]) -> FetchWants:
    names = {i.name for i in items}
    return FetchWants(internaldate="INTERNALDATE" in names, size="RFC822.SIZE" in names,
                      envelope="ENVELOPE" in names,
                      bodystructure=bool(names & {"BODY", "BODYSTRUCTURE"}),
                      content=any(_content_spec(i) is not None for i in items))


async def _mark_seen(session: IMAP4ServerProtocol, view: SelectedMailbox, uids: list[int],
                     items: list[FetchItem]) -> set[int]:
    """A non-PEEK body fetch sets \\Seen (RFC 3501 §6.4.5); the UIDs it changed."""
    marks_seen = any((i.name in ("BODY[]", "BINARY") and not i.peek)
                     or i.name in ("RFC822", "RFC822.TEXT") for i in items)
    seen_now: set[int] = set()
    if not marks_seen or view.readonly or session.account is None or \
            not session.account.can_write:
        return seen_now
    unseen = [u for u in uids if "\\Seen" not in view.meta[u].flags]
    if unseen:
        for meta in await view.folder.set_seen(unseen):
            if meta.uid in view.meta:
                view.meta[meta.uid] = meta
                seen_now.add(meta.uid)
    return seen_now


async def _fetch(session: IMAP4ServerProtocol, view: SelectedMailbox, uids: list[int],
                 items: list[FetchItem]) -> None:
    if FROM_VIEW and all(i.name in _KNOWN_ITEMS for i in items):
        await _fetch_from_view(session, view, uids, items)
        return
    wants = _wants(items)
    seen_now = await _mark_seen(session, view, uids, items)
    rows, gone = _rows_or_known(view, uids, items, await view.folder.fetch(uids, wants))
    needs_raw = _raw_needed(wants, session.stream_threshold, _headers_only(items))
    # Small bodies are read a few messages ahead of the one being sent (each read is a
    # thread hop or an S3 GET): at most READ_AHEAD bodies under the stream threshold
    # are in memory at once.
    reads: dict[int, defer.Deferred[bytes | None]] = {}

    def start(index: int) -> None:
        if index < len(rows) and index not in reads and needs_raw(rows[index]):
            reads[index] = defer.ensureDeferred(_load_raw(view.folder, rows[index]))

    try:
        for index, row in enumerate(rows):
            for ahead in range(index, index + READ_AHEAD):
                start(ahead)
            raw = None
            if index in reads:
                raw = await reads.pop(index)
                if raw is None:
                    gone = True  # expunged meanwhile
                    continue
            if session.state is not State.SELECTED:
                return
            try:
                segments = await _render(session, view, row, raw, items, row.uid in seen_now)
            except (errors.NotFound, KeyError):  # read by range: collected meanwhile
                if raw is not None:
                    raise
                gone = True  # expunged meanwhile, as a whole read would have found
                continue
            if not await _send_segments(session, view.folder, segments):
                return
    finally:
        for d in reads.values():  # the session ended or failed mid-FETCH
            d.addErrback(lambda _: None)
            d.cancel()
    if gone:
        # The client still holds these sequence numbers and may not be told of the
        # expunge during FETCH (RFC 3501 §7.4.1): say so instead of a silent OK.
        raise no("Some of the requested messages no longer exist", "EXPUNGEISSUED")


#: Items the session's own view answers (``view.meta``): a message expunged by another
#: session, which the client still holds, can still be described by them.
_KNOWN_ITEMS = frozenset({"UID", "FLAGS", "MODSEQ"})
#: Answer a FETCH of only :data:`_KNOWN_ITEMS` from the view (False: from the database,
#: as before; the tests compare the two).
FROM_VIEW = True
#: Bytes of view-answered responses written before waiting for the transport to drain.
VIEW_BATCH_BYTES = 64 * 1024

_VIEW_ITEMS: dict[str, Callable[[SelectedMailbox, MessageMeta], bytes]] = {
    "UID": lambda view, meta: b"UID %d" % meta.uid,
    "FLAGS": lambda view, meta: b"FLAGS " + view.flags_text(meta.uid, meta.flags).encode(),
    "MODSEQ": lambda view, meta: b"MODSEQ (%d)" % meta.modseq,
}


async def _fetch_from_view(session: IMAP4ServerProtocol, view: SelectedMailbox,
                           uids: list[int], items: list[FetchItem]) -> None:
    """The responses :func:`_render` gives for these items, from ``view.meta`` (see the
    module docstring): no query, and a write per batch instead of per message."""
    # The dispatcher then asks the folder's mirror (memory, while it is current) for
    # anything newer than the view before the tagged OK: a STORE by another session of
    # this process is in the mirror at its OK, before its NOTIFY marks this view dirty,
    # and the database path would have shown it.
    view.dirty = True
    names: list[str] = []
    for item in items:  # a repeated item is answered once, in its first place
        if item.name not in names:
            names.append(item.name)
    if session.condstore and "FLAGS" in names and "MODSEQ" not in names:
        names.append("MODSEQ")  # RFC 7162 §3.1: FLAGS travel with their MODSEQ
    renderers = [_VIEW_ITEMS[name] for name in names]
    batch: list[bytes] = []
    size = pos = last = 0
    for uid in uids:  # ascending: each sequence number is looked for from the last one
        meta = view.meta[uid]
        pos = bisect.bisect_left(view.uids, uid, pos if uid >= last else 0)
        last = uid
        line = b"* %d FETCH (%s)\r\n" % (pos + 1, b" ".join([r(view, meta) for r in renderers]))
        batch.append(line)
        size += len(line)
        if size >= VIEW_BATCH_BYTES:
            session.write(b"".join(batch))
            batch, size = [], 0
            await session.drain()
            if session.state is not State.SELECTED:
                return
    if batch:
        session.write(b"".join(batch))
        await session.drain()


def _rows_or_known(view: SelectedMailbox, uids: list[int], items: list[FetchItem],
                   fetched: list[FetchRow]) -> tuple[list[FetchRow], bool]:
    """The rows to answer, in ``uids`` order, and whether some messages cannot be.

    A message another session expunged stays in this session's view until the expunge
    may be reported, which is never during FETCH (RFC 3501 §7.4.1). When every item is
    one the view knows (UID, FLAGS, MODSEQ) the server answers from what it knows, as
    RFC 2180 §4.1.3 allows, and the FETCH succeeds; when an item needs the stored
    message, the gone message is left out and the FETCH ends NO [EXPUNGEISSUED]
    (RFC 5530)."""
    by_uid = {r.uid: r for r in fetched if r.uid in view.meta}
    known = all(i.name in _KNOWN_ITEMS for i in items)
    rows: list[FetchRow] = []
    gone = False
    for uid in uids:
        row = by_uid.get(uid)
        if row is None and known and uid in view.meta:
            meta = view.meta[uid]
            row = FetchRow(meta.uid, meta.modseq, meta.flags)
        if row is None:
            gone = True
        else:
            rows.append(row)
    return rows, gone


def _headers_only(items: list[FetchItem]) -> bool:
    """Whether every body section asked for is the message's own header (HEADER,
    HEADER.FIELDS, RFC822.HEADER): what a client syncing a folder fetches for each new
    message. Those are read by range from the section map whatever the message's size,
    instead of reading (and hashing) a whole message of up to ``stream_threshold``
    bytes for a few hundred of them."""
    specs = [spec for spec in map(_content_spec, items) if spec is not None]
    return bool(specs) and all(not spec.part and spec.text.startswith("HEADER")
                               for spec in specs)


def _raw_needed(wants: FetchWants, threshold: int,
                headers_only: bool = False) -> Callable[[FetchRow], bool]:
    """Whether a row's whole message must be read: for small bodies (unless only its
    header is wanted), and for what the backend did not pre-render."""

    def needs_raw(row: FetchRow) -> bool:
        streaming = (wants.content and row.sections is not None and row.size is not None
                     and (row.size > threshold or headers_only))
        return (wants.content and not streaming) or \
            (wants.envelope and row.envelope is None) or \
            (wants.bodystructure and (row.bodystructure is None or row.body is None))

    return needs_raw


async def _send_segments(session: IMAP4ServerProtocol, folder: IMAPFolder,
                         segments: list[Segment]) -> bool:
    """Write one message's response; False once the session has ended."""
    for segment in segments:
        if not isinstance(segment, bytes):
            try:
                if isinstance(segment, _Range):
                    await _stream_range(session, folder, segment)
                else:  # BINARY: decoded while sent (RFC 3516)
                    await segment.stream(session, folder)
            except Exception:
                # The literal's length is on the wire: no answer can follow a short
                # literal, so the only honest move is to hang up.
                log.exception("imap %s: streaming a body failed; disconnecting",
                              session.session_id)
                session.close()
                raise Answered() from None
        else:
            session.write(segment)
        await session.drain()
        if session.state is State.LOGOUT:
            return False
    return True


# ---------------------------------------------------------------------- reading bodies

async def _load_raw(folder: IMAPFolder, row: FetchRow) -> bytes | None:
    """The stored message (None if expunged meanwhile)."""
    try:
        return await folder.read_message(row)
    except (errors.NotFound, KeyError):  # KeyError: BlobNotFound, collected meanwhile
        return None


async def _stream_range(session: IMAP4ServerProtocol, folder: IMAPFolder,
                        rng: _Range) -> None:
    """Send a literal's bytes from the blob store a chunk at a time, waiting whenever
    the transport's buffer is full: a 50 MB message never sits in memory, and a slow
    client slows the reads instead of growing the buffer."""
    pos, left = rng.start, rng.length
    while left > 0:
        chunk = await folder.read_range(rng.row, pos, min(left, STREAM_CHUNK_BYTES))
        if not chunk:  # the blob is shorter than recorded: never send a short literal
            raise errors.StorageFailure()
        if session.state is State.LOGOUT:
            return
        session.write(no_nul(chunk))
        pos += len(chunk)
        left -= len(chunk)
        await session.drain()


async def _content(folder: IMAPFolder, row: FetchRow, raw: bytes | None,
                   spec: imapformat.SectionSpec, clock: Any = None) -> list[Segment]:
    """The literal of one body section: sliced from ``raw``, or planned from the
    section map and streamed (HEADER.FIELDS reads just that header)."""
    if raw is not None:
        return [literal(await cut(clock, imapformat.section, raw, spec))]
    assert row.sections is not None
    plan = imapformat.plan_section(row.sections, spec)
    if plan.fields is not None:
        header = await folder.read_range(row, plan.start, plan.length)
        data = await cut(clock, imapformat.filter_header_fields, header, *plan.fields)
        if spec.partial is not None:
            data = data[spec.partial[0]:spec.partial[0] + spec.partial[1]]
        return [literal(data)]
    start, end = plan.start, plan.end
    if spec.partial is not None:
        start = min(end, start + spec.partial[0])
        end = min(end, start + spec.partial[1])
    length = end - start
    if length <= STREAM_CHUNK_BYTES:
        data = await folder.read_range(row, start, length) if length else b""
        if len(data) != length:
            raise errors.StorageFailure()
        return [literal(data)]
    return [b"{%d}\r\n" % length, _Range(row, start, length)]


# ---------------------------------------------------------------------- rendering

def _size(view: SelectedMailbox, row: FetchRow, raw: bytes | None) -> bytes:
    return b"RFC822.SIZE %d" % (row.size if row.size is not None else len(raw or b""))


def _envelope(view: SelectedMailbox, row: FetchRow, raw: bytes | None) -> bytes:
    env = row.envelope if row.envelope is not None else imapformat.envelope(raw or b"")
    return b"ENVELOPE " + no_nul_text(env.encode("utf-8"))


def _bodystructure(view: SelectedMailbox, row: FetchRow, raw: bytes | None) -> bytes:
    bs = row.bodystructure if row.bodystructure is not None else \
        imapformat.bodystructure(raw or b"", True)
    return b"BODYSTRUCTURE " + no_nul_text(bs.encode("utf-8"))


def _body(view: SelectedMailbox, row: FetchRow, raw: bytes | None) -> bytes:
    body = row.body if row.body is not None else imapformat.bodystructure(raw or b"", False)
    return b"BODY " + no_nul_text(body.encode("utf-8"))


def _flags(view: SelectedMailbox, row: FetchRow, raw: bytes | None) -> bytes:
    return b"FLAGS " + view.flags_text(row.uid, row.flags).encode()


#: The items that are not body sections, each rendered from the row (and the message
#: when the backend did not pre-render it).
_SIMPLE_ITEMS: dict[str, Callable[[SelectedMailbox, FetchRow, bytes | None], bytes]] = {
    "UID": lambda view, row, raw: b"UID %d" % row.uid,
    "FLAGS": _flags,
    "MODSEQ": lambda view, row, raw: b"MODSEQ (%d)" % row.modseq,
    "INTERNALDATE": lambda view, row, raw: b"INTERNALDATE " +
    internaldate(row.internaldate).encode(),
    "RFC822.SIZE": _size,
    "ENVELOPE": _envelope,
    "BODYSTRUCTURE": _bodystructure,
    "BODY": _body,
}


async def _item(view: SelectedMailbox, row: FetchRow, raw: bytes | None,
                item: FetchItem, clock: Any = None) -> list[Segment] | None:
    """One item's part of the response (None for an item that renders nothing)."""
    simple = _SIMPLE_ITEMS.get(item.name)
    if simple is not None:
        return [simple(view, row, raw)]
    if item.name in ("BINARY", "BINARY.SIZE"):
        return [*await render_binary(view.folder, row, raw, item, clock)]
    spec = _content_spec(item)
    if spec is None:
        return None
    if item.section is not None:
        label = "BODY[" + item.section.render() + "]"
        if item.section.partial is not None:
            label += f"<{item.section.partial[0]}>"
    else:
        label = item.name
    return [label.encode("utf-8") + b" ", *await _content(view.folder, row, raw, spec, clock)]


async def _render(session: IMAP4ServerProtocol, view: SelectedMailbox, row: FetchRow,
                  raw: bytes | None, items: list[FetchItem],
                  add_flags: bool) -> list[Segment]:
    """``* n FETCH (...)`` for one message; ``add_flags`` when this FETCH set \\Seen."""
    parts: list[list[Segment]] = []
    done: set[str] = set()
    if add_flags and session.condstore and not any(i.name == "UID" for i in items):
        # The implicit \Seen change is reported like a STORE's: with UID and MODSEQ
        # once CONDSTORE is on (RFC 7162 §3.1).
        parts.append([b"UID %d" % row.uid])
        done.add("UID")
    for item in items:
        key = item.name if item.section is None else "BODY[" + item.section.render() + "]"
        if key in done and item.section is None:
            continue
        done.add(key)
        part = await _item(view, row, raw, item, session.clock)
        if part is not None:
            parts.append(part)
    if add_flags and "FLAGS" not in done:
        parts.append([_flags(view, row, raw)])
        done.add("FLAGS")
    if session.condstore and "FLAGS" in done and "MODSEQ" not in done:
        # With CONDSTORE on, FLAGS always travel with their MODSEQ (RFC 7162 §3.1).
        parts.append([b"MODSEQ (%d)" % row.modseq])
    out: list[Segment] = [b"* %d FETCH (" % view.seq(row.uid)]
    for i, part in enumerate(parts):
        if i:
            out.append(b" ")
        out += part
    out.append(b")\r\n")
    return _coalesce(out)


def _coalesce(segments: list[Segment]) -> list[Segment]:
    """Neighbouring byte strings joined: one write per small response."""
    merged: list[Segment] = []
    for segment in segments:
        if isinstance(segment, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += segment
        else:
            merged.append(segment)
    return merged
