"""IMAP renderings of a raw message: ENVELOPE, BODYSTRUCTURE/BODY and BODY[section].

Pure functions of the message bytes (RFC 3501 §7.4.2). The MIME tree is located on
the raw bytes (:mod:`agentpost.mail.mime_tree`: header/body split, multipart delimiters,
encapsulated ``message/rfc822``), so every section is a byte-exact slice of the stored
message; ENVELOPE is :mod:`agentpost.mail.imap_envelope` (the stdlib ``email`` package
is used only to parse addresses). This module keeps BODYSTRUCTURE, sections and section
maps, and re-exports the others' public names. Parameters are sent as
they are in the header (RFC 2047 and RFC 2231 forms stay encoded, as Dovecot sends
them). Nothing here raises on malformed input: a message that cannot be understood
is rendered as a single ``text/plain`` part.

Strings are rendered as IMAP quoted strings when they are 7-bit printable text
(``"`` and ``\\`` escaped) and as literals ``{n}\\r\\n...`` otherwise (8-bit/UTF-8,
CR, LF, NUL and other controls). Literal lengths count UTF-8 octets, so the ``str``
results must be sent UTF-8 encoded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from agentpost.mail.imap_envelope import (  # noqa: F401 (re-exported)
    _cached_address_list,
    _envelope,
    _render_address_list,
    envelope,
)
from agentpost.mail.mime_tree import (  # noqa: F401 (re-exported)
    MAX_DEPTH,
    MAX_PARTS,
    MimeEntity,
    _content_params,
    _decode,
    _Entity,
    _field_value,
    _parse,
    _split_header,
    _split_multipart,
    compact_in_order,
    compact_numbers,
    parse_tree,
    quote,
)

__all__ = ["SectionSpec", "bodystructure", "envelope", "parse_section", "quote",
           "section"]


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


def _body_lines(raw: bytes, ent: _Entity) -> int:
    """:func:`_lines` of ``ent``'s body, counted once for both renderings."""
    if ent.body_lines is None:
        ent.body_lines = _lines(raw, ent.bstart, ent.end)
    return ent.body_lines


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
                  str(_body_lines(raw, ent))]
    elif ent.maintype == "text":
        parts.append(str(_body_lines(raw, ent)))
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
