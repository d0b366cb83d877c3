"""RFC 3516 BINARY: a MIME part's body with its Content-Transfer-Encoding undone.

FETCH BINARY[...] and BINARY.SIZE[...] call :func:`decode_body` / :func:`decoded_size`
on the body octets :mod:`agentpost.mail.imapformat` located, with the part's CTE.

Why these choices:

* An unknown CTE (``x-uuencode``, a typo) raises :class:`UnknownTransferEncoding`: RFC
  3516 §4.2 says the server MUST answer ``NO`` with ``[UNKNOWN-CTE]``.
* base64 is tolerant of whitespace and of a missing final ``=`` (no information is
  lost), but strict about anything that would make the octets a guess: a character
  outside the base64 alphabet, data after the padding, a lone trailing sextet. Those
  raise :class:`InvalidTransferEncoding`. RFC 2045 §6.8 lets a decoder ignore stray
  characters but also says "a message rejection might be appropriate"; Dovecot rejects
  (``NO [PARSE] Invalid data in MIME part``), and a client asking for BINARY is better
  served by a refusal -- it can still fetch BODY[] and decode it itself -- than by
  silently corrupted octets.
* quoted-printable follows RFC 2045 §6.7's "robust implementation": trailing
  whitespace on a line is transport padding and dropped, an ``=`` not followed by two
  hex digits is kept as it is. Nothing there is ambiguous, so nothing is refused.
* Decoding is streaming: input is consumed in 1 MiB slices and nothing is held beyond
  one slice and a few carried octets (a quoted-printable line with no line break at
  all is cut at a safe point), so a 50 MB part costs linear time, a bounded amount of
  memory for :func:`decoded_size`, and one copy of the result for :func:`decode_body`.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Iterator

from agentpost.model import errors

__all__ = ["IDENTITY_ENCODINGS", "Decoder", "InvalidTransferEncoding",
           "UnknownTransferEncoding", "decode_body", "decoded_size", "decoder", "iter_decoded",
           "needs_literal8", "transfer_encoding"]

#: CTEs whose decoding is the identity (RFC 2045 §6.2).
IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary"})
_KNOWN = IDENTITY_ENCODINGS | {"base64", "quoted-printable"}
_CHUNK = 1024 * 1024
#: Longest header value looked at when naming the CTE (the token is a few octets).
_MAX_CTE_CHARS = 256

_B64_WS = b" \t\r\n\x0b\x0c"
_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
#: A quoted-printable line longer than this without a line break is decoded in pieces.
_QP_MAX_PENDING = 64 * 1024
#: Trailing blanks longer than this at a piece boundary are content, not padding.
_QP_MAX_PADDING = 1000


class UnknownTransferEncoding(errors.Unprocessable):
    """The part's Content-Transfer-Encoding is not one we can undo (``NO [UNKNOWN-CTE]``)."""

    type = "unknown_transfer_encoding"
    default_message = "Unknown Content-Transfer-Encoding."

    def __init__(self, cte: str) -> None:
        super().__init__(None, cte=cte)
        self.cte = cte


class InvalidTransferEncoding(errors.Unprocessable):
    """The body is not valid for its CTE (Dovecot answers ``NO [PARSE]``)."""

    type = "invalid_transfer_encoding"
    default_message = "Invalid data in MIME part."


def transfer_encoding(value: str | None) -> str:
    """The CTE mechanism of a header value, lower-cased; a missing or empty field is
    ``7bit`` (RFC 2045 §6.1). Comments are dropped (``base64 (by Foo)``); anything we
    cannot decode raises :class:`UnknownTransferEncoding`."""
    text = (value or "")[:_MAX_CTE_CHARS]
    depth, kept = 0, []
    for ch in text:  # RFC 822 comments, possibly nested, possibly unterminated
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth:
            kept.append(ch)
    words = "".join(kept).replace(";", " ").split()
    cte = words[0].lower() if words else "7bit"
    if cte not in _KNOWN or len(words) > 1:
        raise UnknownTransferEncoding(cte if len(words) <= 1 else " ".join(words))
    return cte


def _slices(data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    view = memoryview(data)
    for pos in range(0, len(view), _CHUNK):
        yield view[pos:pos + _CHUNK]


class Decoder:
    """A push-style decoder: :meth:`feed` successive slices of the encoded body, then
    :meth:`finish`. Why push and not only :func:`iter_decoded`: a FETCH reads a large
    part from the blob store a chunk at a time (each read awaited), so it hands each
    chunk in as it arrives; the state carried between chunks is a few octets."""

    def feed(self, chunk: bytes | memoryview) -> bytes:
        """Decoded octets of one more slice (possibly none yet)."""
        return bytes(chunk)

    def finish(self) -> bytes:
        """The octets still held back; InvalidTransferEncoding if the body ends badly."""
        return b""


class _Base64Decoder(Decoder):
    def __init__(self) -> None:
        self.carry = b""  # < 4 significant characters of an unfinished quantum
        self.pads = 0  # "=" seen: from then on only "=" and whitespace may follow

    def feed(self, chunk: bytes | memoryview) -> bytes:
        data = bytes(chunk).translate(None, _B64_WS)
        if not data:
            return b""
        if data.translate(None, _B64_CHARS):
            raise InvalidTransferEncoding("Invalid character in base64 data.")
        if self.pads:
            if data.strip(b"="):
                raise InvalidTransferEncoding("Data after base64 padding.")
            self.pads += len(data)
            return b""
        eq = data.find(b"=")
        if eq >= 0:
            if data[eq:].strip(b"="):
                raise InvalidTransferEncoding("Data after base64 padding.")
            self.pads = len(data) - eq
            data = data[:eq]
        data = self.carry + data
        cut = len(data) - len(data) % 4
        self.carry = data[cut:]
        return binascii.a2b_base64(data[:cut]) if cut else b""

    def finish(self) -> bytes:
        carry, pads = self.carry, self.pads
        if not carry and not pads:
            return b""
        if len(carry) < 2 or pads > 4 - len(carry):
            raise InvalidTransferEncoding("Truncated or over-padded base64 data.")
        return binascii.a2b_base64(carry + b"=" * (4 - len(carry)))


def _strip_padding(data: bytes, at_end: bool) -> bytes:
    """Drop the blanks before each line break (and at the very end when ``at_end``)."""
    if not at_end and not any(p in data for p in (b" \n", b"\t\n", b" \r\n", b"\t\r\n")):
        return data
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last and not at_end:
            break
        if line.endswith(b"\r"):
            lines[i] = line[:-1].rstrip(b" \t") + b"\r"
        else:
            lines[i] = line.rstrip(b" \t")
    return b"\n".join(lines)


def _qp_cut(pending: bytearray) -> int:
    """Where a long line may be split: not inside ``=XY``, not inside a short run of
    trailing blanks (which may turn out to be padding before a line break)."""
    cut = len(pending)
    if pending[cut - 1:cut] == b"=":
        cut -= 1
    elif pending[cut - 2:cut - 1] == b"=":
        cut -= 2
    low = max(0, cut - _QP_MAX_PADDING)
    blanks = cut
    while blanks > low and pending[blanks - 1] in b" \t":
        blanks -= 1
    return blanks if blanks > low else cut


class _QuotedPrintableDecoder(Decoder):
    def __init__(self) -> None:
        self.pending = bytearray()  # the start of a line not decoded yet

    def feed(self, chunk: bytes | memoryview) -> bytes:
        pending = self.pending
        start = len(pending)  # what is pending already holds no line break
        pending += chunk
        newline = pending.rfind(b"\n", start)
        if newline >= 0:
            cut = newline + 1
        elif len(pending) > _QP_MAX_PENDING:
            cut = _qp_cut(pending)
        else:
            return b""
        data = _strip_padding(bytes(pending[:cut]), at_end=False)
        del pending[:cut]
        return binascii.a2b_qp(data) if data else b""

    def finish(self) -> bytes:
        pending, self.pending = self.pending, bytearray()
        return binascii.a2b_qp(_strip_padding(bytes(pending), at_end=True)) if pending \
            else b""


def decoder(cte: str | None) -> Decoder:
    """A push decoder for the raw CTE header value ``cte`` (UnknownTransferEncoding
    for one we cannot undo)."""
    mechanism = transfer_encoding(cte)
    if mechanism == "base64":
        return _Base64Decoder()
    if mechanism == "quoted-printable":
        return _QuotedPrintableDecoder()
    return Decoder()


def _drive(dec: Decoder, chunks: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    for chunk in chunks:
        out = dec.feed(chunk)
        if out:
            yield out
    tail = dec.finish()
    if tail:
        yield tail


def iter_decoded(chunks: Iterable[bytes | memoryview], cte: str | None) -> Iterator[bytes]:
    """Decode a body given as successive slices; ``cte`` is the raw header value.

    Raises :class:`UnknownTransferEncoding` before consuming anything, and
    :class:`InvalidTransferEncoding` while iterating (after some output may already
    have been produced: callers that stream must not commit to the response first).
    """
    return _drive(decoder(cte), chunks)


def decode_body(body: bytes | bytearray | memoryview, cte: str | None) -> bytes:
    """The decoded octets of a whole body (BINARY[section])."""
    if transfer_encoding(cte) in IDENTITY_ENCODINGS:
        return bytes(body)
    return b"".join(iter_decoded(_slices(body), cte))


def decoded_size(body: bytes | bytearray | memoryview, cte: str | None) -> int:
    """BINARY.SIZE[section]: the decoded length, without holding the decoded body."""
    if transfer_encoding(cte) in IDENTITY_ENCODINGS:
        return len(body)
    return sum(len(piece) for piece in iter_decoded(_slices(body), cte))


def needs_literal8(data: bytes | bytearray | memoryview) -> bool:
    """Whether decoded octets must go out as ``~{n}`` (RFC 3516 §4.3): they contain NUL,
    which no IMAP4rev1 string may carry; otherwise a plain literal is preferred."""
    return b"\x00" in data
