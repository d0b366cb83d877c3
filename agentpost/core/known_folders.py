"""The delivery folders this process has seen, so a lone MX delivery can be staged
without asking the database first (issue 12).

Why: a delivery's transaction took three round trips: the RCPT lookup, the staging
(blob references, the folder, the thread), then the write with its COMMIT. At one
session each round trip is paid in full (the reactor waits, PostgreSQL waits), and
two of the staging's three answers are predictable: a message that names no parent
(no In-Reply-To, no References) starts a new thread unless a stored message already
refers to it, and an inbox's INBOX is the same folder row from one message to the
next. So the staging can ride at the head of the write (storage.message_insert.
guessed_delivery_sql), with a check there that the guess still holds.

Nothing here is trusted: it only proposes. The check in the write compares the folder's
id, name, inbox, organization and UIDVALIDITY with the database's, and looks up the
thread exactly as the staging would; when either differs the write fails before
anything of it is stored, the entry is forgotten and the delivery is staged by asking
(core.group_commit). So another process's changes (a folder deleted, recreated,
renamed) cost one wasted round trip, never a misfiled message. Keys carry the
organization and inbox the recipient was routed to, so one tenant's entries are never
proposed for another's mail.
"""

from __future__ import annotations

from typing import Any

#: Entries kept; beyond it the oldest go first (an inbox busy enough to matter is
#: remembered again by its next delivery).
DEFAULT_LIMIT = 4096

_Key = tuple[str, str, str]


class KnownFolders:
    """(organization, inbox, folder name) -> the folder row (id, name, uidvalidity)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self._limit = limit
        self._rows: dict[_Key, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, org_id: str, inbox_id: str, name: str) -> dict[str, Any] | None:
        """A copy of the remembered row, or None."""
        row = self._rows.get((org_id, inbox_id, name))
        return dict(row) if row is not None else None

    def remember(self, org_id: str, inbox_id: str, name: str, folder: dict[str, Any]) -> None:
        """Keep what the staging answered for a delivery to ``name``."""
        key = (org_id, inbox_id, name)
        self._rows.pop(key, None)  # re-inserted: the newest again
        self._rows[key] = {k: folder[k] for k in ("id", "name", "uidvalidity")}
        while len(self._rows) > self._limit:
            del self._rows[next(iter(self._rows))]

    def forget(self, org_id: str, inbox_id: str, name: str) -> None:
        self._rows.pop((org_id, inbox_id, name), None)
