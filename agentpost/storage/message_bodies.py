"""Large text values of a new message row, sent to PostgreSQL in pieces.

Why: psycopg2 builds every statement client-side, so a 10 MB ``text_body`` passed as a
parameter exists three more times while the INSERT is sent (UTF-8 encoded, escaped,
then inside the whole statement). That was the largest remaining peak of a big
plain-text delivery (issue 12: under 3x its size). Here each value above
:data:`LARGE_CHARS` goes first, in pieces of :data:`CHUNK_CHARS`, into a temporary
table of the connection; the INSERT then names it as a subquery joining the pieces on
the server. The text stored is the same character for character (pieces are plain
slices, joined in order), and only one piece is ever quoted at a time.

The rows live only in the transaction (``ON COMMIT DELETE ROWS``; a rollback discards
them), so a retried or re-batched transaction starts empty. Values of ordinary size take
none of this path: it costs nothing per message on the hot path.
"""

from __future__ import annotations

from typing import Any

from agentpost.storage.database import Txn

#: Values longer than this (characters) are sent in pieces.
LARGE_CHARS = 1024 * 1024
#: The size of one piece (characters; at most 4x that in bytes once encoded).
CHUNK_CHARS = 1024 * 1024

_CREATE = ("CREATE TEMP TABLE IF NOT EXISTS ap_body_parts "
           "(k integer NOT NULL, n integer NOT NULL, part text NOT NULL) "
           "ON COMMIT DELETE ROWS")
_PIECE = "INSERT INTO pg_temp.ap_body_parts (k, n, part) VALUES (%s, %s, %s)"
_MEMO = "message_bodies"


class Joined:
    """A parameter that psycopg2 renders as the subquery joining one value's pieces
    (adapts itself: ``__conform__`` + ``getquoted``), so the statement's text holds a
    few dozen bytes instead of the value."""

    __slots__ = ("key",)

    def __init__(self, key: int) -> None:
        self.key = int(key)

    def __conform__(self, protocol: Any) -> Joined:
        return self

    def getquoted(self) -> bytes:
        return (b"(SELECT string_agg(part, '' ORDER BY n) FROM pg_temp.ap_body_parts "
                b"WHERE k = %d)" % self.key)


async def send_large(txn: Txn, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with every text value above LARGE_CHARS sent ahead in pieces and replaced
    by a :class:`Joined`; ``row`` itself is returned when it has none. The same string
    object (one body stored for several recipients) is sent once per transaction."""
    large = [c for c, v in row.items()
             if type(v) is str and len(v) > LARGE_CHARS]  # not a BlobText: never quoted
    if not large:
        return row
    memo: dict[int, tuple[str, Joined]] = txn.memo.setdefault(_MEMO, {})
    out = dict(row)
    for col in large:
        value: str = row[col]
        known = memo.get(id(value))
        if known is None or known[0] is not value:
            if not memo:
                await txn.execute(_CREATE)
            joined = Joined(len(memo) + 1)
            for n, pos in enumerate(range(0, len(value), CHUNK_CHARS)):
                await txn.execute(_PIECE, (joined.key, n, value[pos:pos + CHUNK_CHARS]))
            # The memo keeps the string alive, so its id cannot be reused meanwhile.
            known = memo[id(value)] = (value, joined)
        out[col] = known[1]
    return out
