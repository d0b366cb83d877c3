"""The largest message header AgentPost stores (1 MiB, as Exim's ``header_maxsize``).

Why a limit of its own, apart from the message size: the header is the part every door
walks field by field in Python -- the MIME parse at delivery, IMAP's HEADER.FIELDS and
section cuts, the stored ``headers`` JSON that SEARCH reads -- so its cost follows the
number of fields, not the bytes. A stranger could otherwise mail an inbox 25 MB of
eight-byte fields. Real mail stays far below: a header with a thousand recipients and a
full ARC/DKIM chain is some tens of kilobytes. The limit is checked before anything is
written, so a refusal (SMTP 552 5.3.4, IMAP NO [TOOBIG]) leaves nothing behind.
"""

from __future__ import annotations

from agentpost.model.errors import MessageTooLarge

MAX_HEADER_BYTES = 1024 * 1024


def header_length(raw: bytes) -> int:
    """Bytes before the blank line that ends the header (the whole message if none)."""
    ends = [i for i in (raw.find(b"\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    return min(ends) + 1 if ends else len(raw)


def check_header_size(raw: bytes, limit: int = MAX_HEADER_BYTES) -> None:
    """Refuse (MessageTooLarge) a message whose header is over ``limit`` bytes."""
    if len(raw) > limit and header_length(raw) > limit:
        raise MessageTooLarge(f"The message header exceeds {limit // 1024} KiB.")
