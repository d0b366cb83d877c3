"""Flags between rows and sessions: STORE's arithmetic and its ending when nothing
changed, a row as a session keeps it, an APPENDed copy as it was stored (split from
core.imap_messages by job)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentpost.core import mail_changes
from agentpost.imap.interfaces import MessageMeta
from agentpost.storage import imap as imap_store
from agentpost.storage.database import Txn


def message_meta(row: dict[str, Any], spellings: Mapping[str, str] | None = None
                 ) -> MessageMeta:
    """A message row as the session keeps it (UID, MODSEQ, flags; keywords in
    ``spellings``, core.imap_spellings's answer for the rows of the read)."""
    return MessageMeta(row["uid"], row["modseq"], imap_store.flags_of(row, spellings))


def split_flags(flags: frozenset[str]) -> tuple[set[str], list[str]]:
    """System flags, and the keywords folded (agentpost.mail.keywords: any RFC 3501
    keyword atom; NO on anything else)."""
    system = {f for f in flags if f.startswith("\\")}
    return system, sorted(mail_changes.imap_keywords(flags))


def appended_meta(uid: int, modseq: int, system: set[str], keywords: list[str],
                  spellings: Mapping[str, str]) -> MessageMeta:
    """An APPENDed copy as its row reads back: the system flags ingest stores (others,
    such as \\Recent, are not stored) and its folded keywords as labels."""
    row: dict[str, Any] = {col: flag in system for flag, col in imap_store.SYSTEM_FLAGS.items()}
    row.update(uid=uid, modseq=modseq, labels=keywords)
    return message_meta(row, spellings)


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
