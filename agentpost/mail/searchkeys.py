"""What IMAP SEARCH and SORT compare, derived once at ingest from the header fields.

* SEARCH FROM/TO/CC/BCC match a substring of the whole decoded field (display names,
  comments, every address, group names), followed by each address's normalised addr-spec
  (local@domain, CFWS removed) that the field's text does not already show, so that
  ``<user (c)@ (c) domain.org>`` is found by ``user@domain.org``, as RFC 3501 6.4.4's
  search of "the envelope structure's FROM field" implies (Dovecot matches it too):
  ``*_text`` holds it (None: no such field).
* SENTON/SENTBEFORE/SENTSINCE compare the Date field's own calendar date, its time
  and zone disregarded (RFC 3501 6.4.4): ``sent_date``.
* SORT (RFC 5256, RFC 5957 DISPLAY*): the base subject and the first address's
  mailbox or display form, ``sort_*``, compared by SQL with i;ascii-casemap.

Runs in ingest's parsing thread; the stdlib parsers used here are linear in practice and
no regular expression sees the input.
"""

from __future__ import annotations

import email.header
import email.headerregistry
import email.policy
import email.utils
import functools
from datetime import date, datetime
from typing import Any

from agentpost.mail.basesubject import base_subject
from agentpost.mail.sanitize import header_text

#: Address fields SEARCH reads as text, and the column each goes to.
SEARCH_TEXT_COLUMNS = {"from": "from_text", "to": "to_text", "cc": "cc_text",
                       "bcc": "bcc_text"}
#: Longest stored search text per field: what a substring search may look at.
MAX_SEARCH_TEXT_CHARS = 64 * 1024
#: The stdlib address parser (quadratic on some inputs, e.g. a run of quotes) sees at
#: most this much of a field, once: the sort keys' first address and the addr-specs
#: added to the search text come from that prefix.
MAX_ADDRESS_PARSE_CHARS = 2048


def _values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


def decoded_text(raw: str) -> str:
    """A raw header value with its RFC 2047 encoded words decoded, comments and all,
    unfolded onto one line (controls become a space, as everywhere we index)."""
    text = raw
    if "=?" in raw:
        try:
            text = str(email.header.make_header(email.header.decode_header(raw)))
        except Exception:  # a broken encoded word: search the raw text instead
            text = raw
    return header_text(text)


def search_text(values: list[str], addresses: list[Any] | None = None) -> str | None:
    """The searchable text of an address field (several occurrences: joined by ", "),
    then the addr-specs of its ``addresses`` (parsed here when not given) that the text
    does not contain already, bounded to MAX_SEARCH_TEXT_CHARS in all."""
    if not values:
        return None
    text = ", ".join(decoded_text(v) for v in values)
    if addresses is None:
        addresses = _addresses(values)
    folded = text.lower()
    extra: list[str] = []
    for address in addresses:
        spec = _addr_spec(address)
        if spec and spec.lower() not in folded and spec not in extra:
            extra.append(spec)
    if not extra:
        return text[:MAX_SEARCH_TEXT_CHARS]
    suffix = ", ".join(extra)[:MAX_ADDRESS_PARSE_CHARS]
    return text[:MAX_SEARCH_TEXT_CHARS - len(suffix) - 2] + ", " + suffix


def _addr_spec(address: Any) -> str:
    """local@domain of a parsed address (just the local part without a domain)."""
    try:
        spec = address.addr_spec if address.domain else address.username or ""
    except Exception:  # a malformed part the parser could not render
        return ""
    return header_text(spec or "")


#: Fields up to this many characters are parsed once per process (an LRU cache): the
#: same From and To values come back message after message (issue 12).
CACHED_FIELD_CHARS = 1024


def _addresses(values: list[str]) -> list[Any]:
    """The field's addresses, group members included, parsed from its first
    MAX_ADDRESS_PARSE_CHARS characters; [] if there are none or it does not parse."""
    if not values:
        return []
    if sum(map(len, values)) <= CACHED_FIELD_CHARS:
        return list(_cached_addresses(tuple(values)))
    return _parse_addresses(values)


@functools.lru_cache(maxsize=4096)
def _cached_addresses(values: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(_parse_addresses(list(values)))  # Address objects are immutable


def _parse_addresses(values: list[str]) -> list[Any]:
    try:
        # unfolded first (RFC 5322 2.2.3): the parser loses a domain after a fold
        whole = ", ".join(values)
        text = whole[:MAX_ADDRESS_PARSE_CHARS]
        text = text.replace("\r", "").replace("\n", "")
        # the fast path only for a whole field (a cut one may end mid-address)
        fast = _simple_addresses(text) if len(whole) <= MAX_ADDRESS_PARSE_CHARS else None
        if fast is not None:
            return fast
        header: Any = email.policy.default.header_factory("to", text)
        return list(header.addresses)
    except Exception:
        return []


#: Characters a "simple" address field is made of: no quotes, comments, backslashes,
#: groups, domain literals or non-ASCII, where the legacy and the modern parsers differ.
_SIMPLE_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "!#$%&'*+-/=?^_`{|}~.@<>, ")
#: What one word of a display name (no dots: the modern parser trips on some), and one
#: dot-separated atom of an addr-spec, may hold.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   "!#$%&'*+-/=?^_`{|}~")


def _dot_atom(text: str) -> bool:
    return all(atom and set(atom) <= _ATEXT for atom in text.split("."))


def _simple_addresses(text: str) -> list[Any] | None:
    """The addresses of a field in the common simple form -- ``local@domain`` or
    ``Display Name <local@domain>``, comma separated, plain ASCII words -- built from
    the fast legacy parser's result; None (use the modern parser) for anything else.

    Why: the modern parser took ~0.4 ms of CPU per ordinary message, 5-6 % of an MX
    delivery (bench/README.md, "Ingest CPU, second pass"). Each item is checked to be
    exactly the canonical rendering of what the legacy parser read, so the result is
    the modern parser's (tests/test_searchkeys_fastpath.py)."""
    if not set(text) <= _SIMPLE_CHARS or "=?" in text:
        return None
    items = [item.strip(" ") for item in text.split(",")]
    pairs = email.utils.getaddresses([text])
    if len(pairs) != len(items):
        return None
    out: list[Any] = []
    for item, (name, addr) in zip(items, pairs, strict=True):
        local, at, domain = addr.partition("@")
        if not at or not _dot_atom(local) or not _dot_atom(domain):
            return None
        if name:
            words = name.split(" ")
            if not all(w and set(w) <= _ATEXT for w in words) \
                    or item != f"{name} <{addr}>":
                return None
        elif item != addr and item != f"<{addr}>":
            return None
        out.append(email.headerregistry.Address(display_name=name, username=local,
                                                domain=domain))
    return out


def _first_address(values: list[str]) -> Any:
    """The first address of the field, looking inside a group; None if there is none."""
    addresses = _addresses(values)
    return addresses[0] if addresses else None


def mailbox_key(values: list[str]) -> str:
    """RFC 5256 FROM/TO/CC: the addr-mailbox (local part) of the first address; ""
    for a missing or empty field."""
    return _mailbox_of(_first_address(values))


def display_key(values: list[str]) -> str:
    """RFC 5957 DISPLAYFROM/DISPLAYTO: the decoded display name of the first address,
    else its addr-spec (mailbox@host); "" for a missing or empty field."""
    return _display_of(_first_address(values))


def _mailbox_of(first: Any) -> str:
    return header_text(first.username or "") if first is not None else ""


def _display_of(first: Any) -> str:
    if first is None:
        return ""
    name = header_text(first.display_name or "")
    if name:
        return name
    return header_text(first.addr_spec if first.domain else first.username or "")


def sent_date(sent_at: datetime | None) -> date | None:
    """The calendar date of the Date field in its own zone (``sent_at`` as parsed keeps
    the field's offset; a -0000 or zoneless date was read as UTC)."""
    return sent_at.date() if sent_at is not None else None


def index_fields(headers: list[tuple[str, str]], subject: str,
                 sent_at: datetime | None) -> dict[str, Any]:
    """The derived columns of one message row, from its raw header pairs, its decoded
    subject and its parsed Date."""
    fields: dict[str, Any] = {}
    first: dict[str, Any] = {}
    for name, column in SEARCH_TEXT_COLUMNS.items():
        values = _values(headers, name)
        addresses = _addresses(values)  # parsed once per field
        fields[column] = search_text(values, addresses)
        first[name] = addresses[0] if addresses else None
    first_from, first_to = first["from"], first["to"]
    fields.update(
        sent_date=sent_date(sent_at),
        sort_subject=base_subject(subject),
        sort_from=_mailbox_of(first_from), sort_to=_mailbox_of(first_to),
        sort_cc=_mailbox_of(first["cc"]),
        sort_display_from=_display_of(first_from), sort_display_to=_display_of(first_to))
    return fields
