"""IMAP ENVELOPE (RFC 3501 §7.4.2) of a raw message.

Split from :mod:`agentpost.mail.imapformat`; the stdlib ``email`` package is used only to
parse addresses, with the rendered lists of common header values remembered.
"""

from __future__ import annotations

import email.utils
import functools

from agentpost.mail.mime_tree import MimeEntity, _Entity, _field_value, _parse, quote

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
