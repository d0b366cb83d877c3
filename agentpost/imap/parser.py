"""IMAP command parsing (RFC 3501 §9, RFC 7888 literals): pure functions, no I/O.

The server assembles one *command* as bytes: the command line with each literal's
octets appended right after the ``{n}``/``{n+}`` marker's CRLF, exactly as they
arrived on the wire. :func:`tokenize` turns that into tokens (atoms, quoted
strings, literals, parenthesised lists); the ``parse_*`` helpers interpret the
arguments of each command. Every syntax problem raises :class:`ParseError`, which
the server answers with ``BAD``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from agentpost.mail.imapformat import SectionSpec, parse_section
from agentpost.model import errors

__all__ = [
    "LITERAL_RE",
    "Atom",
    "Command",
    "FetchItem",
    "Literal",
    "Literal8",
    "ParseError",
    "QuotedString",
    "SavedResult",
    "SeqSet",
    "decode_mailbox",
    "encode_mailbox",
    "merge_ranges",
    "parse_command",
    "parse_fetch_items",
    "parse_flags",
    "parse_seqset",
    "tokenize",
]

#: A command line (or literal-continued line) ending with ``{n}`` or ``{n+}``.
LITERAL_RE = re.compile(rb"\{(\d{1,19})(\+?)\}\r?$")


class ParseError(Exception):
    """The command is syntactically wrong: answer ``BAD`` with this text."""


class Atom(str):
    """An unquoted token (atom, NIL, sequence set, ``\\Flag``, ``BODY[...]<...>``)."""


class QuotedString(str):
    """A quoted string (already unescaped)."""


class Literal(bytes):
    """A literal's octets."""


class Literal8(Literal):
    """A ``~{n}`` literal's octets (RFC 3516 §4.4): only an APPEND message may be one
    (any octet, NUL included); :func:`astring` refuses it elsewhere."""


Token = Any  # Atom | QuotedString | Literal | list[Token]

#: Parentheses may nest this deep in any command (SEARCH, FETCH, APPEND flags, LIST
#: options...): deeper input is refused here, before anything walks the token tree.
MAX_NESTING_DEPTH = 64
#: Tokens (atoms, strings, literals, lists) in one command: no command needs more, and
#: each costs the reactor some microseconds.
MAX_TOKENS = 10_000

# Why regex runs: a command may be a megabyte, and a per-byte Python loop held the
# reactor for seconds. Each pattern is one possessive character class: linear, no
# backtracking whatever the input.
_SPACES = re.compile(rb" *+")
_ATOM_RUN = re.compile(rb'[^ ()\r\n"{\[]*+')  # "]" outside brackets is an atom character
#: Only these fetch attributes open a section in which spaces and parentheses belong to
#: the atom; anywhere else "[" is an ordinary ATOM-CHAR (a mailbox may be ``a[b``).
_SECTION_ATOMS = frozenset({b"BODY", b"BODY.PEEK", b"BINARY", b"BINARY.PEEK", b"BINARY.SIZE"})
_BRACKETED_RUN = re.compile(rb"[^\[\]\r\n]*+")
_QUOTED_RUN = re.compile(rb'[^"\\\r\n]*+')
_LITERAL_AT = re.compile(rb"\{(\d{1,19})\+?\}\r\n")


def tokenize(data: bytes) -> list[Token]:
    """Tokens of one assembled command (see module docstring)."""
    stack: list[list[Token]] = [[]]
    pos = 0
    n = len(data)
    tokens = 0
    while pos < n:
        c = data[pos]
        if c != 0x20:
            tokens += 1
            if tokens > MAX_TOKENS:
                raise ParseError(f"Too many arguments (at most {MAX_TOKENS})")
        if c == 0x20:  # space
            pos = _SPACES.match(data, pos).end()  # type: ignore[union-attr]
        elif c in (0x0D, 0x0A):
            raise ParseError("Unexpected line break")
        elif c == 0x28:  # (
            if len(stack) > MAX_NESTING_DEPTH:
                raise ParseError(
                    f"Parentheses nested too deeply (at most {MAX_NESTING_DEPTH} levels)")
            stack.append([])
            pos += 1
        elif c == 0x29:  # )
            if len(stack) == 1:
                raise ParseError("Unbalanced parenthesis")
            inner = stack.pop()
            stack[-1].append(inner)
            pos += 1
        elif c == 0x22:  # "
            quoted, pos = _quoted(data, pos)
            stack[-1].append(quoted)
        elif c == 0x7B or (c == 0x7E and data[pos + 1:pos + 2] == b"{"):  # { or ~{
            m = _LITERAL_AT.match(data, pos + (c == 0x7E))
            if m is None:
                raise ParseError("Bad literal")
            size = int(m.group(1))
            start = m.end()
            if start + size > n:
                raise ParseError("Truncated literal")
            kind = Literal8 if c == 0x7E else Literal
            stack[-1].append(kind(data[start:start + size]))
            pos = start + size
        else:
            atom, pos = _atom(data, pos)
            stack[-1].append(atom)
    if len(stack) != 1:
        raise ParseError("Unbalanced parenthesis")
    return stack[0]


def _quoted(data: bytes, pos: int) -> tuple[QuotedString, int]:
    """The quoted string opening at ``pos``, and the position after its closing quote."""
    out = bytearray()
    pos += 1
    while True:
        end = _QUOTED_RUN.match(data, pos).end()  # type: ignore[union-attr]
        out += data[pos:end]
        pos = end
        if pos >= len(data):
            raise ParseError("Unterminated quoted string")
        c = data[pos]
        if c == 0x22:
            return QuotedString(out.decode("utf-8", "replace")), pos + 1
        if c in (0x0D, 0x0A):
            raise ParseError("Line break in quoted string")
        if pos + 1 >= len(data) or data[pos + 1] not in (0x5C, 0x22):  # a backslash
            raise ParseError("Bad escape in quoted string")
        out.append(data[pos + 1])
        pos += 2


def _atom(data: bytes, pos: int) -> tuple[Atom, int]:
    """The atom starting at ``pos``, and the position after it. Inside brackets spaces
    and parentheses belong to the atom: ``BODY[HEADER.FIELDS (A B)]<0.10>``."""
    start = pos
    while True:
        pos = _ATOM_RUN.match(data, pos).end()  # type: ignore[union-attr]
        if pos >= len(data) or data[pos] != 0x5B:  # [
            return Atom(data[start:pos].decode("utf-8", "replace")), pos
        if pos - start > 11 or data[start:pos].upper() not in _SECTION_ATOMS:
            pos += 1  # a plain "[" (ATOM-CHAR); the slice above is at most 11 bytes
            continue
        depth = 0
        while True:
            if pos >= len(data) or data[pos] not in (0x5B, 0x5D):
                raise ParseError("Unterminated [")  # a line break or the end inside [...]
            depth += 1 if data[pos] == 0x5B else -1
            pos += 1
            if depth == 0:
                break
            pos = _BRACKETED_RUN.match(data, pos).end()  # type: ignore[union-attr]


@dataclass
class Command:
    """A tagged command: ``name`` upper-cased, ``uid`` for ``UID <name>``."""

    tag: str
    name: str
    args: list[Token]
    uid: bool = False


_TAG_RE = re.compile(r"^[\x21-\x7e]+\Z")


def parse_command(data: bytes) -> Command:
    """Split an assembled command into tag, name and argument tokens.

    Raises ParseError; ``ParseError.tag`` is set when the tag itself was readable.
    """
    space = data.find(b" ")
    tag = data[:space if space >= 0 else len(data)].decode("ascii", "replace")
    if not tag or not _TAG_RE.match(tag) or any(c in tag for c in "(){%*\"\\+"):
        raise ParseError("Missing or invalid tag")
    try:
        tokens = tokenize(data[len(tag):])
    except ParseError as exc:
        exc.tag = tag  # type: ignore[attr-defined]
        raise
    if not tokens or not isinstance(tokens[0], Atom):
        err = ParseError("Missing command")
        err.tag = tag  # type: ignore[attr-defined]
        raise err
    name = tokens[0].upper()
    args = tokens[1:]
    uid = False
    if name == "UID":
        if not args or not isinstance(args[0], Atom):
            err = ParseError("UID needs a command")
            err.tag = tag  # type: ignore[attr-defined]
            raise err
        name, args, uid = args[0].upper(), args[1:], True
    return Command(tag, name, args, uid)


# --------------------------------------------------------------------------- values


def astring(token: Token, what: str = "argument") -> str:
    """An atom, quoted string or literal as text."""
    if isinstance(token, Literal8):
        raise ParseError(f"A literal8 cannot be the {what}")
    if isinstance(token, Literal):
        return bytes(token).decode("utf-8", "replace")
    if isinstance(token, str):
        return str(token)
    raise ParseError(f"Expected a string for {what}")


def number(token: Token, what: str = "number") -> int:
    if not isinstance(token, Atom) or not token.isdigit() or len(token) > 20:
        raise ParseError(f"Expected a number for {what}")
    return int(token)


# Modified UTF-7 (RFC 3501 §5.1.3) for mailbox names on the wire.

def decode_mailbox(name: str) -> str:
    """Wire mailbox name (modified UTF-7) to text; INBOX is case-insensitive.

    Only one spelling of a name is taken (RFC 3501 §5.1.3, as Dovecot): bytes that are
    not UTF-8 (U+FFFD after the tokenizer) and a base64 run that is not the one
    :func:`encode_mailbox` writes (``&AGE-`` for "a", non-zero spare bits, two runs in
    a row) are refused. Why: each once created a folder under a name other than the
    one the client sent, so two different names reached one folder."""
    if "\ufffd" in name:
        raise errors.InvalidRequest("Mailbox name is not valid modified UTF-7")
    if "&" in name:
        name = _decode_utf7(name)
    if name.upper() == "INBOX":
        return "INBOX"
    if name.upper().startswith("INBOX/"):
        return "INBOX" + name[5:]
    return name


def _decode_utf7(name: str) -> str:
    """The ``&...-`` runs of a wire name decoded; InvalidRequest (NO, not BAD: the
    name is a valid astring, as Dovecot answers) for anything but the one spelling."""
    out: list[str] = []
    i = 0
    run_end = -1  # where the last base64 run ended: another may not start there
    while i < len(name):
        ch = name[i]
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = name.find("-", i)
        if end < 0:
            raise errors.InvalidRequest("Mailbox name is not valid modified UTF-7")
        chunk = name[i + 1:end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            b64 += "=" * (-len(b64) % 4)
            try:
                text = base64.b64decode(b64, validate=True).decode("utf-16-be")
            except Exception as exc:
                raise errors.InvalidRequest(
                    "Mailbox name is not valid modified UTF-7") from exc
            if i == run_end or encode_mailbox(text) != f"&{chunk}-":
                raise errors.InvalidRequest("Mailbox name is not valid modified UTF-7")
            out.append(text)
            run_end = end + 1
        i = end + 1
    return "".join(out)


def encode_mailbox(name: str) -> str:
    """Text mailbox name to modified UTF-7."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def mailbox(token: Token) -> str:
    return decode_mailbox(astring(token, "mailbox"))


SeqSet = list[tuple[int | None, int | None]]  # (low, high), None meaning "*"


class SavedResult(list[tuple[int | None, int | None]]):
    """``$`` (RFC 5182 SEARCHRES): the session's saved search result. Only the selected
    mailbox can resolve it (to UIDs, whatever the command's numbering); it holds no
    ranges, and :func:`resolve_seqset` refuses it."""

#: The largest sequence number or UID (nz-number, RFC 3501 §9: an unsigned 32-bit value).
MAX_NZ_NUMBER = 2**32 - 1
# At most 20 digits: int() of a longer run is slow, or refused beyond 4300 digits.
SEQ_RANGE_RE = re.compile(r"^(\d{1,20}|\*)(?::(\d{1,20}|\*))?\Z")


def parse_seqset(token: Token, saved: bool = False) -> SeqSet:
    """``1:3,5,7:*`` -> [(1, 3), (5, 5), (7, None)]. With ``saved`` (the commands RFC
    5182 extends: FETCH STORE COPY MOVE UID EXPUNGE and SEARCH keys) ``$`` alone -- it
    combines with nothing -- is a :class:`SavedResult`."""
    if saved and isinstance(token, Atom) and token == "$":  # noqa: S105 (not a password)
        return SavedResult()
    if not isinstance(token, Atom) or not token:
        raise ParseError("Expected a sequence set")
    out: SeqSet = []
    for piece in token.split(","):
        m = SEQ_RANGE_RE.match(piece)
        if m is None:
            raise ParseError(f"Bad sequence set {token!s}")
        lo = None if m.group(1) == "*" else int(m.group(1))
        hi_text = m.group(2) if m.group(2) is not None else m.group(1)
        hi = None if hi_text == "*" else int(hi_text)
        if lo == 0 or hi == 0:
            raise ParseError("Sequence numbers and UIDs start at 1")
        if (lo or 0) > MAX_NZ_NUMBER or (hi or 0) > MAX_NZ_NUMBER:
            # nz-number is 32-bit (RFC 3501 §9): BAD, as Dovecot answers; it was taken,
            # and UID FETCH 1:4294967296 answered as if it were 1:*.
            raise ParseError(f"Sequence numbers and UIDs are at most {MAX_NZ_NUMBER}")
        out.append((lo, hi))
    return out


def resolve_seqset(seqset: SeqSet, largest: int) -> list[tuple[int, int]]:
    """Concrete inclusive ranges, ``*`` being ``largest`` (0 for an empty mailbox)."""
    if isinstance(seqset, SavedResult):
        raise ParseError("$ cannot be used here")
    out = []
    for lo, hi in seqset:
        a = largest if lo is None else lo
        b = largest if hi is None else hi
        if a > b:
            a, b = b, a
        out.append((a, b))
    return out


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent ranges covering the same numbers. Why: a client's
    ``1:*,1:*,...`` (tens of thousands of times on one line) must cost one pass over
    the mailbox, not one pass per repetition."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


SYSTEM_FLAGS = {f.lower(): f for f in
                ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "\\Recent")}
#: flag-keyword = atom: 7-bit characters, no specials (RFC 3501/9051; 8-bit is BAD here,
#: not a NO from the store).
_KEYWORD_RE = re.compile(r"^[^\x00-\x20(){%*\"\\\]\x7f-\U0010ffff]+\Z")


def parse_flags(tokens: list[Token]) -> frozenset[str]:
    """Flags from atoms: system flags in canonical case, keywords as given."""
    out = set()
    for tok in tokens:
        if not isinstance(tok, Atom):
            raise ParseError("Flags must be atoms")
        if tok.startswith("\\"):
            canon = SYSTEM_FLAGS.get(tok.lower())
            if canon is None:
                raise ParseError(f"Unknown system flag {tok!s}")
            out.add(canon)
        elif _KEYWORD_RE.match(tok):
            out.add(str(tok))
        else:
            raise ParseError(f"Bad keyword {tok!s}")
    return frozenset(out)


_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]


def parse_date(token: Token) -> date:
    text = astring(token, "date")
    m = re.match(r"^(\d{1,2})-([A-Za-z]{3})-(\d{4})$", text)
    if m is None or m.group(2).lower() not in _MONTHS:
        raise ParseError(f"Bad date {text}")
    try:
        return date(int(m.group(3)), _MONTHS.index(m.group(2).lower()) + 1, int(m.group(1)))
    except ValueError as exc:
        raise ParseError(f"Bad date {text}") from exc


def parse_datetime(text: str) -> datetime:
    """``"17-Jul-1996 02:44:25 -0700"`` (APPEND date-time)."""
    m = re.match(r"^ ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$",
                 text)
    if m is None or m.group(2).lower() not in _MONTHS:
        raise ParseError(f"Bad date-time {text}")
    sign = 1 if m.group(7) == "+" else -1
    # A zone of a day or more is no zone (ValueError), and an instant outside years
    # 1-9999 could be stored but never read back (OverflowError): BAD, not a crash.
    try:
        tz = timezone(sign * timedelta(hours=int(m.group(8)), minutes=int(m.group(9))))
        value = datetime(int(m.group(3)), _MONTHS.index(m.group(2).lower()) + 1,
                         int(m.group(1)), int(m.group(4)), int(m.group(5)), int(m.group(6)),
                         tzinfo=tz)
        value.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ParseError(f"Bad date-time {text}") from exc
    return value  # the zone kept: INTERNALDATE answers in it


# --------------------------------------------------------------------------- FETCH


@dataclass(frozen=True)
class FetchItem:
    """One FETCH attribute. ``section`` is set for BODY[...]/BODY.PEEK[...], and for
    BINARY[...]/BINARY.SIZE[...] (RFC 3516: a part path and a partial range only)."""

    name: str  # FLAGS UID INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY RFC822
    #          RFC822.HEADER RFC822.TEXT MODSEQ BODY[] (sections)
    section: SectionSpec | None = None
    peek: bool = False


_SIMPLE_ITEMS = {"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE",
                 "BODY", "RFC822", "RFC822.HEADER", "RFC822.TEXT", "MODSEQ"}
_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_BODY_RE = re.compile(r"^(BODY|BODY\.PEEK)\[(.*)\](?:<(\d{1,20})\.(\d{1,20})>)?$",
                      re.IGNORECASE | re.DOTALL)
#: RFC 3516 §4.2: ``BINARY[.PEEK][section-part]<partial>``, ``BINARY.SIZE[section-part]``;
#: the section-text forms (HEADER, HEADER.FIELDS[.NOT], MIME, TEXT) are accepted too, as
#: Dovecot does (see :mod:`agentpost.imap.commands.binaryfetch`).
_BINARY_RE = re.compile(r"^(BINARY|BINARY\.PEEK|BINARY\.SIZE)\[(.*)\]"
                        r"(?:<(\d{1,20})\.(\d{1,20})>)?$", re.IGNORECASE | re.DOTALL)


def _fetch_item(token: Token) -> FetchItem:
    if not isinstance(token, Atom):
        raise ParseError("Bad FETCH attribute")
    upper = token.upper()
    if upper in _SIMPLE_ITEMS:
        return FetchItem(upper)
    if upper.startswith("BINARY"):
        return _binary_item(token)
    m = _BODY_RE.match(token)
    if m is None:
        raise ParseError(f"Unknown FETCH attribute {token!s}")
    try:
        spec = parse_section(m.group(2))
    except ValueError as exc:
        raise ParseError(str(exc)) from exc
    if m.group(3) is not None:
        count = int(m.group(4))
        if count == 0:
            raise ParseError("Partial count must be positive")
        spec = SectionSpec(spec.part, spec.text, spec.fields, (int(m.group(3)), count))
    return FetchItem("BODY[]", spec, peek=m.group(1).upper() == "BODY.PEEK")


def _binary_item(token: Atom) -> FetchItem:
    """``BINARY[1.2]<0.100>`` -> FetchItem("BINARY", SectionSpec((1, 2), partial=...));
    ``BINARY.SIZE[...]`` takes no partial (RFC 3516 §4.2). Beyond RFC 3516's
    ``section-binary``, a section-text is accepted as in ``BODY[...]``."""
    m = _BINARY_RE.match(token)
    if m is None:
        raise ParseError(f"Unknown FETCH attribute {token!s}")
    kind = m.group(1).upper()
    try:
        spec = parse_section(m.group(2))
    except ValueError:
        raise ParseError(f"Unknown FETCH attribute {token!s}") from None
    partial = None
    if m.group(3) is not None:
        if kind == "BINARY.SIZE":
            raise ParseError("BINARY.SIZE takes no partial range")
        partial = (int(m.group(3)), int(m.group(4)))
        if partial[1] == 0:
            raise ParseError("Partial count must be positive")
    name = "BINARY.SIZE" if kind == "BINARY.SIZE" else "BINARY"
    return FetchItem(name, SectionSpec(spec.part, spec.text, spec.fields, partial),
                     peek=kind == "BINARY.PEEK")


#: Attributes of one FETCH. Each body section costs a pass over the message on the
#: reactor; clients ask for a handful.
MAX_FETCH_ITEMS = 100


def parse_fetch_items(token: Token) -> list[FetchItem]:
    """A FETCH attribute, a parenthesised list of them, or a macro."""
    if isinstance(token, Atom) and token.upper() in _MACROS:
        return [FetchItem(n) for n in _MACROS[token.upper()]]
    tokens = token if isinstance(token, list) else [token]
    if not tokens:
        raise ParseError("Empty FETCH attribute list")
    if len(tokens) > MAX_FETCH_ITEMS:
        raise ParseError(f"Too many FETCH attributes (at most {MAX_FETCH_ITEMS})")
    return [_fetch_item(t) for t in tokens]
