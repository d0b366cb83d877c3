"""A direct parser for the common shapes of mail, giving what :mod:`agentpost.mail.parse`
gives through the stdlib parser, or None when the message is not one of them.

Why: ``email.message_from_bytes`` and the walk over its result were ~60% of the CPU the
MX spent analysing a plain 4 KiB message (issue 12), most of it generic machinery (a
line-by-line feed parser, header objects re-made on every access, the content manager)
for messages whose structure three regular expressions can see.

How sameness is kept: this module only decides *where* things are. Everything that
interprets a header value still goes through the stdlib, memoised by value:

- the top-level header list is built exactly as the feed parser builds it (names cut at
  the first colon, values left-stripped of blanks, continuation lines kept, the last line
  break stripped; bytes read as ASCII with surrogate escapes), and then read by the same
  :func:`agentpost.mail.parse.parse_headers` the stdlib path uses;
- what a part *is* (content type, attachment or body, charset, transfer encoding, file
  name, disposition, a multipart's boundary) comes from the stdlib's own ``Message``
  methods on a message holding just that part's MIME fields (:func:`_plan`);
- bodies are decoded with the functions ``Message.get_payload`` calls
  (``quopri.decodestring``, the ``email`` package's base64 decoder).

What is left to this module is the cutting, and it only accepts input where that is
unambiguous: no bare CR (the stdlib ends lines at one), every header line a well-formed
field or continuation ending in a blank line, every line of a multipart body that starts
with its delimiter exactly ``--boundary`` or ``--boundary--``, no two delimiters in a row,
no ``message/*`` part, no ``multipart/digest``, charsets from a short list. Anything else
gives None and goes the stdlib way. tests/test_parse_fast.py checks both paths agree on
generated messages, malformed ones included.
"""

from __future__ import annotations

import codecs
import functools
import quopri
import re
from dataclasses import dataclass
from email._encoded_words import decode_b  # type: ignore[import-not-found]  # see _decoded
from email.message import EmailMessage
from typing import Any

from agentpost.mail import parse
from agentpost.mail.sanitize import header_text, safe_filename, safe_mime_type

#: A CR followed by something else than LF (a CR at the very end is checked apart). One
#: regex pass: the two counts it replaces (every CR, every CRLF) took ~0.14 ms of a 100
#: KiB message, and an alternation with the end of the text (``\r(?:[^\n]|\Z)``) twice
#: this pattern's ~40 us, holding the GIL.
_BARE_CR = re.compile(rb"\r[^\n]")
#: Messages up to this size have their answer kept (:data:`_last_checked`).
_REMEMBER_MAX_BYTES = 256 * 1024
#: A header block as the feed parser reads it when every line is a field (a name of
#: RFC 5322 ftext, a colon) or a continuation of one, ended by a blank line.
_HEADER_BLOCK = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+:[^\n]*\n(?:[ \t][^\n]*\n)*)*\r?\n")
#: One field of such a block (decoded text): its name and its raw value with line breaks.
_FIELD = re.compile(r"([\x21-\x39\x3b-\x7e]+):([^\n]*\n(?:[ \t][^\n]*\n)*)")
#: Deeper than this, the stdlib path is taken (the feed parser recurses too).
MAX_DEPTH = 8
#: More parts than this in one multipart: the stdlib path.
MAX_PARTS = 64
#: Codecs a text part may name (``codecs.lookup(...).name``): each decodes any bytes with
#: ``errors="replace"`` without raising, as ``get_content`` needs.
_CHARSETS = frozenset({
    "ascii", "utf-8", "latin-1", "iso8859-1", "iso8859-2", "iso8859-3", "iso8859-4",
    "iso8859-5", "iso8859-6", "iso8859-7", "iso8859-8", "iso8859-9", "iso8859-10",
    "iso8859-13", "iso8859-14", "iso8859-15", "iso8859-16", "cp1250", "cp1251", "cp1252",
    "cp1253", "cp1254", "cp1255", "cp1256", "cp1257", "cp1258", "koi8-r", "koi8-u",
    "mac-roman", "utf-16", "utf-16-le", "utf-16-be", "gb2312", "gbk", "gb18030", "big5",
    "shift_jis", "euc_jp", "iso2022_jp", "euc_kr", "cp949", "cp932", "cp936", "cp950",
})
#: Transfer encodings get_payload(decode=True) decodes; others leave the bytes as they are,
#: except the uuencode family (not handled here).
_UU = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})
#: Plans for header values up to this many characters are remembered (see _plan).
_CACHED_VALUE_CHARS = 256
_MIME_FIELDS = ("content-type", "content-transfer-encoding", "content-disposition")
#: A multipart Content-Type in the plain form every mailer writes: a subtype, then
#: ``; name=value`` parameters (a token, or a quoted string without quotes or backslashes
#: inside), optionally folded before a name. Its boundary is new in every message, so the
#: stdlib's reading (~0.2 ms: the structured header parser) was never cached; for this
#: form the boundary is the first ``boundary`` parameter, unquoted and right-stripped, as
#: ``Message.get_boundary`` gives it (tests/test_parse_fast.py checks the two agree).
_MP_PARAM = (r"""[ \t]*;(?:[ \t]|\r?\n[ \t])*([A-Za-z0-9-]+)="""
             r"""("[^"\\\r\n]*"|[A-Za-z0-9!#$%&+.^_`{|}~-]+)""")
_MULTIPART = re.compile(r"(?i:multipart)/([A-Za-z0-9-]+)((?:" + _MP_PARAM + r")+)[ \t]*")
_MP_PARAMS = re.compile(_MP_PARAM)


class Unsupported(Exception):
    """The message has a shape this module leaves to the stdlib parser."""


@dataclass(frozen=True)
class _Plan:
    """What the stdlib makes of one part's MIME fields (see :func:`_plan`)."""

    ctype: str
    maintype: str
    boundary: str | None = None  # a multipart's
    as_attachment: bool = False
    cte: str = ""  # "quoted-printable", "base64", or anything else (left as it is)
    charset: str = "ASCII"  # a text body's, as get_text_content reads it
    filename: str = ""  # safe_filename(get_filename())
    mime_type: str = ""  # safe_mime_type(ctype)
    disposition: str | None = None  # header_text(get_content_disposition())


@dataclass
class _Leaf:
    """A non-multipart part in walk order: its plan, header fields and body bytes."""

    index: int
    plan: _Plan
    fields: list[tuple[str, str]]
    body: bytes


#: The last message checked and its answer. The MX asks twice of the same bytes: where to
#: parse it (core.parse_dispatch), then whether this module may (:func:`parse_simple`).
#: Bytes are immutable (a bytearray is never kept), so the same object has the same
#: answer; only messages up to :data:`_REMEMBER_MAX_BYTES` are held, so no large message
#: is kept alive by it.
_last_checked: tuple[bytes, bool] = (b"", False)


def has_bare_cr(raw: bytes) -> bool:
    """Whether a CR in ``raw`` is not followed by LF: the stdlib parser then ends a line
    there, and this module's cutting does not (such messages take the stdlib path)."""
    global _last_checked
    last = _last_checked  # one read: pool threads may replace it meanwhile
    if last[0] is raw:
        return last[1]
    found = b"\r" in raw and (raw.endswith(b"\r") or _BARE_CR.search(raw) is not None)
    if type(raw) is bytes and len(raw) <= _REMEMBER_MAX_BYTES:
        _last_checked = (raw, found)
    return found


def parse_simple(raw: bytes) -> parse.ParsedMessage | None:
    """``parse.parse_message(raw)`` for the shapes this module reads; None for others.

    Only for messages whose parts are not cut out (the caller checks the size)."""
    if has_bare_cr(raw):
        return None  # a bare CR ends a line for the stdlib, not for the cutting here
    parsed = parse.ParsedMessage()
    try:
        fields, bstart = _header(raw, 0, len(raw))
        leaves: list[_Leaf] = []
        _entity(raw, fields, bstart, len(raw), True, 0, leaves, [])
        for leaf in leaves:
            _fill(parsed, leaf)
    except Exception:  # Unsupported, or anything unforeseen: the stdlib path decides
        return None
    msg = EmailMessage(policy=parse._POLICY)
    msg._headers = fields  # type: ignore[attr-defined]
    parse.parse_headers(msg, parsed)  # what it raises, it raises on the stdlib path too
    return parsed


def _header(raw: bytes, start: int, end: int) -> tuple[list[tuple[str, str]], int]:
    """The fields of the header at ``start`` as the feed parser stores them, and where
    the body starts (after the blank line)."""
    m = _HEADER_BLOCK.match(raw, start, end)
    if m is None:
        raise Unsupported()
    bstart = m.end()
    text = raw[start:bstart].decode("ascii", "surrogateescape")
    return [(name, value.lstrip(" \t").rstrip("\r\n"))
            for name, value in _FIELD.findall(text)], bstart


def _entity(raw: bytes, fields: list[tuple[str, str]], bstart: int, end: int, root: bool,
            depth: int, leaves: list[_Leaf], counter: list[int]) -> None:
    """Walk one entity (header already read), appending its leaves in walk order."""
    index = len(counter)
    counter.append(index)
    values: list[str | None] = [None, None, None]
    for key, value in fields:
        lower = key.lower()
        for i, name in enumerate(_MIME_FIELDS):
            if lower == name and values[i] is None:
                values[i] = value
    plan = _plan_for(values[0], values[1], values[2], root)
    if plan.boundary is None:
        leaves.append(_Leaf(index, plan, fields, raw[bstart:end]))
        return
    if depth >= MAX_DEPTH:
        raise Unsupported()
    for cstart, cend in _split(raw, bstart, end, plan.boundary):
        child_fields, child_body = _header(raw, cstart, cend)
        _entity(raw, child_fields, child_body, cend, False, depth + 1, leaves, counter)


def _split(raw: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]]:
    """[start, end) of each body part of a multipart body at [start, end), where the feed
    parser puts them: a part ends before the line break that precedes its delimiter.
    Unsupported unless every line starting with the delimiter is exactly one, there is a
    first and a closing delimiter, and no two delimiters follow each other."""
    try:
        delim = b"--" + boundary.encode("ascii")
    except UnicodeEncodeError:
        raise Unsupported() from None
    parts: list[tuple[int, int]] = []
    part_start = -1
    # Only line starts are looked at (one find per delimiter, never one per stray
    # "--boundary" inside a line). ``start`` always follows a line break: a header's
    # blank line, then each delimiter line.
    line_delim = b"\n" + delim
    while True:
        hit = raw.find(line_delim, start - 1, end)
        if hit < 0:
            raise Unsupported()  # no closing delimiter
        hit += 1
        pos = hit + len(delim)
        close = raw.startswith(b"--", pos, end)
        after = pos + 2 if close else pos
        if raw.startswith(b"\r\n", after, end):
            line_end = after + 2
        elif raw.startswith(b"\n", after, end):
            line_end = after + 1
        elif close and after == end:
            line_end = end
        else:
            raise Unsupported()  # "--boundary" then something else: leave it to the stdlib
        if part_start >= 0:
            if hit == part_start:
                raise Unsupported()  # two delimiters in a row
            content_end = hit
            if raw[hit - 2:hit] == b"\r\n" and hit - 2 >= part_start:
                content_end = hit - 2
            elif hit - 1 >= part_start:
                content_end = hit - 1
            parts.append((part_start, content_end))
            if len(parts) > MAX_PARTS:
                raise Unsupported()
        elif close:
            raise Unsupported()  # a closing delimiter first: no parts at all
        if close:
            return parts
        part_start = start = line_end


@functools.lru_cache(maxsize=2048)
def _cached_plan(ctype: str | None, cte: str | None, disposition: str | None,
                 root: bool) -> _Plan | None:
    try:
        return _plan(ctype, cte, disposition, root)
    except Exception:
        return None


def _plan_for(ctype: str | None, cte: str | None, disposition: str | None,
              root: bool) -> _Plan:
    """The part's :class:`_Plan` (memoised for short values: they repeat message after
    message); Unsupported when the stdlib path must decide."""
    if ctype is not None and len(ctype) <= 1024 and ctype[:10].lower() == "multipart/":
        plan = _multipart_plan(ctype)
        if plan is not None:
            return plan
    if sum(len(v) for v in (ctype, cte, disposition) if v) <= _CACHED_VALUE_CHARS:
        plan = _cached_plan(ctype, cte, disposition, root)
    else:
        try:
            plan = _plan(ctype, cte, disposition, root)
        except Exception:
            plan = None
    if plan is None:
        raise Unsupported()
    return plan


def _multipart_plan(ctype: str) -> _Plan | None:
    """The plan of a plain multipart Content-Type (see _MULTIPART), else None."""
    m = _MULTIPART.fullmatch(ctype)
    if m is None:
        return None
    subtype = m.group(1).lower()
    if subtype == "digest":
        raise Unsupported()
    for name, value in _MP_PARAMS.findall(m.group(2)):
        if name.lower() == "boundary":
            boundary = value[1:-1] if value[:1] == '"' else value
            if len(boundary) > 1 and boundary[0] == "<" and boundary[-1] == ">":
                return None  # email.utils.unquote strips those too: the stdlib decides
            boundary = boundary.rstrip()
            if not boundary:
                raise Unsupported()
            return _Plan("multipart/" + subtype, "multipart", boundary=boundary)
    return None


def _plan(ctype: str | None, cte: str | None, disposition: str | None,
          root: bool) -> _Plan | None:
    """Ask the stdlib what a part with these MIME fields is, with the calls
    ``parse._walk_parts`` and ``Message.get_payload`` make. None: not for this module."""
    part = EmailMessage(policy=parse._POLICY)
    for name, value in (("Content-Type", ctype), ("Content-Transfer-Encoding", cte),
                        ("Content-Disposition", disposition)):
        if value is not None:
            part._headers.append((name, value))  # type: ignore[attr-defined]
    content_type = part.get_content_type()
    maintype = part.get_content_maintype()
    if maintype == "message" or content_type == "multipart/digest":
        return None  # parsed as a nested message / its parts default to one
    if maintype == "multipart":
        boundary = part.get_boundary()
        if not boundary or not boundary.isascii():
            return None
        return _Plan(content_type, maintype, boundary=boundary)
    mode = str(part.get("content-transfer-encoding", "")).lower()
    if mode in _UU:
        return None
    as_attachment = (maintype != "text") if root else parse._is_attachment(part)
    if as_attachment:
        try:
            filename = part.get_filename() or ""
        except Exception:
            filename = ""
        shown = part.get_content_disposition()
        return _Plan(content_type, maintype, as_attachment=True, cte=mode,
                     filename=safe_filename(filename), mime_type=safe_mime_type(content_type),
                     disposition=header_text(shown) if shown else None)
    if maintype != "text":
        return None
    charset = part.get_param("charset", "ASCII")
    if not isinstance(charset, str):
        return None  # an RFC 2231 value: get_content fails and the fallback decodes
    try:
        if codecs.lookup(charset).name not in _CHARSETS:
            return None
    except LookupError:
        return None
    return _Plan(content_type, maintype, cte=mode, charset=charset)


def _decoded(body: bytes, cte: str) -> bytes:
    """``Message.get_payload(decode=True)`` of a leaf part whose payload is ``body``, with
    the functions it calls (``decode_b`` is the ``email`` package's private base64
    decoder: lenient about padding and stray characters in its own way)."""
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    if cte == "base64":
        decoded: bytes = decode_b(b"".join(body.splitlines()))[0]
        return decoded
    return body


def _fill(parsed: parse.ParsedMessage, leaf: _Leaf) -> None:
    """What ``parse._walk_parts`` records of one leaf part."""
    plan = leaf.plan
    if plan.as_attachment:
        cid: Any = None
        for key, value in leaf.fields:  # part.get("content-id"): the first one, parsed
            if key.lower() == "content-id":
                try:
                    cid = parse._POLICY.header_fetch_parse(key, value)
                except Exception:
                    raise Unsupported() from None  # the stdlib path skips this part
                break
        ids = parse._msgids(str(cid)) if cid else []
        parsed.attachments.append(parse.ParsedAttachment(
            filename=plan.filename, mime_type=plan.mime_type,
            content=_decoded(leaf.body, plan.cte), content_id=ids[0] if ids else None,
            disposition=plan.disposition, part_index=leaf.index))
    elif plan.ctype == "text/html" and parsed.html_body is None:
        parsed.html_body = _text(leaf.body, plan)
    elif parsed.text_body is None:
        parsed.text_body = _text(leaf.body, plan)


def _text(body: bytes, plan: _Plan) -> str:
    """``parse._decode_text`` of a text part (``get_content`` decodes with the charset
    parameter as written, replacing what does not decode)."""
    return parse._clean(_decoded(body, plan.cte).decode(plan.charset, "replace"))
