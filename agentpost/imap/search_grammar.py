"""The SEARCH (and SORT/THREAD criteria) grammar of RFC 3501 §6.4.4 and its
extensions (RFC 4731, RFC 5182 ``$``, RFC 7162 MODSEQ): tokens in, a key tree out.

Bounded before it recurses: at most MAX_SEARCH_KEYS keys and MAX_SEARCH_DEPTH levels,
so hostile nesting is a BAD, never a RecursionError.
"""

from __future__ import annotations

from typing import Any

from agentpost.imap.parser import (
    SEQ_RANGE_RE,
    Atom,
    ParseError,
    QuotedString,
    SavedResult,
    Token,
    astring,
    number,
    parse_date,
    parse_seqset,
)

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


#: Search keys in one SEARCH or SORT (OR and NOT count as keys).
MAX_SEARCH_KEYS = 1000
#: Levels of parentheses, NOT and OR inside each other in one SEARCH or SORT. The key
#: tree is walked recursively here, by the server and by the SQL translation.
MAX_SEARCH_DEPTH = 64


class _SearchBudget:
    """Counts the keys of one SEARCH as they are parsed, refusing too many or too deep
    before the recursion can get anywhere near Python's limit."""

    def __init__(self) -> None:
        self.keys = 0

    def take(self, depth: int) -> None:
        self.keys += 1
        if self.keys > MAX_SEARCH_KEYS:
            raise ParseError(f"Too many search keys (at most {MAX_SEARCH_KEYS})")
        if depth > MAX_SEARCH_DEPTH:
            raise ParseError(
                f"Search keys nested too deeply (at most {MAX_SEARCH_DEPTH} levels)")


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
    budget = _SearchBudget()
    pos = 0
    while pos < len(args):
        key, pos = _search_key(args, pos, budget, 1)
        keys.append(key)
    return charset, keys[0] if len(keys) == 1 else ("and", keys)


def _search_key(args: list[Token], pos: int, budget: _SearchBudget,
                depth: int) -> tuple[tuple[Any, ...], int]:
    budget.take(depth)
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
            key, i = _search_key(tok, i, budget, depth + 1)
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
        if pos + 1 >= len(args):
            raise ParseError("NOT needs a search key")
        key, nxt = _search_key(args, pos + 1, budget, depth + 1)
        return ("not", key), nxt
    if name == "OR":
        if pos + 1 >= len(args):
            raise ParseError("OR needs two search keys")
        k1, nxt = _search_key(args, pos + 1, budget, depth + 1)
        if nxt >= len(args):
            raise ParseError("OR needs two search keys")
        k2, nxt = _search_key(args, nxt, budget, depth + 1)
        return ("or", k1, k2), nxt
    if name == "UID":
        return ("uidset", parse_seqset(arg(), saved=True)), pos + 2
    if name == "$":  # the saved result (RFC 5182 §2.1)
        return ("seq", SavedResult()), pos + 1
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
    if SEQ_RANGE_RE.match(name.split(",")[0]):
        return ("seq", parse_seqset(tok)), pos + 1
    raise ParseError(f"Unknown search key {tok!s}")
