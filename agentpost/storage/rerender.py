"""Stored IMAP renderings and search keys that an older renderer produced.

This is a maintenance job's storage, not a tenant's: it works through every
organization's rows, but each update names the row's own organization and id."""

from __future__ import annotations

from typing import Any

from agentpost.storage.database import Txn

#: The columns the job writes back (besides ``render_version``).
RENDERED_COLUMNS = frozenset({
    "imap_envelope", "imap_bodystructure", "imap_body", "imap_sections",
    # SEARCH and SORT keys (migration 0012)
    "sent_date", "from_text", "to_text", "cc_text", "bcc_text", "sort_subject", "sort_from",
    "sort_to", "sort_cc", "sort_display_from", "sort_display_to"})


async def claim_stale(txn: Txn, version: int, after_id: str, limit: int) -> list[dict[str, Any]]:
    """Rows rendered by a version before ``version``, in id order after ``after_id``,
    locked for this transaction; rows another process holds are skipped (it is already
    re-rendering them) and so are rows being changed (they come round again)."""
    return await txn.fetchall(
        "SELECT org_id, id, raw_blob_key FROM messages "
        "WHERE render_version < %s AND id > %s ORDER BY id LIMIT %s "
        "FOR NO KEY UPDATE SKIP LOCKED",
        (version, after_id, limit))


async def save_rendered(txn: Txn, org_id: str, message_id: str, version: int,
                        rendered: dict[str, Any]) -> None:
    """Store one row's new renderings (a subset of RENDERED_COLUMNS) and the version
    that made them."""
    columns = sorted(rendered)
    unknown = set(columns) - RENDERED_COLUMNS
    if unknown:
        raise ValueError(f"not a rendered column: {sorted(unknown)}")
    assignments = ", ".join(f"{column} = %s" for column in columns)
    await txn.execute(
        f"UPDATE messages SET {assignments}, render_version = %s "  # names checked above
        "WHERE org_id = %s AND id = %s AND render_version < %s",
        [*(rendered[c] for c in columns), version, org_id, message_id, version])


async def count_stale(txn: Txn, version: int) -> int:
    """How many rows still wait (for the log and the tests)."""
    return int(await txn.fetchval(
        "SELECT count(*) FROM messages WHERE render_version < %s", (version,)) or 0)
