"""The MIME tree of a raw message, located on its bytes (for the IMAP renderings).

Split from :mod:`agentpost.mail.imapformat`: header/body split, parameters (RFC 2045 and
RFC 2231), multipart delimiters and encapsulated ``message/rfc822``, so that every
section is a byte-exact slice of the stored message; plus the IMAP string quoting the
renderings share. Nothing here raises on malformed input.
"""

from __future__ import annotations

import email.utils
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

#: Deeper MIME nesting than this is rendered as an opaque leaf.
MAX_DEPTH = 40
#: More parts than this in one multipart: the rest is left in the last part.
MAX_PARTS = 1000
#: Entities in one message, all levels together (Dovecot's max_total_mime_parts): past
#: it, multiparts and message/rfc822 are opaque leaves. Without it, 1 MB of nested
#: ``--b`` lines (250 multiparts of 1000 empty digest parts) rendered 93 MB of
#: BODYSTRUCTURE, BODY and section map in 6.6 s, and a 50 MB message, gigabytes.
MAX_ENTITIES = 10_000


# --------------------------------------------------------------------------- strings


_SAFE_QUOTED = re.compile(r"^[\x20-\x7e]*\Z")


def compact_numbers(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> "1:3,5": an IMAP sequence set (RFC 3501 §9), ascending, merged."""
    return compact_in_order(sorted(set(numbers)))


def compact_in_order(numbers: list[int]) -> str:
    """Runs of consecutive numbers as ranges, in the given order (COPYUID pairs its two
    sets position by position, so they must not be sorted)."""
    out: list[str] = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}:{numbers[j]}")
        i = j + 1
    return ",".join(out)


def quote(value: str | None) -> str:
    """An IMAP nstring: NIL, a quoted string, or a literal for anything not 7-bit text."""
    if value is None:
        return "NIL"
    if _SAFE_QUOTED.match(value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if "\x00" in value:  # a literal may not hold NUL (RFC 3501 CHAR8): U+FFFD, as Dovecot
        value = value.replace("\x00", "\ufffd")
    data = value.encode("utf-8", "replace")
    return f"{{{len(data)}}}\r\n{value}"


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


# --------------------------------------------------------------------------- MIME tree


@dataclass
class _Entity:
    """One MIME entity located on the raw bytes: header [hstart, bstart), body [bstart, end)."""

    hstart: int
    bstart: int
    end: int
    fields: list[tuple[str, int, int]]  # (lowercased name, field start, field end) raw
    maintype: str = "text"
    subtype: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=list)
    children: list[_Entity] = field(default_factory=list)  # multipart
    message: _Entity | None = None  # encapsulated message/rfc822
    #: Lines of the body, once counted: BODY and BODYSTRUCTURE both give it, and at
    #: 100 KiB each count is a 50 us pass over the body (imapformat._body_lines).
    body_lines: int | None = field(default=None, compare=False, repr=False)

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "multipart"


def _split_header(raw: bytes, start: int, end: int) -> tuple[list[tuple[str, int, int]], int]:
    """Header fields of the entity at [start, end) and where its body starts."""
    fields: list[tuple[str, int, int]] = []
    pos = start
    current: list[Any] | None = None  # [name, start, end]
    while pos < end:
        nl = raw.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        line = raw[pos:line_end]
        if line in (b"\r\n", b"\n", b"\r"):
            if current is not None:
                fields.append((current[0], current[1], current[2]))
            return fields, line_end
        if line[:1] in (b" ", b"\t") and current is not None:
            current[2] = line_end
        else:
            if current is not None:
                fields.append((current[0], current[1], current[2]))
            colon = line.find(b":")
            name = _decode(line[:colon]).strip().lower() if colon > 0 else ""
            current = [name, pos, line_end]
        pos = line_end
    if current is not None:
        fields.append((current[0], current[1], current[2]))
    return fields, end  # no blank line: all header, empty body


def _field_value(raw: bytes, ent: _Entity, name: str) -> str | None:
    """The first field ``name`` of ``ent``, unfolded, leading/trailing space stripped."""
    for fname, fstart, fend in ent.fields:
        if fname == name:
            text = raw[fstart:fend]
            value = text[text.find(b":") + 1:]
            if b"\n " in value or b"\n\t" in value:  # folded (most fields are not)
                value = _UNFOLD_RE.sub(b"", value)
            return _decode(value.rstrip(b"\r\n")).strip()
    return None


_UNFOLD_RE = re.compile(rb"\r?\n(?=[ \t])")


def _split_params(value: str) -> list[str]:
    """``value`` cut at each ``;`` outside a quoted string (one linear pass)."""
    pieces: list[str] = []
    start = 0
    in_quote = escaped = False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif in_quote and ch == "\\":
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ";" and not in_quote:
            pieces.append(value[start:i])
            start = i + 1
    pieces.append(value[start:])
    return pieces


@dataclass
class _Rfc2231Piece:
    name: str
    index: int
    extended: bool
    value: str


def _content_params(value: str) -> tuple[str, list[tuple[str, str]]]:
    """(lowercased main value, [(name, value)]) of a Content-Type/-Disposition value.

    Parameters are given as they are in the header, never decoded (as Dovecot does;
    decoded values would be 8-bit, which IMAP only allows after ENABLE UTF8=ACCEPT):
    RFC 2047 encoded words stay encoded, and RFC 2231 parameters keep their encoded
    form. Like Dovecot's ``rfc2231_parse``, RFC 2231 continuations are joined into one
    parameter after the plain ones: ``name*0*=utf-8''%D0; name*1*=%9E`` becomes
    ``"name*" "utf-8''%D0%9E"`` and ``name*0=a; name*1=b`` becomes ``"name" "ab"``
    (an unencoded piece among encoded ones gets its ``%`` escaped); pieces with a
    missing index are passed on one by one under their own names.
    """
    pieces = _split_params(value)
    main = pieces[0].split("=", 1)[0].strip().lower()
    plain: list[tuple[str, str]] = []
    rfc2231: list[_Rfc2231Piece] = []
    for piece in pieces[1:]:
        piece = piece.strip()
        if not piece:
            continue
        name, _, text = piece.partition("=")
        name = name.strip().lower()
        text = email.utils.unquote(text.strip())
        star = name.find("*")
        if star > 0:
            rest = name[star + 1:]
            digits = len(rest) - len(rest.lstrip("0123456789"))
            index = int(rest[:digits]) if digits else 0
            flag = rest[digits:]
            if flag in ("", "*"):
                rfc2231.append(_Rfc2231Piece(name[:star], index,
                                             flag == "*" or not rest, text))
                continue
        plain.append((name, text))
    rfc2231.sort(key=lambda p: (p.name, p.index))
    merged: list[tuple[str, str]] = []
    # One pass over the sorted pieces (a scan of the rest per name was quadratic: 20,000
    # distinct ``p<i>*=x`` parameters, 200 KB of header, took 6 s of CPU).
    for _, pieces_of in itertools.groupby(rfc2231, key=lambda p: p.name):
        group = list(pieces_of)
        if any(p.index != n for n, p in enumerate(group)):  # missing index: as they are
            merged += [(f"{p.name}*{p.index}{'*' if p.extended else ''}", p.value)
                       for p in group]
            continue
        extended = any(p.extended for p in group)
        text = "''" if extended and not group[0].extended else ""
        for p in group:
            text += p.value.replace("%", "%25") if extended and not p.extended else p.value
        merged.append((group[0].name + ("*" if extended else ""), text))
    return main, plain + merged


def _parse_entity(raw: bytes, start: int, end: int, depth: int,
                  default_type: tuple[str, str] = ("text", "plain"),
                  budget: list[int] | None = None) -> _Entity:
    """The entity at [start, end); ``budget``: [entities still allowed in the message]."""
    if budget is None:
        budget = [MAX_ENTITIES]
    budget[0] -= 1
    fields, bstart = _split_header(raw, start, end)
    ent = _Entity(start, bstart, end, fields, default_type[0], default_type[1])
    ctype = _field_value(raw, ent, "content-type")
    if ctype is not None:
        main, params = _content_params(ctype)
        if main.count("/") == 1 and all(main.split("/")):
            ent.maintype, ent.subtype = (p.strip() for p in main.split("/"))
            ent.params = params
        else:
            ent.maintype, ent.subtype, ent.params = "text", "plain", []
    if depth >= MAX_DEPTH or budget[0] <= 0:
        if ent.is_multipart or (ent.maintype, ent.subtype) == ("message", "rfc822"):
            ent.maintype, ent.subtype = "application", "octet-stream"
        return ent
    if ent.is_multipart:
        boundary = dict(ent.params).get("boundary")
        if not boundary:
            ent.maintype, ent.subtype, ent.params = "text", "plain", []
            return ent
        child_default = ("message", "rfc822") if ent.subtype == "digest" else ("text", "plain")
        for cstart, cend in _split_multipart(raw, bstart, end, boundary.encode("utf-8",
                                                                                "replace")):
            if budget[0] <= 0:
                break
            ent.children.append(_parse_entity(raw, cstart, cend, depth + 1, child_default,
                                              budget))
        if not ent.children:  # no delimiter at all: one empty text part, as Dovecot does
            ent.children.append(_Entity(bstart, bstart, bstart, []))
    elif (ent.maintype, ent.subtype) == ("message", "rfc822"):
        cte = (_field_value(raw, ent, "content-transfer-encoding") or "7bit").lower()
        if cte in ("7bit", "8bit", "binary"):
            ent.message = _parse_entity(raw, bstart, end, depth + 1, budget=budget)
    return ent


def _split_multipart(raw: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """[start, end) of each body part between the ``--boundary`` delimiter lines."""
    delim = b"--" + boundary
    # Only delimiters at a line start are looked for: finding every "--boundary" and
    # skipping those inside a line took one loop turn each (16 KiB of "x--b" was 0.8 ms
    # on the reactor; issue 12).
    line_delim = b"\n" + delim
    parts: list[tuple[int, int]] = []
    part_start: int | None = None
    pos = start
    while True:
        if pos == start and raw.startswith(delim, start, end):
            hit = start
        else:
            hit = raw.find(line_delim, max(pos - 1, start), end)
            if hit < 0:
                break
            hit += 1
        pos = hit + len(delim)
        nl = raw.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        rest = raw[pos:line_end].rstrip(b" \t\r\n")
        if rest not in (b"", b"--"):
            continue
        if part_start is not None:
            content_end = hit
            if raw[hit - 2:hit] == b"\r\n" and hit - 2 >= part_start:
                content_end = hit - 2
            elif raw[hit - 1:hit] == b"\n" and hit - 1 >= part_start:
                content_end = hit - 1
            parts.append((part_start, content_end))
            if len(parts) >= MAX_PARTS:
                return parts
        if rest == b"--":
            return parts
        part_start = line_end
        pos = line_end
    if part_start is not None:
        parts.append((part_start, end))  # no closing delimiter: the last part runs to the end
    return parts


def _parse(raw: bytes) -> _Entity:
    try:
        return _parse_entity(raw, 0, len(raw), 0)
    except Exception:  # pragma: no cover - belt and braces: never fail a FETCH
        return _Entity(0, 0, len(raw), [])


#: A message's MIME tree located on its raw bytes (see :func:`parse_tree`).
MimeEntity = _Entity


def parse_tree(raw: bytes) -> MimeEntity:
    """Locate every MIME entity of ``raw`` once; pass the result as ``tree=`` to the
    renderers below (ingest renders ENVELOPE, BODYSTRUCTURE, BODY and the section map
    of each message from one walk)."""
    return _parse(raw)
