"""IMAP renderings of a raw message: ENVELOPE, BODYSTRUCTURE/BODY and BODY[section].

Pure functions of the message bytes (RFC 3501 §7.4.2). The MIME tree is located on
the raw bytes by this module (header/body split, multipart delimiters, encapsulated
``message/rfc822``), so every section is a byte-exact slice of the stored message;
the stdlib ``email`` package is used only to parse addresses. Parameters are sent as
they are in the header (RFC 2047 and RFC 2231 forms stay encoded, as Dovecot sends
them). Nothing here raises on malformed input: a message that cannot be understood
is rendered as a single ``text/plain`` part.

Strings are rendered as IMAP quoted strings when they are 7-bit printable text
(``"`` and ``\\`` escaped) and as literals ``{n}\\r\\n...`` otherwise (8-bit/UTF-8,
CR, LF, NUL and other controls). Literal lengths count UTF-8 octets, so the ``str``
results must be sent UTF-8 encoded.
"""

from __future__ import annotations

import email.utils
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SectionSpec", "bodystructure", "envelope", "parse_section", "quote",
           "section"]

#: Deeper MIME nesting than this is rendered as an opaque leaf.
MAX_DEPTH = 40
#: More parts than this in one multipart: the rest is left in the last part.
MAX_PARTS = 1000


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
    i = 0
    while i < len(rfc2231):
        group = [p for p in rfc2231[i:] if p.name == rfc2231[i].name]
        i += len(group)
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
                  default_type: tuple[str, str] = ("text", "plain")) -> _Entity:
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
    if depth >= MAX_DEPTH:
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
            ent.children.append(_parse_entity(raw, cstart, cend, depth + 1, child_default))
        if not ent.children:  # no delimiter at all: one empty text part, as Dovecot does
            ent.children.append(_Entity(bstart, bstart, bstart, []))
    elif (ent.maintype, ent.subtype) == ("message", "rfc822"):
        cte = (_field_value(raw, ent, "content-transfer-encoding") or "7bit").lower()
        if cte in ("7bit", "8bit", "binary"):
            ent.message = _parse_entity(raw, bstart, end, depth + 1)
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


# --------------------------------------------------------------------------- ENVELOPE


def _split_addresses(value: str) -> list[tuple[str | None, list[str]]]:
    """Top-level items of an address list: (group name or None, [address texts])."""
    items: list[tuple[str | None, list[str]]] = []
    depth_paren = 0
    in_quote = in_angle = False
    buf: list[str] = []
    group: tuple[str, list[str]] | None = None
    i = 0

    def flush() -> None:
        text = "".join(buf).strip()
        buf.clear()
        if text:
            if group is not None:
                group[1].append(text)
            else:
                items.append((None, [text]))

    while i < len(value):
        ch = value[i]
        if in_quote:
            buf.append(ch)
            if ch == "\\" and i + 1 < len(value):
                buf.append(value[i + 1])
                i += 1
            elif ch == '"':
                in_quote = False
        elif depth_paren:
            buf.append(ch)
            if ch == "\\" and i + 1 < len(value):
                buf.append(value[i + 1])
                i += 1
            elif ch == "(":
                depth_paren += 1
            elif ch == ")":
                depth_paren -= 1
        elif ch == '"':
            in_quote = True
            buf.append(ch)
        elif ch == "(":
            depth_paren = 1
            buf.append(ch)
        elif ch == "<":
            in_angle = True
            buf.append(ch)
        elif ch == ">":
            in_angle = False
            buf.append(ch)
        elif ch == "," and not in_angle:
            flush()
        elif ch == ":" and not in_angle and group is None:
            name = "".join(buf).strip()
            buf.clear()
            group = (name, [])
        elif ch == ";" and group is not None and not in_angle:
            flush()
            items.append(group)
            group = None
        else:
            buf.append(ch)
        i += 1
    flush()
    if group is not None:
        items.append(group)
    return items


def _take_route(text: str) -> tuple[str, str | None]:
    """``text`` without the source route of its angle address, and that route.

    ``Name <@r1, @r2:user@host>`` gives ``("Name <user@host>", "@r1,@r2")`` (the route
    written as Dovecot does: no white space, one comma between domains); an address
    without a route comes back unchanged with ``None``.
    """
    in_quote = escaped = False
    depth = 0
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and (in_quote or depth):
            escaped = True
        elif in_quote:
            in_quote = ch != '"'
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif depth:
            continue
        elif ch == '"':
            in_quote = True
        elif ch == "<":
            inner_start = i + 1
            close = text.find(">", inner_start)
            inner = text[inner_start:close if close >= 0 else len(text)]
            colon = inner.find(":")
            if not inner.lstrip().startswith("@") or colon < 0:
                return text, None
            domains = [d.strip() for d in inner[:colon].split(",")]
            route = ",".join("".join(d.split()) for d in domains if d.strip("@ \t"))
            rest = text[:inner_start] + inner[colon + 1:].lstrip() + text[inner_start + len(inner):]
            return rest, route or None
    return text, None


def _address(text: str) -> str | None:
    text, route = _take_route(text)
    try:
        name, addr = email.utils.parseaddr(text)
    except Exception:
        name, addr = "", text
    if not addr and not name:
        return None
    if "@" in addr:
        mailbox, host = addr.rsplit("@", 1)
        host_s = quote(host)
    else:
        mailbox, host_s = addr, "NIL"
    return f"({quote(name or None)} {quote(route)} {quote(mailbox)} {host_s})"


def _address_list(value: str | None) -> str:
    if value is None:
        return "NIL"
    if len(value) <= CACHED_FIELD_CHARS:
        return _cached_address_list(value)
    return _render_address_list(value)


#: Address fields up to this many characters are rendered once per process (an LRU
#: cache): the same From and To values come back message after message (issue 12).
CACHED_FIELD_CHARS = 1024


@functools.lru_cache(maxsize=4096)
def _cached_address_list(value: str) -> str:
    return _render_address_list(value)


def _render_address_list(value: str) -> str:
    out: list[str] = []
    for group, addresses in _split_addresses(value):
        if group is not None:
            out.append(f"(NIL NIL {quote(group)} NIL)")
        for text in addresses:
            rendered = _address(text)
            if rendered is not None:
                out.append(rendered)
        if group is not None:
            out.append("(NIL NIL NIL NIL)")
    return "(" + "".join(out) + ")" if out else "NIL"


def _envelope(raw: bytes, ent: _Entity) -> str:
    def get(name: str) -> str | None:
        return _field_value(raw, ent, name)

    sender_from = get("from")
    sender = get("sender") or sender_from
    reply_to = get("reply-to") or sender_from
    return "({} {} {} {} {} {} {} {} {} {})".format(
        quote(get("date")), quote(get("subject")),
        _address_list(sender_from), _address_list(sender), _address_list(reply_to),
        _address_list(get("to")), _address_list(get("cc")), _address_list(get("bcc")),
        quote(get("in-reply-to")), quote(get("message-id")),
    )


def envelope(raw: bytes, tree: MimeEntity | None = None) -> str:
    """The ENVELOPE of a raw message (header values as sent, unfolded)."""
    try:
        return _envelope(raw, tree or _parse(raw))
    except Exception:  # pragma: no cover
        return "(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


# --------------------------------------------------------------------------- BODYSTRUCTURE


def _param_list(params: list[tuple[str, str]]) -> str:
    if not params:
        return "NIL"
    return "(" + " ".join(f"{quote(k)} {quote(v)}" for k, v in params) + ")"


def _lines(raw: bytes, start: int, end: int) -> int:
    count = raw.count(b"\n", start, end)
    if end > start and raw[end - 1:end] != b"\n":
        count += 1
    return count


def _disposition(raw: bytes, ent: _Entity) -> str:
    value = _field_value(raw, ent, "content-disposition")
    if not value:
        return "NIL"
    main, params = _content_params(value)
    if not main:
        return "NIL"
    return f"({quote(main)} {_param_list(params)})"


def _language(raw: bytes, ent: _Entity) -> str:
    value = _field_value(raw, ent, "content-language")
    if not value:
        return "NIL"
    tags = [t.strip() for t in value.split(",") if t.strip()]
    if len(tags) == 1:
        return quote(tags[0])
    return "(" + " ".join(quote(t) for t in tags) + ")" if tags else "NIL"


def _structure(raw: bytes, ent: _Entity, extensible: bool) -> str:
    tail = ""
    if ent.is_multipart:
        inner = "".join(_structure(raw, child, extensible) for child in ent.children)
        if extensible:
            tail = " {} {} {} {}".format(
                _param_list([(k, v) for k, v in ent.params]), _disposition(raw, ent),
                _language(raw, ent), quote(_field_value(raw, ent, "content-location")))
        return f"({inner} {quote(ent.subtype)}{tail})"
    params = ent.params
    if ent.maintype == "text" and not any(k == "charset" for k, _ in params):
        params = [("charset", "us-ascii"), *params]
    cte = (_field_value(raw, ent, "content-transfer-encoding") or "7bit").lower()
    parts = [quote(ent.maintype), quote(ent.subtype), _param_list(params),
             quote(_field_value(raw, ent, "content-id")),
             quote(_field_value(raw, ent, "content-description")),
             quote(cte), str(ent.end - ent.bstart)]
    if ent.message is not None:
        parts += [_envelope(raw, ent.message), _structure(raw, ent.message, extensible),
                  str(_lines(raw, ent.bstart, ent.end))]
    elif ent.maintype == "text":
        parts.append(str(_lines(raw, ent.bstart, ent.end)))
    if extensible:
        parts += [quote(_field_value(raw, ent, "content-md5")), _disposition(raw, ent),
                  _language(raw, ent), quote(_field_value(raw, ent, "content-location"))]
    return "(" + " ".join(parts) + ")"


def bodystructure(raw: bytes, extensible: bool = True, tree: MimeEntity | None = None) -> str:
    """BODYSTRUCTURE (``extensible=True``) or BODY (``False``) of a raw message."""
    try:
        return _structure(raw, tree or _parse(raw), extensible)
    except Exception:  # pragma: no cover
        return ('("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" '
                f"{len(raw)} {_lines(raw, 0, len(raw))})")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SectionSpec:
    """A parsed ``BODY[...]<o.n>`` section: part path, text spec, field names, partial."""

    part: tuple[int, ...] = ()
    text: str = ""  # "", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"
    fields: tuple[str, ...] = ()
    partial: tuple[int, int] | None = None  # (origin, count)

    def render(self) -> str:
        """The section as echoed in a FETCH response, e.g. ``1.HEADER.FIELDS (SUBJECT)``."""
        bits = [str(n) for n in self.part]
        if self.text:
            bits.append(self.text)
        out = ".".join(bits)
        if self.text.startswith("HEADER.FIELDS"):
            out += " (" + " ".join(self.fields) + ")"
        return out


# Possessive part numbers: with plain ``\d+(?:\.\d+)*`` a long run of digits and dots that
# does not match made the engine try every split (quadratic: half a second for a
# 256 KiB FETCH line).
_SECTION_RE = re.compile(
    r"^(?P<part>\d++(?:\.\d++)*+)?\.?(?P<text>HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME)?"
    r"(?:\s*\((?P<fields>[^)]*)\))?$", re.IGNORECASE)


def parse_section(text: str) -> SectionSpec:
    """Parse the inside of ``BODY[...]`` (without partial). ValueError when malformed."""
    text = text.strip()
    m = _SECTION_RE.match(text)
    if m is None:
        raise ValueError(f"bad section {text!r}")
    part = tuple(int(p) for p in m.group("part").split(".")) if m.group("part") else ()
    spec = (m.group("text") or "").upper()
    if m.group("part") and not spec and text != m.group("part"):
        raise ValueError(f"bad section {text!r}")
    if any(n == 0 for n in part):
        raise ValueError("section part numbers start at 1")
    if spec == "MIME" and not part:
        raise ValueError("MIME needs a part number")
    fields: tuple[str, ...] = ()
    if spec.startswith("HEADER.FIELDS"):
        if m.group("fields") is None:
            raise ValueError("HEADER.FIELDS needs a field list")
        fields = tuple(f.strip('"').upper() for f in m.group("fields").split() if f)
        if not fields:
            raise ValueError("empty header field list")
    elif m.group("fields") is not None:
        raise ValueError(f"bad section {text!r}")
    return SectionSpec(part, spec, fields)


def _subparts(ent: _Entity) -> list[_Entity]:
    return ent.children if ent.is_multipart else [ent]


def _locate(root: _Entity, path: tuple[int, ...]) -> _Entity | None:
    current = root
    for depth, number in enumerate(path):
        if depth > 0 and current.message is not None:
            container = _subparts(current.message)
        elif depth > 0 and not current.is_multipart:
            return None
        else:
            container = _subparts(current)
        if number < 1 or number > len(container):
            return None
        current = container[number - 1]
    return current


def section(raw: bytes, spec: SectionSpec | str) -> bytes:
    """The exact bytes of ``BODY[spec]`` (with its partial range, if any).

    A part that does not exist gives ``b""`` (the server answers an empty string).
    """
    if isinstance(spec, str):
        spec = parse_section(spec)
    try:
        plan = _plan(_parse(raw), spec)
    except Exception:  # pragma: no cover
        return b""
    data = raw[plan.start:plan.end]
    if plan.fields is not None:
        data = filter_header_fields(data, *plan.fields)
    if spec.partial is not None:
        origin, count = spec.partial
        data = data[origin:origin + count]
    return data


# --------------------------------------------------------------------------- section maps
#
# Why: a FETCH of BODY[1.2] or BODY[]<0.1000> on a 40 MB message must not load the
# message. At ingest we record where every MIME entity's header and body start and end
# (a few dozen bytes per part); at FETCH time any section is then a byte range of the
# stored blob (HEADER.FIELDS: a filtered header range), read and sent in chunks.


def section_map(raw: bytes, tree: MimeEntity | None = None) -> str:
    """The MIME entity offsets of ``raw`` as compact JSON (stored next to the message)."""
    def encode(ent: _Entity) -> list[Any]:
        if ent.is_multipart:
            return [ent.hstart, ent.bstart, ent.end, "m", [encode(c) for c in ent.children]]
        if ent.message is not None:
            return [ent.hstart, ent.bstart, ent.end, "r", [encode(ent.message)]]
        return [ent.hstart, ent.bstart, ent.end]

    return json.dumps(encode(tree or _parse(raw)), separators=(",", ":"))


def _decode_map(data: str) -> _Entity:
    def decode(node: list[Any]) -> _Entity:
        ent = _Entity(int(node[0]), int(node[1]), int(node[2]), [])
        kind = node[3] if len(node) > 3 else ""
        if kind == "m":
            ent.maintype, ent.subtype = "multipart", "mixed"
            ent.children = [decode(c) for c in node[4]]
        elif kind == "r":
            ent.maintype, ent.subtype = "message", "rfc822"
            ent.message = decode(node[4][0])
        return ent

    return decode(json.loads(data))


@dataclass(frozen=True)
class SectionPlan:
    """Where ``BODY[section]`` lives in the raw message: ``raw[start:end]``, filtered by
    ``fields`` = (names, keep) for HEADER.FIELDS[.NOT]; the partial range is not applied."""

    start: int
    end: int
    fields: tuple[tuple[str, ...], bool] | None = None

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_section(sections: str, spec: SectionSpec) -> SectionPlan:
    """The :class:`SectionPlan` of ``spec`` from a :func:`section_map` (ValueError if the
    map is unreadable: the caller then falls back to the raw bytes)."""
    try:
        root = _decode_map(sections)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise ValueError("unreadable section map") from exc
    return _plan(root, spec)


@dataclass(frozen=True)
class PartLocation:
    """The entity ``BINARY[part]`` addresses: header ``[hstart, bstart)``, body
    ``[bstart, end)`` (RFC 3516 decodes the body with the header's CTE)."""

    hstart: int
    bstart: int
    end: int
    multipart: bool


def _root(source: bytes | str) -> _Entity:
    """The entity tree of the raw message (bytes) or of its section map (str)."""
    if isinstance(source, str):
        try:
            return _decode_map(source)
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise ValueError("unreadable section map") from exc
    return _parse(source)


def locate_part(source: bytes | str, part: tuple[int, ...]) -> PartLocation | None:
    """The entity ``part`` addresses, as BODY[part] finds it, from the raw message
    (bytes) or its :func:`section_map` (str); None when there is no such part.
    ValueError for an unreadable map (the caller then falls back to the raw bytes)."""
    ent = _locate(_root(source), part)
    if ent is None:
        return None
    return PartLocation(ent.hstart, ent.bstart, ent.end, ent.is_multipart)


def locate_message(source: bytes | str, part: tuple[int, ...]) -> PartLocation | None:
    """The message ``BODY[part.TEXT]`` and ``BODY[part.HEADER]`` address, as
    :func:`locate_part` finds entities: the whole message for ``()``, else the message
    a message/rfc822 part encapsulates; None when ``part`` names no message."""
    root = _root(source)
    ent = _locate(root, part) if part else root
    if ent is not None and part:
        ent = ent.message
    if ent is None:
        return None
    return PartLocation(ent.hstart, ent.bstart, ent.end, ent.is_multipart)


def header_value(header: bytes, name: str) -> str | None:
    """The first field ``name`` (lower case) of one entity's header bytes, unfolded."""
    fields, _ = _split_header(header, 0, len(header))
    return _field_value(header, _Entity(0, 0, len(header), fields), name)


def filter_header_fields(header: bytes, names: tuple[str, ...], keep: bool) -> bytes:
    """HEADER.FIELDS (``keep``) or HEADER.FIELDS.NOT of one entity's header bytes."""
    fields, _ = _split_header(header, 0, len(header))
    wanted = {n.lower() for n in names}
    out = [header[fstart:fend] for fname, fstart, fend in fields
           if (fname in wanted) == keep and fname]
    return b"".join(out) + b"\r\n"


def _plan(root: _Entity, spec: SectionSpec) -> SectionPlan:
    empty = SectionPlan(0, 0)
    if not spec.part and not spec.text:
        return SectionPlan(root.hstart, root.end)
    ent: _Entity | None = root
    if spec.part:
        ent = _locate(root, spec.part)
        if ent is None:
            return empty
        if not spec.text:
            return SectionPlan(ent.bstart, ent.end)
        if spec.text == "MIME":
            return SectionPlan(ent.hstart, ent.bstart)
        # HEADER/TEXT of a part address its encapsulated message.
        if ent.message is not None:
            ent = ent.message
        elif ent is not root:
            return empty
    assert ent is not None
    if spec.text == "HEADER":
        return SectionPlan(ent.hstart, ent.bstart)
    if spec.text == "TEXT":
        return SectionPlan(ent.bstart, ent.end)
    if spec.text == "HEADER.FIELDS":
        return SectionPlan(ent.hstart, ent.bstart, (spec.fields, True))
    if spec.text == "HEADER.FIELDS.NOT":
        return SectionPlan(ent.hstart, ent.bstart, (spec.fields, False))
    return empty
