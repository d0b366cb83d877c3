"""A delivery's large message bytes, written ahead of its statements as a binary
parameter (issue 12).

Why: the bytes of a message kept in PostgreSQL (storage.blobs.inline) otherwise ride in
the delivery's statement as a literal the size of the message (storage.long_text),
which PostgreSQL's lexer reads a byte at a time. Sent as a binary ``bytea`` through
libpq's pipeline mode (storage.libpq_pipeline), in the same round trip as the
transaction's ``BEGIN``, they cost PostgreSQL a copy instead (bench/README.md,
sixteenth pass).

The rows written here are the delivery's own blob rows, in its transaction, under the
same advisory locks its statement takes (all of the batch's keys, in key order, so two
batches cannot deadlock on them and a concurrent release cannot delete a row between
here and the reference count). They are written with no references (``refcount`` 0,
or left as they are when the content is already stored); the delivery's statement then
counts its references as for any existing row, and its ``data`` for these keys is NULL
(its upsert never overwrites ``data``). Nothing here commits: a delivery that fails
rolls these rows back with everything else.
"""

from __future__ import annotations

from collections.abc import Mapping

from agentpost.storage.database import Txn, text_array
from agentpost.storage.libpq_pipeline import bytea_array
from agentpost.storage.long_text import utf8_text

#: Message bytes from this size on may be written ahead (smaller ones: the literal costs
#: PostgreSQL less than the extra statement; bench/driver_compare_blob.py) ...
LEAD_MIN_BYTES = 16 * 1024
#: ... when they come to this much in one statement: writing ahead costs a round trip,
#: which one delivery in one session feels as latency. Measured on the MX, one session
#: (smtp_bench.py, bench/README.md sixteenth pass): 32 KiB -8 %, 64 KiB -5 %, 100 KiB
#: +3.5 % msgs/s; at 20 sessions a batch of several such messages saves PostgreSQL
#: 12-26 % of its CPU.
LEAD_MIN_TOTAL = 96 * 1024

#: The batch's locks (every key, in key order: the one-time filter runs before any row
#: is written), then the large blobs' rows.
_AHEAD_SQL = (
    "WITH l AS (SELECT count(pg_advisory_xact_lock(hashtextextended(k, 7))) AS n "
    "  FROM (SELECT k FROM unnest($1::text[]) AS k ORDER BY k) AS s) "
    "INSERT INTO blobs (key, size, refcount, created_at, data, utf8) "
    "SELECT k, s, 0, $2::timestamptz, d, u "
    "FROM unnest($3::text[], $4::bigint[], $5::bytea[], $6::bool[]) AS x(k, s, d, u) "
    "WHERE (SELECT n FROM l) >= 0 "
    "ON CONFLICT (key) DO NOTHING")
#: Its prepared statement's name on a pool connection (storage.prepared's are ap_<hash>).
AHEAD_NAME = "ap_blob_ahead"


async def write_ahead(txn: Txn, keys: list[str], inline: Mapping[str, bytes], *,
                      wait: bool = True) -> list[bytes | None]:
    """The ``data`` values of ``keys``' blob rows for the delivery's statement (the
    bytes of ``inline``, by key; None for a blob in the store): None also for every
    large one, which this wrote first when they were worth it and it could (see the
    module's docstring). ``wait=False``: returns once they are sent, and the
    transaction's next exchange waits for their answer (Txn.pipeline)."""
    large = [key for key in keys if len(inline.get(key) or b"") >= LEAD_MIN_BYTES]
    values = [inline[key] for key in large]
    if sum(map(len, values)) < LEAD_MIN_TOTAL or not txn.can_pipeline:
        return [inline.get(key) for key in keys]
    flags = ["t" if utf8_text(value) else "f" for value in values]
    params = [text_array(keys).encode(), txn.now.isoformat().encode(),
              text_array(large).encode(),
              ("{" + ",".join(str(len(v)) for v in values) + "}").encode(),
              bytea_array(values), ("{" + ",".join(flags) + "}").encode()]
    await txn.pipeline(_AHEAD_SQL, AHEAD_NAME, params,
                       binary=[False, False, False, False, True, False], wait=wait)
    ahead = set(large)
    return [None if key in ahead else inline.get(key) for key in keys]
