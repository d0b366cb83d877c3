"""STATUS counters of many folders of one inbox in ONE statement (IMAP LIST-STATUS).

Why: ``LIST ... RETURN (STATUS (...))`` (RFC 5819) asked STATUS of each listed folder
in a transaction of its own -- three round trips each -- so one LIST of an inbox with
its 5,000 folders (the cap) cost 15,000 round trips, and a client could repeat it. One
statement is also one snapshot: the counters of every folder are of one moment, as
each folder's were of one moment before.
"""

from __future__ import annotations

from typing import Any

from agentpost.storage.database import Txn, text_array


async def folder_statuses(txn: Txn, org_id: str, inbox_id: str,
                          names: list[str]) -> list[dict[str, Any]]:
    """For each existing folder of the inbox named in ``names`` (exact names, as LIST
    gives them): ``name``, ``uidnext``, ``uidvalidity``, ``highestmodseq`` and its
    messages' counters (``messages``, ``unseen``, ``recent``: UIDs above the folder's
    \\Recent mark, ``size``, ``deleted``), as storage.imap.folder_counts counts them."""
    return await txn.fetchall(
        "SELECT f.name, f.uidnext, f.uidvalidity, f.highestmodseq, c.* FROM folders f "
        "LEFT JOIN folder_recent r ON r.org_id = f.org_id AND r.folder_id = f.id "
        "CROSS JOIN LATERAL (SELECT count(*) AS messages, "
        "  count(*) FILTER (WHERE NOT m.seen) AS unseen, "
        "  count(*) FILTER (WHERE m.uid > COALESCE(r.recent_uid, 0)) AS recent, "
        "  COALESCE(sum(m.size), 0) AS size, count(*) FILTER (WHERE m.deleted) AS deleted "
        "  FROM messages m WHERE m.org_id = f.org_id AND m.folder_id = f.id) AS c "
        "WHERE f.org_id = %s AND f.inbox_id = %s AND f.name = ANY(%s::text[])",
        (org_id, inbox_id, text_array(names)))
