"""Keep large MIME parts out of the stdlib email parser.

Why: ``email.message_from_bytes`` holds a part's body several times over (line lists,
the joined payload, the decoded bytes, the text), so a 10 MB attachment cost ~9x its
size in memory at ingest. Here the MIME tree is located on the raw bytes by offsets
(:mod:`agentpost.mail.imapformat`), every leaf body above a threshold is cut out of the
copy the stdlib parser sees (its header gets a marker field naming the cut), and those
bodies are decoded straight from the raw bytes in chunks: attachments into a spool file
(hashed as they are written), text into one string.

The stdlib parser still decides what each part *is* (attachment or body, filename,
charset) from the untouched headers, so the API sees the same fields either way.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from agentpost.mail import imapformat

#: Leaf bodies larger than this are decoded here instead of by the stdlib parser.
LARGE_PART_BYTES = 256 * 1024
#: The header field that marks a cut part in the parser's copy (never stored).
MARKER = "X-AgentPost-Large-Part"
_CHUNK = 1024 * 1024
_NOT_B64 = bytes(c for c in range(256) if not (chr(c).isascii() and (chr(c).isalnum()
                                                                       or chr(c) in "+/=")))


@dataclass(frozen=True)
class LargePart:
    """A leaf body cut out of the parser's copy: ``raw[start:end]``."""

    start: int
    end: int


@dataclass
class DecodedFile:
    """A decoded attachment spooled to disk (the caller deletes ``path``)."""

    path: str
    size: int
    sha256: str


def skeleton(raw: bytes, threshold: int = LARGE_PART_BYTES,
             tree: imapformat.MimeEntity | None = None) -> tuple[bytes, list[LargePart]]:
    """``raw`` with every leaf body above ``threshold`` removed and its header marked
    ``X-AgentPost-Large-Part: <n>``; the cut parts in order. ``(raw, [])`` if none."""
    root = tree or imapformat.parse_tree(raw)
    leaves: list[imapformat.MimeEntity] = []

    def walk(ent: imapformat.MimeEntity) -> None:
        if ent.is_multipart:
            for child in ent.children:
                walk(child)
        elif ent.message is not None:
            walk(ent.message)
        elif ent.end - ent.bstart > threshold and ent.bstart > ent.hstart:
            leaves.append(ent)

    walk(root)
    if not leaves:
        return raw, []
    pieces: list[bytes | memoryview] = []
    view = memoryview(raw)
    pos = 0
    parts: list[LargePart] = []
    for n, ent in enumerate(leaves):
        # The header ends with its blank line; the marker goes just before it.
        blank = 2 if raw[ent.bstart - 2:ent.bstart] == b"\r\n" else 1
        pieces.append(view[pos:ent.bstart - blank])
        pieces.append(f"{MARKER}: {n}\r\n".encode("ascii"))
        pieces.append(view[ent.bstart - blank:ent.bstart])
        pos = ent.end
        parts.append(LargePart(ent.bstart, ent.end))
    pieces.append(view[pos:])
    return b"".join(pieces), parts


Decoder = Callable[[Iterable[memoryview]], Iterator[bytes]]


def _chunks(raw: bytes, part: LargePart, *, at_newline: bool) -> Iterator[memoryview]:
    """Yield ~1 MiB views of the part's body (ending at a newline when asked)."""
    view = memoryview(raw)
    pos = part.start
    while pos < part.end:
        end = min(part.end, pos + _CHUNK)
        if at_newline and end < part.end:
            nl = raw.rfind(b"\n", pos, end)
            if nl > pos:
                end = nl + 1
        yield view[pos:end]
        pos = end


def _decode_b64(chunks: Iterable[memoryview]) -> Iterator[bytes]:
    carry = b""
    for chunk in chunks:
        data = carry + bytes(chunk).translate(None, _NOT_B64)
        cut = len(data) - len(data) % 4
        carry = data[cut:]
        if cut:
            yield _b64(data[:cut])
    if carry.strip(b"="):
        yield _b64(carry + b"=" * (-len(carry) % 4))


def _decode_qp(chunks: Iterable[memoryview]) -> Iterator[bytes]:
    for chunk in chunks:  # whole lines: quoted-printable is line by line
        yield binascii.a2b_qp(bytes(chunk))


def _identity(chunks: Iterable[memoryview]) -> Iterator[bytes]:
    for chunk in chunks:
        yield bytes(chunk)


def _decoder(cte: str) -> tuple[Decoder, bool]:
    """(decoder, chunks must end at a newline) for a Content-Transfer-Encoding."""
    cte = cte.strip().lower()
    if cte == "base64":
        return _decode_b64, False
    if cte == "quoted-printable":
        return _decode_qp, True
    return _identity, False


def _b64(data: bytes) -> bytes:
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:  # padding in the middle, as broken mailers send: go on quietly
        out = []
        for piece in re.split(rb"=+", data):
            piece = piece[: len(piece) - len(piece) % 4] if len(piece) % 4 == 1 else piece
            if piece:
                try:
                    out.append(binascii.a2b_base64(piece + b"=" * (-len(piece) % 4)))
                except binascii.Error:
                    continue
        return b"".join(out)


def decode_to_file(raw: bytes, part: LargePart, cte: str,
                   spool_dir: str | None = None) -> DecodedFile:
    """Decode the part's body into a temporary file, hashing on the way."""
    decode, at_newline = _decoder(cte)
    digest = hashlib.sha256()
    size = 0
    fd, path = tempfile.mkstemp(prefix="agentpost-part-", dir=spool_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            for data in decode(_chunks(raw, part, at_newline=at_newline)):
                digest.update(data)
                size += len(data)
                out.write(data)
    except BaseException:
        os.unlink(path)
        raise
    return DecodedFile(path, size, digest.hexdigest())


def decode_to_bytes(raw: bytes, part: LargePart, cte: str, *,
                    view: bool = False) -> bytes | bytearray | memoryview:
    """Decode the part's body into memory (a text body: it is stored as text anyway),
    with one copy of the result and no more. ``view``: a body without a transfer
    encoding comes back as a view of ``raw``, no copy at all."""
    decode, at_newline = _decoder(cte)
    if decode is _identity:
        return memoryview(raw)[part.start:part.end] if view else raw[part.start:part.end]
    out = bytearray()
    for data in decode(_chunks(raw, part, at_newline=at_newline)):
        out += data
    return out
