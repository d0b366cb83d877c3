"""Turn received bytes into the fields we index, without ever failing on bad input.

The raw bytes are always kept separately (byte-exact); this module only extracts
what the API and search need. Every step is defensive: a malformed header or MIME
part degrades to "missing" or "as text", never to an exception.
"""

from __future__ import annotations

import bisect
import contextlib
import email
import email.headerregistry
import email.policy
import email.utils
import functools
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from typing import Any

from agentpost.mail import largeparts
from agentpost.mail.sanitize import header_text, safe_filename, safe_mime_type, storable_date

log = logging.getLogger(__name__)

class _CachingPolicy(email.policy.EmailPolicy):
    """``email.policy.default`` that parses each distinct header once.

    The stdlib builds a new header object on *every* access: ``get_content_type`` alone
    re-parsed Content-Type nine times per message, 70% of parse time. Header objects
    are immutable, and values repeat across messages (``text/plain; charset=utf-8``),
    so a bounded cache keyed by the raw (name, value) is safe and shared.
    """

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if hasattr(value, "name"):
            return super().header_fetch_parse(name, value)
        if len(value) > MAX_STRUCTURED_HEADER:
            # The stdlib's structured parser is quadratic on hostile input (a From of
            # 5,000 '"' took 3.4 s, 100,000 never finished); a long value is read as
            # unstructured text, which parses in linear time, and callers that need
            # addresses or parameters split that text with the linear compat parsers.
            # Past MAX_PARSED_HEADER the index keeps a prefix (Postfix's header_size_limit
            # discards the excess the same way); the stored raw message keeps every byte.
            value = value[:MAX_PARSED_HEADER]
            return _LongHeader(name, value.replace("\r", "").replace("\n", ""))
        if len(value) > 256:
            return super().header_fetch_parse(name, value)
        return _fetch_parse(name, value)


#: Longest header value given to the structured (address/parameter) parser; its worst
#: case at this size is a few tens of milliseconds. Ordinary headers are far shorter.
MAX_STRUCTURED_HEADER = 1024
#: Longest prefix of any one header value that is decoded for the index at all.
MAX_PARSED_HEADER = 16 * 1024
#: Occurrences of one address field (To, Cc, …) read for the index.
MAX_ADDRESS_FIELDS = 50


class _LongHeader(email.headerregistry.UnstructuredHeader, email.headerregistry.BaseHeader):
    """An over-long header value, kept (and decoded) as unstructured text."""


_POLICY = _CachingPolicy()


@functools.lru_cache(maxsize=1024)
def _fetch_parse(name: str, value: str) -> Any:
    return email.policy.EmailPolicy.header_fetch_parse(_POLICY, name, value)


_MSGID_RE = re.compile(r"<([^<>\s]+)>")
_WS_RE = re.compile(r"\s+")
MAX_PREVIEW = 200
#: Attachments extracted per message; later parts stay in the raw message (IMAP still
#: serves them). 1.5 MB of tiny ``image/png`` parts made 50,000 blobs and rows per copy.
MAX_ATTACHMENTS = 1000


@dataclass
class ParsedAttachment:
    """A decoded non-body part: in ``content``, or (large parts) spooled to ``path``."""

    filename: str
    mime_type: str
    content: bytes | None
    content_id: str | None
    disposition: str | None
    part_index: int
    path: str | None = None  # a temporary file the caller must delete
    spooled_size: int = 0
    spooled_sha256: str = ""

    @property
    def sha256(self) -> str:
        """Hex digest of the decoded content."""
        if self.content is None:
            return self.spooled_sha256
        return hashlib.sha256(self.content).hexdigest()

    @property
    def size(self) -> int:
        return len(self.content) if self.content is not None else self.spooled_size

    def discard(self) -> None:
        """Remove the spool file, if any."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


@dataclass
class ParsedMessage:
    """What the store indexes about one message."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    subject: str = ""
    from_address: dict[str, str] | None = None
    to_addresses: list[dict[str, str]] = field(default_factory=list)
    cc_addresses: list[dict[str, str]] = field(default_factory=list)
    bcc_addresses: list[dict[str, str]] = field(default_factory=list)
    reply_to: list[dict[str, str]] = field(default_factory=list)
    message_id: str | None = None
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    sent_at: datetime | None = None
    text_body: str | None = None
    html_body: str | None = None
    attachments: list[ParsedAttachment] = field(default_factory=list)
    claimed: int = 0  # large parts the walk found (see parse_message)
    extracted_text: str | None = None  # filled in by ingest (agentpost.mail.reply)

    def discard(self) -> None:
        """Remove the attachments' spool files."""
        for att in self.attachments:
            att.discard()

    @property
    def preview(self) -> str:
        """A short single-line excerpt for lists.

        Works on a growing prefix of the body, never on all of it: collapsing the
        whitespace of a 10 MB body just to keep 200 characters cost 13x its size."""
        body = self.text_body or self.html_body or ""
        # Collapsing a text prefix gives a prefix of the collapsed whole, so a small
        # first window is exact for text (it was 3% of the ingest profile at 3,200);
        # HTML keeps the wide one, where a cut tag could show.
        window = MAX_PREVIEW * (2 if self.text_body else 16)
        while True:
            head = body[:window]
            text = head if self.text_body else _strip_html(head)
            out = _WS_RE.sub(" ", text).strip()
            if len(out) >= MAX_PREVIEW or window >= len(body):
                return out[:MAX_PREVIEW]
            window *= 4


#: Plain text the stdlib's header classes return unchanged: printable ASCII, no
#: encoded word. Message-ID lists are only read for their ``<id>`` tokens.
_PLAIN_TEXT_RE = re.compile(r"[\x20-\x7e\t]*")
_PLAIN_IDS_RE = re.compile(r"[ \t]*(?:<[\x21-\x3b\x3d\x3f-\x7e]+>[ \t]*)*")
_ID_UNSAFE = ('"', "(", ")", "\\")
_PLAIN_ID_RE = re.compile(r"[ \t]*<[\x21-\x3b\x3d\x3f-\x7e]+>[ \t]*")  # exactly one
_PLAIN_FIELDS = {"subject": _PLAIN_TEXT_RE, "message-id": _PLAIN_ID_RE,
                 "in-reply-to": _PLAIN_IDS_RE, "references": _PLAIN_IDS_RE}


def _plain_header(msg: Message, name: str) -> str | None:
    """The first ``name`` field's text without the stdlib header classes, when its raw
    value is plain (see _PLAIN_FIELDS); else None (the caller parses it).

    Why: these fields are unique per message, so the header cache never hits them and
    each went through the structured parser (Message-ID) or the encoded-word scanner
    (Subject) for text that comes out unchanged: ~10% of a small message's parse
    (issue 12). tests/test_parse_plain_headers.py checks both paths agree."""
    value = _first_raw(msg, name)
    if not isinstance(value, str) or len(value) > MAX_STRUCTURED_HEADER:
        return None
    if "\r" in value or "\n" in value:
        value = value.replace("\r", "").replace("\n", "")
    if "=?" in value or not _PLAIN_FIELDS[name].fullmatch(value):
        return None
    if name != "subject" and any(c in value for c in _ID_UNSAFE):
        return None
    return header_text(value)


class _Fields:
    """A message's top-level fields, indexed by lower-cased name once, with the lookups
    of ``email.message.Message`` that parse_headers uses (same answers, same policy).

    Why: each ``Message.get``/``get_all`` lowers every field name again; parse_headers
    makes ten lookups, so a message with 150 fields (what the inline gate admits) cost
    1,500 lowerings and loop turns before any header was parsed (issue 12)."""

    def __init__(self, msg: Message) -> None:
        self._headers: list[tuple[str, Any]] = list(getattr(msg, "_headers", ()))
        self.policy = msg.policy
        self.by_name: dict[str, list[tuple[str, Any]]] = {}
        for key, value in self._headers:
            self.by_name.setdefault(key.lower(), []).append((key, value))

    def raw_items(self) -> list[tuple[str, Any]]:
        return self._headers

    def get(self, name: str, failobj: Any = None) -> Any:
        found = self.by_name.get(name.lower())
        if not found:
            return failobj
        key, value = found[0]
        return self.policy.header_fetch_parse(key, value)

    def get_all(self, name: str, failobj: Any = None) -> Any:
        found = self.by_name.get(name.lower())
        if not found:
            return failobj
        return [self.policy.header_fetch_parse(key, value) for key, value in found]


def _first_raw(msg: Any, name: str) -> Any:
    """The raw value of the first field ``name`` (lower case), or None."""
    index = getattr(msg, "by_name", None)
    if index is not None:
        found = index.get(name)
        return found[0][1] if found else None
    for key, raw in getattr(msg, "_headers", ()):
        if key.lower() == name:
            return raw
    return None


def _header_text(msg: Message, name: str) -> str | None:
    if name in _PLAIN_FIELDS:
        plain = _plain_header(msg, name)
        if plain is not None:
            return plain
    try:
        value = msg.get(name)
    except Exception:  # a header the policy cannot parse: fall back to raw text
        value = _raw_header(msg, name)
    if value is None:
        return None
    try:
        return header_text(str(value))
    except Exception:
        return header_text(_raw_header(msg, name) or "")


def _raw_header(msg: Message, name: str) -> str | None:
    for key, value in getattr(msg, "_headers", []):
        if key.lower() == name.lower():
            return str(value) if not isinstance(value, str) else value
    return None


def _clean(text: str) -> str:
    """Drop NULs (PostgreSQL text cannot hold them) and lone surrogates."""
    if text.isascii():  # no surrogate to replace: the round trip would change nothing
        return text.replace("\x00", "") if "\x00" in text else text
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


#: Address fields up to this many characters are parsed once per process (an LRU
#: cache): the same From and To values come back message after message (issue 12).
CACHED_FIELD_CHARS = 1024


def _addresses(values: list[str]) -> list[dict[str, str]]:
    if sum(map(len, values)) <= CACHED_FIELD_CHARS:  # copies: callers own their dicts
        return [dict(item) for item in _cached_addresses(tuple(values))]
    return _parse_addresses(values)


@functools.lru_cache(maxsize=4096)
def _cached_addresses(values: tuple[str, ...]) -> tuple[dict[str, str], ...]:
    return tuple(_parse_addresses(list(values)))


def _parse_addresses(values: list[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    try:
        pairs = email.utils.getaddresses(values)
    except Exception:
        return out
    for name, addr in pairs:
        addr = header_text(addr)
        if not addr or "@" not in addr:
            continue
        out.append({"email": addr, "name": header_text(name)})
    return out


#: Message-IDs kept of one field. A long References list keeps its first id (the
#: thread's root) and its last ones (the direct parent and its ancestors), as RFC 5322
#: 3.6.4 suggests trimming it: threading needs both ends, never the middle.
MAX_MSGIDS = 100


def _msgids(text: str | None) -> list[str]:
    if not text:
        return []
    ids: list[str] = _MSGID_RE.findall(header_text(text))
    if len(ids) > MAX_MSGIDS:
        ids = ids[:1] + ids[-(MAX_MSGIDS - 1):]
    return ids


_HIDDEN_OPEN = re.compile(r"<(script|style)", re.IGNORECASE)
_HIDDEN_CLOSE = re.compile(r"</(script|style)>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")


def _fold(word: str) -> str:
    # How the regex engine compares a backreference ignoring case: per character, by
    # simple lowercase (U+0130 is the one letter whose full lowercase is longer).
    return word.lower() if word.isascii() else "".join(c.lower()[0] for c in word)


def _strip_html(html: str) -> str:
    """What ``re.sub(r"<[^>]+>", " ", re.sub(r"(?is)<(script|style).*?</\1>", " ", html))``
    gives, in linear time. Why: those patterns rescanned the rest of the body from every
    ``<script`` without a closing tag and from every ``<`` without a ``>``: 64 KB of
    ``<script `` from a stranger took 20 s, and previews are computed on the reactor.
    Here each opening tag finds its closing tag by bisection, and tags are only looked
    for before the last ``>``."""
    closers: dict[str, list[re.Match[str]]] = {}
    for m in _HIDDEN_CLOSE.finditer(html):
        closers.setdefault(_fold(m.group(1)), []).append(m)
    text = html
    if closers:
        starts = {kind: [m.start() for m in found] for kind, found in closers.items()}
        pieces, pos = [], 0
        last = max(found[-1] for found in starts.values())
        for m in _HIDDEN_OPEN.finditer(html, 0, last):  # an opener after it has no closer
            found = starts.get(_fold(m.group(1)))
            i = bisect.bisect_left(found, m.end()) if found and m.start() >= pos else -1
            if 0 <= i < len(found or ()):
                pieces += [html[pos:m.start()], " "]
                pos = closers[_fold(m.group(1))][i].end()
        pieces.append(html[pos:])
        text = "".join(pieces)
    end = text.rfind(">") + 1  # every "<" before it has a ">" after it: one scan each
    return _TAG.sub(" ", text[:end]) + text[end:]


def _decode_text(part: EmailMessage) -> str:
    try:
        content = part.get_content()
        if isinstance(content, bytes):
            return _clean(content.decode("utf-8", "replace"))
        return _clean(content)
    except Exception:
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):  # None (a multipart): nothing to decode
            payload = b""
        charset = part.get_content_charset() or "utf-8"
        try:
            return _clean(payload.decode(charset, "replace"))
        except LookupError:
            return _clean(payload.decode("utf-8", "replace"))


def _is_attachment(part: Message) -> bool:
    try:
        disposition = (part.get_content_disposition() or "").lower()
    except Exception:
        disposition = ""
    if disposition == "attachment":
        return True
    try:
        filename = part.get_filename()
    except Exception:
        filename = None
    if filename:
        return True
    return part.get_content_maintype() not in ("text", "multipart", "message")


def parse_message(raw: bytes, *, large_part_bytes: int = largeparts.LARGE_PART_BYTES,
                  spool_dir: str | None = None, tree: Any = None) -> ParsedMessage:
    """Parse ``raw``; never raises for any input bytes.

    Leaf bodies above ``large_part_bytes`` bypass the stdlib parser (see
    :mod:`agentpost.mail.largeparts`); such attachments come back spooled to a file in
    ``spool_dir`` -- call :meth:`ParsedMessage.discard` when done with them. ``tree``:
    the message's :func:`agentpost.mail.imapformat.parse_tree`, if already made.
    """
    if len(raw) <= large_part_bytes:  # no part can be cut out: the direct parser may do
        from agentpost.mail import parse_fast  # (imports this module)

        fast = parse_fast.parse_simple(raw)
        if fast is not None:
            return fast
    large: list[largeparts.LargePart] = []
    try:
        source, large = largeparts.skeleton(raw, large_part_bytes, tree)
    except Exception:
        log.exception("could not locate MIME parts; parsing the whole message")
        source = raw
    parsed = _parse(source, raw, large, spool_dir)
    if large and parsed.claimed != len(large):
        # The stdlib parser saw a different MIME tree than ours (malformed boundaries):
        # do it the plain way rather than guess which cut belongs where.
        parsed.discard()
        parsed = _parse(raw, raw, [], None)
    return parsed


def _parse(source: bytes, raw: bytes, large: list[largeparts.LargePart],
           spool_dir: str | None) -> ParsedMessage:
    try:
        msg: Any = email.message_from_bytes(source, policy=_POLICY)
    except Exception:
        return ParsedMessage()
    parsed = ParsedMessage()
    parse_headers(msg, parsed)
    _walk_parts(msg, parsed, _Cuts(raw, large, spool_dir))
    return parsed


def parse_headers(msg: Any, parsed: ParsedMessage) -> None:
    """Fill ``parsed``'s header fields from the top-level header of ``msg`` (its
    ``_headers`` as the stdlib parser stores them). Shared with
    :mod:`agentpost.mail.parse_fast`, which builds that list without the parser."""
    msg = _Fields(msg)
    try:
        for key, value in msg.raw_items():
            if key == largeparts.MARKER:
                continue
            parsed.headers.append((_clean(key), _clean(str(value))))
    except Exception:  # noqa: S110 - headers are also kept byte-exact in the raw blob
        pass
    parsed.subject = _header_text(msg, "subject") or ""
    froms = _addresses([_header_text(msg, "from") or ""])
    parsed.from_address = froms[0] if froms else None
    for attr, name in (("to_addresses", "to"), ("cc_addresses", "cc"),
                       ("bcc_addresses", "bcc"), ("reply_to", "reply-to")):
        values = []
        try:
            values = [str(v) for v in (msg.get_all(name) or [])[:MAX_ADDRESS_FIELDS]]
        except Exception:
            raw_value = _raw_header(msg, name)
            values = [raw_value] if raw_value else []
        setattr(parsed, attr, _addresses(values))
    ids = _msgids(_header_text(msg, "message-id"))
    parsed.message_id = ids[0] if ids else None
    reply_ids = _msgids(_header_text(msg, "in-reply-to"))
    parsed.in_reply_to = reply_ids[0] if reply_ids else None
    parsed.references = _msgids(_header_text(msg, "references"))
    date_text = _date_text(msg)
    if date_text:
        try:
            when = email.utils.parsedate_to_datetime(date_text)
            parsed.sent_at = storable_date(when if when.tzinfo else when.replace(tzinfo=UTC))
        except Exception:
            parsed.sent_at = None


_LINESEP = re.compile(r"\n|\r")  # what EmailPolicy.header_fetch_parse removes


def _date_text(msg: Message) -> str | None:
    """``_header_text(msg, "date")`` without the stdlib's DateHeader object when the value
    parses as a date: that object's text is then ``format_datetime(parsedate_to_datetime(
    value))`` (``headerregistry.DateHeader.parse``). Why: a Date value is new with nearly
    every message, so the header cache misses it, and the object (with the unstructured
    token parse it makes of the formatted date) cost ~5x the date parse itself (issue 12).
    tests/test_parse_fast.py checks both agree on generated dates."""
    value = _first_raw(msg, "date")
    if not isinstance(value, str) or len(value) > MAX_STRUCTURED_HEADER:
        return _header_text(msg, "date")
    text = _formatted_date(value)
    return _header_text(msg, "date") if text is None else text


@functools.lru_cache(maxsize=1024)  # a sender's burst repeats its Date value
def _formatted_date(value: str) -> str | None:
    """The DateHeader text of ``value``, or None if it does not parse as a date (the
    header class then decides what the text is)."""
    try:
        when = email.utils.parsedate_to_datetime(_LINESEP.sub("", value))
        return header_text(email.utils.format_datetime(when))
    except Exception:
        return None


@dataclass
class _Cuts:
    """The bodies cut out of the parser's copy, decoded on demand."""

    raw: bytes
    parts: list[largeparts.LargePart]
    spool_dir: str | None

    def find(self, part: Message) -> largeparts.LargePart | None:
        if not self.parts:
            return None
        marker = part.get(largeparts.MARKER)
        if marker is None:
            return None
        try:
            return self.parts[int(str(marker).strip())]
        except (ValueError, IndexError):
            return None


def _cte(part: Message) -> str:
    try:
        return str(part.get("content-transfer-encoding") or "7bit")
    except Exception:
        return "7bit"


def _large_text(cuts: _Cuts, cut: largeparts.LargePart, part: Message) -> str:
    """The body's text, decoded straight from the raw bytes when it has no transfer
    encoding (7bit, 8bit, binary): no bytes copy of a 10 MB body on the way to its str."""
    data = largeparts.decode_to_bytes(cuts.raw, cut, _cte(part), view=True)
    charset = part.get_content_charset() or "utf-8"
    try:
        text = str(data, charset, "replace")
    except LookupError:
        text = str(data, "utf-8", "replace")
    except TypeError:  # a codec that wants real bytes, not a view
        text = bytes(data).decode(charset, "replace")
    del data
    # Decoding with "replace" leaves no lone surrogates; only NULs need to go.
    return text.replace("\x00", "") if "\x00" in text else text


def _walk_parts(msg: EmailMessage, parsed: ParsedMessage, cuts: _Cuts) -> None:
    try:
        parts = list(msg.walk())
    except Exception:
        parts = [msg]
    for index, part in enumerate(parts):
        try:
            if part.is_multipart():
                continue
            ctype = part.get_content_type()
            if part is msg:
                as_attachment = part.get_content_maintype() != "text"
            else:
                as_attachment = _is_attachment(part)
            cut = cuts.find(part)
            if cut is not None:
                parsed.claimed += 1
            if as_attachment and len(parsed.attachments) >= MAX_ATTACHMENTS:
                continue
            if as_attachment:
                spooled = None
                payload: bytes | None = None
                if cut is not None:
                    spooled = largeparts.decode_to_file(cuts.raw, cut, _cte(part),
                                                        cuts.spool_dir)
                else:
                    decoded = part.get_payload(decode=True)
                    # Always bytes for a leaf part; the fallback is defensive only.
                    payload = (decoded if isinstance(decoded, bytes)
                               else str(part.get_payload()).encode("utf-8", "replace"))
                try:
                    filename = part.get_filename() or ""
                except Exception:
                    filename = ""
                cid = part.get("content-id")
                disposition = part.get_content_disposition()
                att = ParsedAttachment(
                    filename=safe_filename(filename), mime_type=safe_mime_type(ctype),
                    content=payload,
                    content_id=_msgids(str(cid))[0] if cid and _msgids(str(cid)) else None,
                    disposition=header_text(disposition) if disposition else None,
                    part_index=index)
                if spooled is not None:
                    att.path, att.spooled_size = spooled.path, spooled.size
                    att.spooled_sha256 = spooled.sha256
                parsed.attachments.append(att)
            elif ctype == "text/html" and parsed.html_body is None:
                parsed.html_body = _large_text(cuts, cut, part) if cut else _decode_text(part)
            elif parsed.text_body is None and part.get_content_maintype() == "text":
                parsed.text_body = _large_text(cuts, cut, part) if cut else _decode_text(part)
        except OSError:  # the spool failed: a temporary failure, never a lost attachment
            parsed.discard()
            raise
        except Exception:  # noqa: S112 - one broken part must not lose the rest
            continue
