"""What IMAP SEARCH and SORT compare, derived once at ingest from the header fields.

* SEARCH FROM/TO/CC/BCC match a substring of the whole decoded field (display names,
  comments, every address, group names): ``*_text`` holds it (None: no such field).
* SENTON/SENTBEFORE/SENTSINCE compare the Date field's own calendar date, its time
  and zone disregarded (RFC 3501 6.4.4): ``sent_date``.
* SORT (RFC 5256, RFC 5957 DISPLAY*): the base subject and the first address's
  mailbox or display form, ``sort_*``, compared by SQL with i;ascii-casemap.

Runs in ingest's parsing thread; the stdlib parsers used here are linear in practice and
no regular expression sees the input.
"""

from __future__ import annotations

import email.header
import email.policy
from datetime import date, datetime
from typing import Any

from agentpost.mail.basesubject import base_subject
from agentpost.mail.sanitize import header_text

#: Address fields SEARCH reads as text, and the column each goes to.
SEARCH_TEXT_COLUMNS = {"from": "from_text", "to": "to_text", "cc": "cc_text",
                       "bcc": "bcc_text"}
#: Longest stored search text per field: what a substring search may look at.
MAX_SEARCH_TEXT_CHARS = 64 * 1024
#: Only the first address is wanted for sorting: the stdlib address parser (quadratic on
#: some inputs, e.g. a run of quotes) sees at most this much of a field, once.
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


def search_text(values: list[str]) -> str | None:
    """The searchable text of an address field (several occurrences: joined by ", ")."""
    if not values:
        return None
    return ", ".join(decoded_text(v) for v in values)[:MAX_SEARCH_TEXT_CHARS]


def _first_address(values: list[str]) -> Any:
    """The first address of the field, looking inside a group; None if there is none."""
    if not values:
        return None
    try:
        text = ", ".join(values)[:MAX_ADDRESS_PARSE_CHARS]
        header: Any = email.policy.default.header_factory("to", text)
        addresses = header.addresses
    except Exception:
        return None
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
    fields: dict[str, Any] = {
        column: search_text(_values(headers, name))
        for name, column in SEARCH_TEXT_COLUMNS.items()}
    first_from, first_to = (_first_address(_values(headers, name)) for name in ("from", "to"))
    fields.update(
        sent_date=sent_date(sent_at),
        sort_subject=base_subject(subject),
        sort_from=_mailbox_of(first_from), sort_to=_mailbox_of(first_to),
        sort_cc=mailbox_key(_values(headers, "cc")),
        sort_display_from=_display_of(first_from), sort_display_to=_display_of(first_to))
    return fields
