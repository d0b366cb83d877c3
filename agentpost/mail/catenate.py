"""RFC 4469 CATENATE: which message part a ``URL`` cat-part names.

APPEND ... CATENATE (URL "/INBOX;UIDVALIDITY=9/;UID=20/;SECTION=1.2" TEXT {n} ...) calls
:func:`parse_catenate_url` for each URL before it reads anything from storage; the
answer is a :class:`PartReference` or a :class:`BadUrl`, which the IMAP error table
turns into ``NO [BADURL <url>]`` (:func:`badurl_code` renders the code).

What is accepted, and why (RFC 4469 §3, RFC 5092 §11):

* Only relative IMAP URLs: RFC 4469 "only describes the behavior ... using IMAP URLs
  that refer to specific messages or message parts on the current IMAP server from the
  current authenticated IMAP session", i.e. without scheme or server. Absolute
  ``imap://`` URLs and ``//server/...`` are refused, as Dovecot does, even when they
  might name this server: we cannot tell, and URLAUTH is not supported (``;URLAUTH=``,
  ``;EXPIRE=`` are refused too).
* The base URL is ``imap://user@server/<selected mailbox>`` (RFC 4469 §3):
  ``;UID=20[/;SECTION=..][/;PARTIAL=..]`` names a message of the selected mailbox;
  ``other/;UID=1`` is resolved by RFC 3986 §5.2 (merge with the base path, remove dot
  segments); ``/INBOX;UIDVALIDITY=..../;UID=..`` is absolute-path. ``;SECTION=`` or
  ``;PARTIAL=`` alone would need a base message, which APPEND has not: refused.
* A URL must name one message (``;UID=``): mailbox-only and search (``?``) URLs are
  refused. The section is checked with :func:`agentpost.mail.imapformat.parse_section`.
* Mailbox names are %-encoded UTF-8 (RFC 5092 §5); the result is the server's text form
  (not modified UTF-7), with ``INBOX`` case-insensitive as everywhere else.

Everything is a linear scan of a bounded string; no regular expression sees the URL.

A URL's ``;SECTION=HEADER`` or ``HEADER.FIELDS (...)`` of a message stored without a
section map needs only the top-level header: :func:`read_top_header` finds it with a few
growing range reads instead of loading the whole message, and ends it exactly where
:mod:`agentpost.mail.imapformat` does (the first empty line), so the bytes copied are the
ones ``FETCH BODY.PEEK[HEADER...]`` returns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agentpost.mail.imapformat import SectionSpec, parse_section
from agentpost.model import errors

__all__ = ["HEADER_READ_BYTES", "MAX_URL_CHARS", "BadUrl", "PartReference", "badurl_code",
           "parse_catenate_url", "read_top_header"]

#: Longer URLs are refused outright (the IMAP line limit bounds them anyway).
MAX_URL_CHARS = 8192
_MAX_NUMBER = 2**32 - 1
_HEX = "0123456789abcdefABCDEF"
# RFC 5092 bchar without pct-encoded: unreserved / sub-delims / ":" / "@" / "/".
_URL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                       "-._~!$'()*+,;&=:@/%")


class BadUrl(errors.InvalidRequest):
    """A CATENATE URL we will not resolve (``NO [BADURL <url>]``, RFC 4469 §4.1)."""

    type = "bad_url"
    default_message = "Invalid or unsupported CATENATE URL."

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"Bad URL: {reason}.", url=url)
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class PartReference:
    """The message part a CATENATE URL names.

    ``section`` is the decoded section text (None: the whole message) and
    ``section_spec`` its parse; ``partial`` is ``(offset, length)``, length None meaning
    "to the end" (RFC 5092 partial-range). ``uidvalidity`` None: the URL gave none, so
    none is checked.
    """

    mailbox: str
    uid: int
    uidvalidity: int | None = None
    section: str | None = None
    section_spec: SectionSpec | None = None
    partial: tuple[int, int | None] | None = None


def badurl_code(url: str) -> str:
    """The response code ``BADURL <url>``: url-resp-text cannot hold ``]``, ``\\``,
    controls (RFC 4469 §5); we also keep it to printable ASCII."""
    text = "".join(ch for ch in url[:MAX_URL_CHARS] if "!" <= ch <= "~" and ch not in "]\\")
    return f"BADURL {text or '?'}"


def _pct_decode(url: str, raw: str, what: str) -> str:
    """%-decode ``raw`` as UTF-8 text; controls are never part of a name."""
    out = bytearray()
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "%":
            pair = raw[i + 1:i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise BadUrl(url, f"bad %-escape in the {what}")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(ord(ch))
            i += 1
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError:
        raise BadUrl(url, f"the {what} is not UTF-8") from None
    if not text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise BadUrl(url, f"empty {what} or control characters in it")
    return text


def _number(url: str, raw: str, what: str, *, zero: bool = False) -> int:
    if not raw.isascii() or not raw.isdigit() or len(raw) > 10 or \
            (raw[0] == "0" and not zero):
        raise BadUrl(url, f"{what} is not a valid number")
    value = int(raw)
    if value > _MAX_NUMBER:
        raise BadUrl(url, f"{what} is out of range")
    return value


def _pct_encode_path(name: str) -> str:
    """A mailbox name as a URL path (``/`` kept: it is the hierarchy delimiter)."""
    safe = _URL_CHARS - set(";%")
    return "".join(ch if ch in safe else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
                   for ch in name)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, on "/"-separated segments (iterative, linear)."""
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments[1:], start=1):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _canonical_mailbox(name: str) -> str:
    """INBOX is case-insensitive (RFC 3501 §5.1), also as a hierarchy's first level."""
    if name.upper() == "INBOX":
        return "INBOX"
    if name[:6].upper() == "INBOX/":
        return "INBOX" + name[5:]
    return name


def _absolute_path(url: str, ref: str, selected: str | None) -> str:
    """The path of ``ref`` resolved against the base URL (RFC 3986 §5.2.2)."""
    if ref.startswith("/"):
        return _remove_dot_segments(ref)
    if ref.startswith(";"):
        if ref[:5].upper() != ";UID=":
            raise BadUrl(url, "the URL names no message")
        if selected is None:
            raise BadUrl(url, "a mailbox-relative URL needs a selected mailbox")
        return "/" + _pct_encode_path(selected) + "/" + ref
    first_segment = ref.split("/", 1)[0]
    if ":" in first_segment:
        raise BadUrl(url, "only relative IMAP URLs are supported")
    base = "/" + _pct_encode_path(selected) if selected is not None else "/"
    return _remove_dot_segments(base[:base.rfind("/") + 1] + ref)


def _params(url: str, path: str) -> tuple[str, dict[str, str]]:
    """Split ``/mailbox[;UIDVALIDITY=n]/;UID=n[/;SECTION=s][/;PARTIAL=p]`` into the
    raw mailbox and its named parameters, checking their order."""
    semi = path.find(";")
    if semi < 0:
        raise BadUrl(url, "the URL names no message")
    mailbox, pieces = path[1:semi], path[semi + 1:].split(";")
    names: list[str] = []
    values: dict[str, str] = {}
    for n, piece in enumerate(pieces):
        name, eq, value = piece.partition("=")
        name = name.upper()
        if n < len(pieces) - 1:
            if not value.endswith("/"):
                raise BadUrl(url, "parameters must be separated by /")
            value = value[:-1]
        if not eq or name in values:
            raise BadUrl(url, f"bad parameter {name!r}")
        names.append(name)
        values[name] = value
    if names and names[0] != "UIDVALIDITY":
        if not mailbox.endswith("/"):
            raise BadUrl(url, "no mailbox before ;UID=")
        mailbox = mailbox[:-1]
    order = ["UIDVALIDITY", "UID", "SECTION", "PARTIAL"]
    if "URLAUTH" in values or "EXPIRE" in values:
        raise BadUrl(url, "URLAUTH is not supported")
    if "UID" not in values or names != [n for n in order if n in values]:
        raise BadUrl(url, "the URL does not name one message part")
    return mailbox, values


def _partial(url: str, raw: str) -> tuple[int, int | None]:
    offset, dot, length = raw.partition(".")
    return (_number(url, offset, "the partial offset", zero=True),
            _number(url, length, "the partial length") if dot else None)


def parse_catenate_url(url: str, *, selected_mailbox: str | None) -> PartReference:
    """The part a CATENATE ``URL`` names, resolved against the selected mailbox (its text
    name, or None in the authenticated state). Raises :class:`BadUrl` for anything else."""
    if not url or len(url) > MAX_URL_CHARS or any(ch not in _URL_CHARS for ch in url):
        raise BadUrl(url, "not an IMAP URL")
    if url[:7].lower() == "imap://" or url.startswith("//"):
        raise BadUrl(url, "only relative IMAP URLs for this server are supported")
    path = _absolute_path(url, url, selected_mailbox)
    raw_mailbox, values = _params(url, path)
    section = values.get("SECTION")
    spec: SectionSpec | None = None
    if section is not None:
        section = _pct_decode(url, section, "section")
        try:
            spec = parse_section(section)
        except ValueError:
            raise BadUrl(url, "invalid section") from None
    uidvalidity = values.get("UIDVALIDITY")
    partial = values.get("PARTIAL")
    return PartReference(
        mailbox=_canonical_mailbox(_pct_decode(url, raw_mailbox, "mailbox name")),
        uid=_number(url, values["UID"], "the UID"),
        uidvalidity=_number(url, uidvalidity, "UIDVALIDITY") if uidvalidity is not None
        else None,
        section=section, section_spec=spec,
        partial=_partial(url, partial) if partial is not None else None)


#: The first read of :func:`read_top_header`; each further read doubles.
HEADER_READ_BYTES = 64 * 1024


def _header_end(data: bytes | bytearray, start: int) -> int:
    """Where the body starts if an empty line (``\\n`` or ``\\r\\n`` at a line start)
    ends the header within ``data``, searching from ``start``; -1 when none yet. A final
    ``\\r`` with no ``\\n`` after it is not taken for one: more data may complete it."""
    if start == 0:
        for blank in (b"\n", b"\r\n"):
            if data.startswith(blank):
                return len(blank)
    found = [(i, len(sep)) for sep in (b"\n\n", b"\n\r\n")
             if (i := data.find(sep, max(start - 2, 0))) >= 0]
    if not found:
        return -1
    at, width = min(found)
    return at + width


async def read_top_header(read: Callable[[int, int], Awaitable[bytes]], size: int,
                          limit: int) -> bytes | None:
    """The top-level header of a stored message of ``size`` octets, blank line
    included -- ``imapformat.section(raw, "HEADER")`` -- read with ``read(start,
    length)`` ranges; None when it is longer than ``limit`` (the caller refuses it).
    A message without an empty line is all header, as imapformat has it."""
    buf = bytearray()
    step = HEADER_READ_BYTES
    while len(buf) < size:
        if len(buf) > limit:
            return None
        searched = len(buf)
        buf += await read(searched, min(step, size - searched))
        end = _header_end(buf, searched)
        if end >= 0:
            return bytes(buf[:end]) if end <= limit else None
        step *= 2
    return bytes(buf) if len(buf) <= limit else None
