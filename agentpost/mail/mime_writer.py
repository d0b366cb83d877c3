"""Write the common shapes of a composed message directly, without ``email.message``.

Why: composing with ``EmailMessage`` (``set_content``, a header parse on every
``__setitem__``, the generator's folding) was the largest bar in the send API's profile.
The shapes the API builds are few and regular: a text and/or HTML body
(multipart/alternative), inline parts (multipart/related), attachments
(multipart/mixed), ASCII addresses with optional display names, and subjects or custom
header values in any script. This module writes those bytes itself:

- headers: RFC 2047 encoded words (``utf-8``, Q or B, whichever is shorter, as the
  stdlib picks) for non-ASCII text, quoted strings for ASCII display names that are not
  a plain phrase, folded at spaces to 78 characters where the text allows (never more
  than 998), CRLF line ends;
- bodies: the stdlib's own choice of transfer encoding (``_encode_text``: 7bit when ASCII
  with lines of at most 78 octets, quoted-printable for non-ASCII text as
  ``compose`` asks, base64 for attachments, 76-character lines) with the same line-end
  normalisation (``bytes.splitlines``), through ``binascii`` (C) instead of the
  stdlib's character loops;
- boundaries: ``=_`` and random hex, which quoted-printable and base64 output can never
  contain; a 7bit part is searched for it anyway and another is drawn.

Anything else -- an unusual display name (control characters, ``=?``, runs of spaces,
a name too long for one encoded word), a non-ASCII address, an odd file name, MIME type
or Content-ID, a header line that would pass 998 octets -- raises ``Unsupported`` and
``compose`` uses the stdlib as before. The output is equivalent to the stdlib's, not
byte-identical: tests/test_compose_fast.py parses both with the stdlib and compares
headers, structure and decoded payloads.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from agentpost.mail.compose import Address, AttachmentPart

#: Preferred and hard header line lengths (RFC 5322 §2.1.1).
_PREFERRED = 78
_HARD = 998
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR_RE = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]{{1,63}}(?:\.[A-Za-z0-9-]{{1,63}})+\Z")
_PHRASE_RE = re.compile(rf"{_ATEXT}(?: {_ATEXT})*\Z")
#: Text the direct writer leaves to the stdlib: control characters (C0, DEL, C1), the
#: Unicode line and paragraph separators, something that looks like an encoded word,
#: and whitespace a reader may not keep (leading, trailing, runs).
_UNUSUAL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]|=\?|^\s|\s\Z|\s\s")
_MIME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}/"
                      r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\Z")
_MSGID_RE = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>\Z")
_CID_RE = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]{1,250}\Z")
_QUOTABLE_FILENAME_RE = re.compile(r'[\x20-\x21\x23-\x5b\x5d-\x7e]{1,255}\Z')
#: Characters a Q-encoded word may carry as they are in any header position
#: (RFC 2047 §5 (3), the strictest rule: a phrase).
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_Q_BYTE = [chr(b) if b in _Q_SAFE else f"={b:02X}" for b in range(256)]
_Q_BYTE[0x20] = "_"
#: Payload room of one encoded word: 75 characters minus ``=?utf-8?q??=``.
_EW_ROOM = 75 - 12
_CRLF = b"\r\n"
#: Characters of a file name per parameter line (RFC 2231 continuations beyond).
_PARAM_ROOM = 60


class Unsupported(Exception):
    """The message has something the direct writer leaves to the stdlib."""


# --------------------------------------------------------------------------- headers

def _q_len(data: bytes) -> int:
    return sum(1 if b in _Q_SAFE or b == 0x20 else 3 for b in data)


def encoded_words(text: str) -> list[str]:
    """``text`` as UTF-8 encoded words of at most 75 characters each, never splitting
    a character; Q when it is no longer than B (the stdlib's rule), else B."""
    data = text.encode("utf-8")
    use_q = _q_len(data) <= (len(data) + 2) // 3 * 4
    words: list[str] = []
    chunk = bytearray()
    room = _EW_ROOM if use_q else _EW_ROOM // 4 * 3
    size = 0
    for ch in text:
        piece = ch.encode("utf-8")
        cost = _q_len(piece) if use_q else len(piece)
        if chunk and size + cost > room:
            words.append(_one_word(bytes(chunk), use_q))
            chunk.clear()
            size = 0
        chunk += piece
        size += cost
    if chunk or not words:
        words.append(_one_word(bytes(chunk), use_q))
    return words


def _one_word(data: bytes, use_q: bool) -> str:
    if use_q:
        return "=?utf-8?q?" + "".join([_Q_BYTE[b] for b in data]) + "?="
    return "=?utf-8?b?" + base64.b64encode(data).decode("ascii") + "?="


def fold(name: str, tokens: Sequence[str]) -> str:
    """``Name: tokens`` with a space between tokens, a line break before a token that
    would pass 78 characters; ``Unsupported`` if a line must pass 998."""
    lines: list[str] = []
    line = f"{name}:"
    started = False
    for tok in tokens:
        if started and len(line) + 1 + len(tok) > _PREFERRED:
            lines.append(line)
            line = " " + tok
        else:
            line += " " + tok
            started = True
    lines.append(line)
    if max(map(len, lines)) > _HARD:
        raise Unsupported(name)
    return "\r\n".join(lines) + "\r\n"


def unstructured(name: str, value: str) -> str:
    """A Subject-like header: ASCII as it is, anything else as encoded words (the
    whitespace between adjacent encoded words is not part of the text)."""
    if _UNUSUAL.search(value):
        raise Unsupported(name)
    if not value:
        return f"{name}:\r\n"
    if value.isascii():
        return fold(name, value.split(" "))
    try:
        return fold(name, encoded_words(value))
    except UnicodeEncodeError:  # a lone surrogate
        raise Unsupported(name) from None


def _mailbox_tokens(email: str, name: str | None) -> list[str] | None:
    """One mailbox as folding tokens, or None when the stdlib should write it."""
    if not _ADDR_RE.match(email) or "=?" in email:
        return None
    if not name:
        return [email]
    if _UNUSUAL.search(name):
        return None
    if name.isascii():
        if _PHRASE_RE.match(name):
            return [*name.split(" "), f"<{email}>"]
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if len(quoted) <= _EW_ROOM:
            return [quoted, f"<{email}>"]
    try:
        words = encoded_words(name)
    except UnicodeEncodeError:
        return None
    # A reader keeps the space between two encoded words of a display name (the stdlib
    # does), so a name is one word or the stdlib's business.
    return [words[0], f"<{email}>"] if len(words) == 1 else None


def address_header(name: str, addresses: Iterable[Address]) -> str | None:
    """``To: a, B <b@x>`` folded after commas, or None when some mailbox is unusual."""
    tokens: list[str] = []
    for a in addresses:
        mailbox = _mailbox_tokens(a.email, a.name)
        if mailbox is None:
            return None
        if tokens:
            tokens[-1] += ","
        tokens.extend(mailbox)
    try:
        return fold(name, tokens)
    except Unsupported:
        return None


def message_id_header(name: str, ids: Sequence[str]) -> str:
    """Message-ID, In-Reply-To, References: checked ids, folded between ids."""
    for mid in ids:
        if not _MSGID_RE.match(mid) or "=?" in mid:
            raise Unsupported(name)
    return fold(name, ids)


# --------------------------------------------------------------------------- bodies

class Part:
    """One MIME entity: its header lines (CRLF-terminated) and its encoded body."""

    __slots__ = ("body", "headers")

    def __init__(self, headers: list[str], body: bytes) -> None:
        self.headers = headers
        self.body = body

    def as_bytes(self) -> bytes:
        return "".join(self.headers).encode("ascii") + _CRLF + self.body


def _qp(data: bytes) -> bytes:
    """Quoted-printable of LF-separated text, CRLF line ends (binascii: 76-character
    lines, trailing whitespace and a lone leading dot encoded)."""
    return binascii.b2a_qp(data, istext=True).replace(b"\n", _CRLF)


def _b64(data: bytes) -> bytes:
    """base64 in lines of 76 characters (57 octets), as the stdlib writes it (one
    encode and slices: ``base64.encodebytes`` loops in Python per line)."""
    if not data:
        return b""
    encoded = base64.b64encode(data)
    return _CRLF.join([encoded[i:i + 76] for i in range(0, len(encoded), 76)]) + _CRLF


def text_part(text: str, subtype: str) -> Part:
    """A text part as ``set_content(text, cte=...)`` in compose makes it: lines split
    like the stdlib (``bytes.splitlines``), quoted-printable for non-ASCII, otherwise
    7bit when every line fits in 78 octets, else the stdlib's sniff of the first ten
    lines picks quoted-printable or base64."""
    try:
        lines = text.encode("utf-8").splitlines()
    except UnicodeEncodeError:
        raise Unsupported("body") from None
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
    if text.isascii():
        if max(map(len, lines), default=0) <= _PREFERRED:
            return Part([head, "Content-Transfer-Encoding: 7bit\r\n"],
                        _CRLF.join(lines) + _CRLF)
        sniff = _CRLF.join(lines[:10]) + _CRLF
        if len(_qp(sniff)) > len(binascii.b2a_base64(sniff)):
            return Part([head, "Content-Transfer-Encoding: base64\r\n"],
                        _b64(_CRLF.join(lines) + _CRLF))
    return Part([head, "Content-Transfer-Encoding: quoted-printable\r\n"],
                _qp(b"\n".join(lines) + b"\n"))


def _filename_params(filename: str) -> list[str]:
    """``filename="x"`` or RFC 2231 (``filename*=utf-8''%..``), split into numbered
    continuations when one would not fit a 78-character line."""
    if _UNUSUAL.search(filename):
        raise Unsupported("filename")
    if _QUOTABLE_FILENAME_RE.match(filename):
        if len(filename) <= _PARAM_ROOM:
            return [f'filename="{filename}"']
        return _continued([filename[i:i + _PARAM_ROOM]
                           for i in range(0, len(filename), _PARAM_ROOM)], '"', '"', "")
    if filename.isascii():  # a quote or backslash: the stdlib escapes it its way
        raise Unsupported("filename")
    try:
        pieces = [quote(ch, safe="", encoding="utf-8", errors="strict") for ch in filename]
    except UnicodeEncodeError:
        raise Unsupported("filename") from None
    if sum(map(len, pieces)) <= _PARAM_ROOM:
        return ["filename*=utf-8''" + "".join(pieces)]
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + len(piece) <= _PARAM_ROOM - 10:
            chunks[-1] += piece
        else:
            chunks.append(piece)
    chunks[0] = "utf-8''" + chunks[0]
    return _continued(chunks, "", "", "*")


def _continued(chunks: list[str], left: str, right: str, star: str) -> list[str]:
    """``filename*0=..; filename*1=..`` (RFC 2231 §3) as folding tokens."""
    return [f"filename*{i}{star}={left}{chunk}{right}" + (";" if i < len(chunks) - 1 else "")
            for i, chunk in enumerate(chunks)]


def attachment_part(att: AttachmentPart, disposition: str, cid: str | None) -> Part:
    """A base64 part as ``add_attachment`` / ``add_related`` in compose make it."""
    maintype, _, subtype = att.mime_type.partition("/")
    mime = f"{maintype}/{subtype or 'octet-stream'}"
    if not _MIME_RE.match(mime) or maintype.lower() in ("multipart", "message"):
        raise Unsupported("mime_type")
    headers = [f"Content-Type: {mime}\r\n", "Content-Transfer-Encoding: base64\r\n",
               fold("Content-Disposition", [f"{disposition};",
                                            *_filename_params(att.filename)])]
    if cid is not None:
        if not _CID_RE.match(cid) or "=?" in cid:
            raise Unsupported("content_id")
        headers.append(f"Content-ID: <{cid}>\r\n")
    return Part(headers, _b64(att.data))


def multipart(subtype: str, parts: Sequence[Part]) -> Part:
    """``multipart/<subtype>`` of ``parts`` with a boundary that occurs in none."""
    chunks = [p.as_bytes() for p in parts]
    while True:
        boundary = "=_" + os.urandom(12).hex()
        delimiter = b"--" + boundary.encode("ascii")
        if not any(delimiter[2:] in c for c in chunks):
            break
    body = (delimiter + _CRLF + (_CRLF + delimiter + _CRLF).join(chunks)
            + _CRLF + delimiter + b"--" + _CRLF)
    return Part([f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n'], body)


def body_structure(text_body: str | None, html_body: str | None,
                   attachments: Sequence[AttachmentPart]) -> Part:
    """The same tree compose's stdlib path builds: text, html or both
    (multipart/alternative), inline parts with the HTML as multipart/related, the
    other files making the whole multipart/mixed."""
    inline = [a for a in attachments if a.inline and a.content_id and html_body]
    files = [a for a in attachments if a not in inline]
    html: Part | None = None
    if html_body is not None:
        html = text_part(html_body, "html")
        if inline:
            html = multipart("related", [html, *(
                attachment_part(a, "inline", (a.content_id or "").strip("<>"))
                for a in inline)])
    if html is not None and text_body is not None:
        top = multipart("alternative", [text_part(text_body, "plain"), html])
    elif html is not None:
        top = html
    else:
        top = text_part(text_body or "", "plain")
    if files:
        top = multipart("mixed", [top, *(
            attachment_part(a, "inline" if a.inline else "attachment",
                            a.content_id.strip("<>") if a.content_id else None)
            for a in files)])
    return top


def message_bytes(header_lines: Sequence[str], body: Part) -> bytes:
    """The whole message: the caller's header lines, MIME-Version, the body's own
    Content-* lines, a blank line, the body."""
    head = "".join(header_lines) + "MIME-Version: 1.0\r\n" + "".join(body.headers)
    return head.encode("ascii") + _CRLF + body.body
