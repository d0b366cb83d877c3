"""STORE's flag arithmetic and its ending when nothing changed (split from
core.imap_messages by job)."""

from __future__ import annotations

from typing import Any

from agentpost.storage import imap as imap_store
from agentpost.storage.database import Txn


def new_flag_columns(row: dict[str, Any], mode: str, system: set[str],
                     keywords: list[str]) -> dict[str, Any]:
    """The flag columns a STORE (``mode`` "+", "-" or "" for replace, of system flags
    and folded keywords) changes in a locked row: only those whose value differs."""
    columns: dict[str, Any] = {}
    for flag, col in imap_store.SYSTEM_FLAGS.items():
        if mode == "+":
            value = row[col] or flag in system
        elif mode == "-":
            value = row[col] and flag not in system
        else:
            value = flag in system
        if value != row[col]:
            columns[col] = value
    current = set(row["labels"])
    if mode == "+":
        labels = current | set(keywords)
    elif mode == "-":
        labels = current - set(keywords)
    else:
        labels = set(keywords)
    if labels != current:
        columns["labels"] = sorted(labels)
    return columns


async def end_unchanged(txn: Txn) -> None:
    """End a transaction that locked rows and wrote nothing with ROLLBACK: the same
    outcome as COMMIT, without the WAL flush a COMMIT of row locks (an xid) waits for
    (~14 % of the mixed load's STOREs change nothing: their COMMIT was an fsync)."""
    await txn.execute("ROLLBACK")
    txn.ended = True
