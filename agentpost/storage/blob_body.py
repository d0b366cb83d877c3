"""A plain body stored once, as its message's own bytes, and not again in the row.

Why (migration 0040): a message kept in PostgreSQL (storage.blobs.inline) whose body is
exactly the UTF-8 text of its bytes after the header -- most plain mail -- was stored
twice, in the blob row and in ``messages.text_body``; every stored byte is compressed,
written to TOAST, WAL-logged and written again when the TOAST table grows, which at
100 KiB was a quarter of PostgreSQL's CPU per message (issue 12), and every further copy
of the message (more recipients, IMAP COPY) stored the body once more.

The ingest marks such a body as a :class:`~agentpost.storage.long_text.BlobText` after
checking that equality. Writers pass a row through :func:`split_row` (or a body through
:func:`split_body`): ``text_body`` becomes NULL and ``text_body_at`` the offset, checked
by ``ap_blob_text_at`` in the same statement. Readers select :func:`body_sql` where
they read ``text_body``. On a database that is not UTF-8 (where ``convert_from`` would
not give the same text back) both markers fall back to storing the body as before.
"""

from __future__ import annotations

from typing import Any

from psycopg2.extensions import register_adapter

from agentpost.storage.long_text import BlobText, _Adapter, body_literal, utf8_server


def body_sql(alias: str = "") -> str:
    """The SQL expression of a message row's text body wherever it is kept (``alias``:
    the table's, with its dot, e.g. ``"m."``)."""
    return (f"COALESCE({alias}text_body, "
            f"ap_body_text({alias}raw_blob_key, {alias}text_body_at))")


class _InBlob(BlobText):
    """The ``text_body`` column's value for a body kept in the message's bytes."""


class _BodyAt:
    """The ``text_body_at`` column's value for the same body."""

    __slots__ = ("body",)
    #: What its SQL yields: storage.prepared then passes it to a prepared statement's
    #: integer parameter (else the whole statement would be planned on every delivery).
    pg_param_type = "integer"

    def __init__(self, body: BlobText) -> None:
        self.body = body


def split_body(body: Any) -> tuple[Any, Any]:
    """``(text_body, text_body_at)`` values for a row whose body is ``body``: unchanged
    and None, unless it is a :class:`BlobText` (then the two markers above)."""
    if type(body) is not BlobText:
        return body, None
    kept = _InBlob(body)
    kept.key, kept.start, kept.octets = body.key, body.start, body.octets
    return kept, _BodyAt(kept)


def split_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``text_body``/``text_body_at`` as :func:`split_body` gives them
    (the same dict when its body is not kept in its bytes)."""
    text, at = split_body(row.get("text_body"))
    if at is None:
        return row
    return {**row, "text_body": text, "text_body_at": at}


class _QuotedInBlob(_Adapter):
    """NULL on a UTF-8 database; elsewhere the body itself, as a literal."""

    _value: _InBlob

    def getquoted(self) -> bytes:
        if utf8_server(self._conn):
            return b"NULL"
        return body_literal(self._value, self._conn)


class _QuotedBodyAt(_Adapter):
    """``ap_blob_text_at(key, start, octets)`` on a UTF-8 database; elsewhere NULL
    (the body went as a literal: :class:`_QuotedInBlob`)."""

    _value: _BodyAt

    def getquoted(self) -> bytes:
        if not utf8_server(self._conn):
            # typed: in a batch's ARRAY[...] a bare NULL makes the array text[], which
            # a prepared statement's integer[] parameter refuses (storage.prepared)
            return b"NULL::integer"
        body = self._value.body
        return b"ap_blob_text_at('%s', %d, %d)" % (body.key.encode("ascii"), body.start,
                                                  body.octets)


register_adapter(_InBlob, _QuotedInBlob)
register_adapter(_BodyAt, _QuotedBodyAt)
