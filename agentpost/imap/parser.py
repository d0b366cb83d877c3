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
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from agentpost.mail.imapformat import SectionSpec, parse_section

__all__ = [
    "LITERAL_RE",
    "Atom",
    "Command",
    "FetchItem",
    "Literal",
    "ParseError",
    "QuotedString",
    "SeqSet",
    "decode_mailbox",
    "encode_mailbox",
    "parse_command",
    "parse_fetch_items",
    "parse_flags",
    "parse_search",
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


Token = Any  # Atom | QuotedString | Literal | list[Token]

_ATOM_STOP = b" ()\r\n\"{"


def tokenize(data: bytes) -> list[Token]:
    """Tokens of one assembled command (see module docstring)."""
    stack: list[list[Token]] = [[]]
    pos = 0
    n = len(data)
    while pos < n:
        ch = data[pos:pos + 1]
        if ch == b" ":
            pos += 1
        elif ch in (b"\r", b"\n"):
            raise ParseError("Unexpected line break")
        elif ch == b"(":
            stack.append([])
            pos += 1
        elif ch == b")":
            if len(stack) == 1:
                raise ParseError("Unbalanced parenthesis")
            inner = stack.pop()
            stack[-1].append(inner)
            pos += 1
        elif ch == b'"':
            pos += 1
            out = bytearray()
            while True:
                if pos >= n:
                    raise ParseError("Unterminated quoted string")
                c = data[pos]
                if c == 0x5C:  # backslash
                    if pos + 1 >= n or data[pos + 1] not in (0x5C, 0x22):
                        raise ParseError("Bad escape in quoted string")
                    out.append(data[pos + 1])
                    pos += 2
                elif c == 0x22:
                    pos += 1
                    break
                elif c in (0x0D, 0x0A):
                    raise ParseError("Line break in quoted string")
                else:
                    out.append(c)
                    pos += 1
            stack[-1].append(QuotedString(out.decode("utf-8", "replace")))
        elif ch == b"{":
            m = re.compile(rb"\{(\d{1,19})\+?\}\r\n").match(data, pos)
            if m is None:
                raise ParseError("Bad literal")
            size = int(m.group(1))
            start = m.end()
            if start + size > n:
                raise ParseError("Truncated literal")
            stack[-1].append(Literal(data[start:start + size]))
            pos = start + size
        else:
            start = pos
            depth = 0
            while pos < n:
                c = data[pos:pos + 1]
                if c == b"[":
                    depth += 1
                elif c == b"]":
                    depth = max(0, depth - 1)
                elif depth == 0 and c in _ATOM_STOP:
                    break
                elif c in (b"\r", b"\n"):
                    break
                pos += 1
            if depth:
                raise ParseError("Unterminated [")
            stack[-1].append(Atom(data[start:pos].decode("utf-8", "replace")))
    if len(stack) != 1:
        raise ParseError("Unbalanced parenthesis")
    return stack[0]


@dataclass
class Command:
    """A tagged command: ``name`` upper-cased, ``uid`` for ``UID <name>``."""

    tag: str
    name: str
    args: list[Token]
    uid: bool = False


_TAG_RE = re.compile(r"^[\x21-\x7e]+$")


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
    """Wire mailbox name (modified UTF-7) to text; INBOX is case-insensitive."""
    if "&" in name:
        out: list[str] = []
        i = 0
        while i < len(name):
            ch = name[i]
            if ch != "&":
                out.append(ch)
                i += 1
                continue
            end = name.find("-", i)
            if end < 0:
                raise ParseError("Bad modified UTF-7 in mailbox name")
            chunk = name[i + 1:end]
            if not chunk:
                out.append("&")
            else:
                b64 = chunk.replace(",", "/")
                b64 += "=" * (-len(b64) % 4)
                try:
                    out.append(base64.b64decode(b64, validate=True).decode("utf-16-be"))
                except Exception as exc:
                    raise ParseError("Bad modified UTF-7 in mailbox name") from exc
            i = end + 1
        name = "".join(out)
    if name.upper() == "INBOX":
        return "INBOX"
    if name.upper().startswith("INBOX/"):
        return "INBOX" + name[5:]
    return name


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

_SEQ_RE = re.compile(r"^(\d+|\*)(?::(\d+|\*))?$")


def parse_seqset(token: Token) -> SeqSet:
    """``1:3,5,7:*`` -> [(1, 3), (5, 5), (7, None)]."""
    if not isinstance(token, Atom) or not token:
        raise ParseError("Expected a sequence set")
    out: SeqSet = []
    for piece in token.split(","):
        m = _SEQ_RE.match(piece)
        if m is None:
            raise ParseError(f"Bad sequence set {token!s}")
        lo = None if m.group(1) == "*" else int(m.group(1))
        hi_text = m.group(2) if m.group(2) is not None else m.group(1)
        hi = None if hi_text == "*" else int(hi_text)
        if lo == 0 or hi == 0:
            raise ParseError("Sequence numbers and UIDs start at 1")
        out.append((lo, hi))
    return out


def resolve_seqset(seqset: SeqSet, largest: int) -> list[tuple[int, int]]:
    """Concrete inclusive ranges, ``*`` being ``largest`` (0 for an empty mailbox)."""
    out = []
    for lo, hi in seqset:
        a = largest if lo is None else lo
        b = largest if hi is None else hi
        if a > b:
            a, b = b, a
        out.append((a, b))
    return out


SYSTEM_FLAGS = {f.lower(): f for f in
                ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "\\Recent")}
_KEYWORD_RE = re.compile(r"^[^\x00-\x20(){%*\"\\\]\x7f]+$")


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
    tz = timezone(sign * timedelta(hours=int(m.group(8)), minutes=int(m.group(9))))
    try:
        return datetime(int(m.group(3)), _MONTHS.index(m.group(2).lower()) + 1,
                        int(m.group(1)), int(m.group(4)), int(m.group(5)), int(m.group(6)),
                        tzinfo=tz).astimezone(UTC)
    except ValueError as exc:
        raise ParseError(f"Bad date-time {text}") from exc


# --------------------------------------------------------------------------- FETCH


@dataclass(frozen=True)
class FetchItem:
    """One FETCH attribute. ``section`` is set for BODY[...]/BODY.PEEK[...]."""

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
_BODY_RE = re.compile(r"^(BODY|BODY\.PEEK)\[(.*)\](?:<(\d+)\.(\d+)>)?$", re.IGNORECASE | re.DOTALL)


def _fetch_item(token: Token) -> FetchItem:
    if not isinstance(token, Atom):
        raise ParseError("Bad FETCH attribute")
    upper = token.upper()
    if upper in _SIMPLE_ITEMS:
        return FetchItem(upper)
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


def parse_fetch_items(token: Token) -> list[FetchItem]:
    """A FETCH attribute, a parenthesised list of them, or a macro."""
    if isinstance(token, Atom) and token.upper() in _MACROS:
        return [FetchItem(n) for n in _MACROS[token.upper()]]
    tokens = token if isinstance(token, list) else [token]
    if not tokens:
        raise ParseError("Empty FETCH attribute list")
    return [_fetch_item(t) for t in tokens]


# --------------------------------------------------------------------------- SEARCH


_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
    "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
    "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
    "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
    "SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = {"FROM": "from", "TO": "to", "CC": "cc", "BCC": "bcc", "SUBJECT": "subject"}
_DATE_KEYS = {"BEFORE": "before", "ON": "on", "SINCE": "since", "SENTBEFORE": "sentbefore",
              "SENTON": "senton", "SENTSINCE": "sentsince"}


def parse_search(args: list[Token]) -> tuple[str | None, tuple[Any, ...]]:
    """(charset, key tree). Sequence sets become ``("seq", SeqSet)``, UID sets
    ``("uidset", SeqSet)``, RECENT ``("recent",)``: the server resolves those."""
    charset = None
    args = list(args)
    if args and isinstance(args[0], Atom) and args[0].upper() == "CHARSET":
        if len(args) < 2:
            raise ParseError("CHARSET needs a value")
        charset = astring(args[1]).upper()
        args = args[2:]
    if not args:
        raise ParseError("Missing search criteria")
    keys: list[tuple[Any, ...]] = []
    pos = 0
    while pos < len(args):
        key, pos = _search_key(args, pos)
        keys.append(key)
    return charset, keys[0] if len(keys) == 1 else ("and", keys)


def _search_key(args: list[Token], pos: int) -> tuple[tuple[Any, ...], int]:
    tok = args[pos]

    def arg(i: int = 1) -> Token:
        if pos + i >= len(args):
            raise ParseError(f"Search key {tok!s} needs an argument")
        return args[pos + i]

    if isinstance(tok, list):
        if not tok:
            raise ParseError("Empty search key list")
        inner: list[tuple[Any, ...]] = []
        i = 0
        while i < len(tok):
            key, i = _search_key(tok, i)
            inner.append(key)
        return (inner[0] if len(inner) == 1 else ("and", inner)), pos + 1
    if not isinstance(tok, Atom):
        raise ParseError("Bad search key")
    name = tok.upper()
    if name == "ALL":
        return ("all",), pos + 1
    if name in _FLAG_KEYS:
        flag, value = _FLAG_KEYS[name]
        return ("flag", flag, value), pos + 1
    if name in ("KEYWORD", "UNKEYWORD"):
        kw = astring(arg())
        return ("keyword", kw, name == "KEYWORD"), pos + 2
    if name in _HEADER_KEYS:
        return ("header", _HEADER_KEYS[name], astring(arg())), pos + 2
    if name == "HEADER":
        field = astring(arg()).lower()
        return ("header", field, astring(arg(2))), pos + 3
    if name in ("BODY", "TEXT"):
        return (name.lower(), astring(arg())), pos + 2
    if name in _DATE_KEYS:
        return (_DATE_KEYS[name], parse_date(arg())), pos + 2
    if name in ("LARGER", "SMALLER"):
        return (name.lower(), number(arg(), name)), pos + 2
    if name == "NOT":
        key, nxt = _search_key(args, pos + 1) if pos + 1 < len(args) else (None, 0)
        if key is None:
            raise ParseError("NOT needs a search key")
        return ("not", key), nxt
    if name == "OR":
        if pos + 1 >= len(args):
            raise ParseError("OR needs two search keys")
        k1, nxt = _search_key(args, pos + 1)
        if nxt >= len(args):
            raise ParseError("OR needs two search keys")
        k2, nxt = _search_key(args, nxt)
        return ("or", k1, k2), nxt
    if name == "UID":
        return ("uidset", parse_seqset(arg())), pos + 2
    if name == "RECENT":
        return ("recent",), pos + 1
    if name == "OLD":
        return ("not", ("recent",)), pos + 1
    if name == "NEW":
        return ("and", [("recent",), ("flag", "\\Seen", False)]), pos + 1
    if name == "MODSEQ":
        # MODSEQ [entry-name entry-type-req] mod-sequence-valzer (RFC 7162)
        if pos + 3 < len(args) and isinstance(arg(1), QuotedString):
            return ("modseq", number(arg(3), "MODSEQ")), pos + 4
        return ("modseq", number(arg(), "MODSEQ")), pos + 2
    if _SEQ_RE.match(name.split(",")[0]):
        return ("seq", parse_seqset(tok)), pos + 1
    raise ParseError(f"Unknown search key {tok!s}")
