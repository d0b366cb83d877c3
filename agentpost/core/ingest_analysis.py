"""What ingest derives from a message's bytes alone, in a worker thread: the parse for
the API, the IMAP renderings and the SEARCH/SORT keys (core.ingest stores them; the
rerender job derives them again for rows stored by older renderers)."""

from __future__ import annotations

import logging
from typing import Any

from agentpost.mail import imapformat
from agentpost.mail.parse import ParsedMessage, parse_message
from agentpost.mail.reply import extract_new_text
from agentpost.mail.searchkeys import index_fields
from agentpost.storage.mail import EXTRACTED_MAX_CHARS

log = logging.getLogger(__name__)

#: ENVELOPE, BODYSTRUCTURE, BODY and the section map, rendered at ingest (None: at FETCH).
IMAPRendered = tuple[str | None, str | None, str | None, str | None]

#: Bodies longer than this store no extracted_text (storage.mail.EXTRACTED_MAX_CHARS).
STORE_EXTRACTED_MAX_CHARS = EXTRACTED_MAX_CHARS


def analyse(raw: bytes) -> tuple[ParsedMessage, IMAPRendered]:
    """Parse for the API and pre-render IMAP ENVELOPE/BODYSTRUCTURE/BODY and the section
    map, in a thread, from one walk of the MIME structure."""
    try:
        tree = imapformat.parse_tree(raw)
    except Exception:  # the renderers and the parser each fall back on their own
        tree = None
    parsed = parse_message(raw, tree=tree)
    if parsed.text_body is not None and len(parsed.text_body) <= STORE_EXTRACTED_MAX_CHARS:
        parsed.extracted_text = extract_new_text(parsed.text_body)
    try:
        imap: IMAPRendered = (
            _storable(imapformat.envelope(raw, tree)),
            _storable(imapformat.bodystructure(raw, True, tree)),
            _storable(imapformat.bodystructure(raw, False, tree)),
            _storable(imapformat.section_map(raw, tree)),
        )
    except Exception:  # rendered lazily at FETCH time instead
        log.exception("could not pre-render IMAP structures")
        imap = (None, None, None, None)
    return parsed, imap


def analyse_indexed(raw: bytes) -> tuple[ParsedMessage, IMAPRendered, dict[str, Any]]:
    """:func:`analyse`, plus the SEARCH/SORT columns (in the same thread)."""
    parsed, imap = analyse(raw)
    try:
        index = index_fields(parsed.headers, parsed.subject, parsed.sent_at)
    except Exception:  # the columns keep their defaults; never a lost message
        log.exception("could not derive the search and sort keys")
        index = {}
    return parsed, imap, index


#: The version of the renderers above (IMAP structures and SEARCH/SORT keys) stored with
#: each row. Raise it whenever their output changes for a message already stored, and add
#: a migration re-pointing the ``messages_render_stale`` index: agentpost.jobs.rerender
#: then brings older rows up to date from their raw bytes.
#: 2: the address search texts carry each address's normalised addr-spec (0016).
RENDER_VERSION = 2


def rendered_columns(raw: bytes) -> dict[str, Any]:
    """What a row stores of :func:`analyse_indexed` that depends only on the raw bytes:
    the IMAP renderings (None where rendering failed: FETCH renders them then) and the
    search/sort keys."""
    _, imap, index = analyse_indexed(raw)
    return {"imap_envelope": imap[0], "imap_bodystructure": imap[1], "imap_body": imap[2],
            "imap_sections": imap[3], **index}


def _storable(rendered: str) -> str | None:
    """PostgreSQL text cannot hold NUL; such (rare, broken) messages render at FETCH."""
    return None if "\x00" in rendered else rendered
