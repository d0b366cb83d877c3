"""What the IMAP protocol layer needs from the rest of the system.

The protocol code (parser, state machine, sequence numbers, response rendering)
knows nothing of SQL or tenants. After LOGIN/AUTHENTICATE it holds an
``IMAPAccount`` (one inbox, checked through the shared twisted.cred portal) and asks
it for folders; SELECT/EXAMINE hands it an ``IMAPFolder`` bound to the selected
folder, which it asks for message metadata and bytes. Folder ids and blob keys stay
behind these two interfaces: the protocol names folders by name and messages by UID
(and by the FetchRow a fetch returned). Every method is a coroutine (``async
def``) awaited inside Deferred-driven code. Failures are domain errors from
``agentpost.model.errors`` (NotFound -> NO [NONEXISTENT] or [TRYCREATE] as the
command requires, Conflict -> [ALREADYEXISTS], Forbidden -> [NOPERM],
TemporaryFailure -> [UNAVAILABLE], Unauthenticated -> [AUTHENTICATIONFAILED],
InvalidRequest -> [CANNOT] or BAD as appropriate).

Flags are IMAP strings: the system flags ``\\Seen \\Answered \\Flagged \\Deleted
\\Draft`` and keywords (any atom; agentpost.mail.keywords maps them to API labels).
``\\Recent`` is computed by the protocol layer per session (messages that arrived
after SELECT), not stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, Protocol


@dataclass(frozen=True)
class FolderInfo:
    """One folder for LIST/LSUB."""

    name: str  # full name, "/" as hierarchy delimiter, e.g. "Projects/2026"
    special_use: str | None  # "\\Sent", "\\Drafts", "\\Trash", "\\Junk", or None (INBOX too)
    subscribed: bool
    has_children: bool
    # Opaque, and the same through a RENAME: NOTIFY (RFC 5465 §5.4) tells a rename from
    # a delete and a create by it, and watches the folder by it. "" when the backend has
    # none (the name is used instead).
    key: str = ""


@dataclass(frozen=True, slots=True)
class MessageMeta:
    """The cheap per-message state a session keeps for its sequence-number view (one per
    message of the selected folder, per session: slots, and shared flag sets)."""

    uid: int
    modseq: int
    flags: frozenset[str]


@dataclass
class FolderSnapshot:
    """What SELECT/EXAMINE returns with the folder: every message's UID, MODSEQ, flags."""

    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: list[MessageMeta]  # ascending UID
    first_unseen_uid: int | None = None


@dataclass(frozen=True)
class FolderStatus:
    """STATUS data."""

    messages: int
    uidnext: int
    uidvalidity: int
    unseen: int
    highestmodseq: int
    recent: int = 0
    size: int = 0  # bytes of the folder's messages (STATUS=SIZE, RFC 8438)
    deleted: int = 0  # messages flagged \\Deleted (STATUS DELETED, RFC 9051 §6.3.11)


@dataclass(slots=True)
class FetchRow:
    """Per-message FETCH data; only what was asked for is filled in."""

    uid: int
    modseq: int
    flags: frozenset[str]
    internaldate: datetime | None = None
    size: int | None = None  # RFC822.SIZE: exact byte length of the stored message
    envelope: str | None = None  # pre-rendered ENVELOPE (see agentpost.mail.imapformat)
    bodystructure: str | None = None  # pre-rendered BODYSTRUCTURE (extensible form)
    body: str | None = None  # pre-rendered BODY (non-extensible form)
    sections: str | None = None  # MIME offsets (agentpost.mail.imapformat.section_map)
    # The backend's own reference to the stored message (set with ``content``); opaque to
    # the protocol, which hands the row back to IMAPFolder.read_message/read_range.
    blob_ref: Any = None


@dataclass(frozen=True)
class ThreadFields:
    """What THREAD (RFC 5256) needs of one searched message: the stored Message-ID,
    References and In-Reply-To (msg-ids as parsed), the decoded subject (base subject
    and reply flag come from it), the Date (None when missing or unreadable) and the
    internal date."""

    uid: int
    message_id: str | None
    references: tuple[str, ...]
    in_reply_to: str | None
    subject: str
    sent_at: datetime | None
    internaldate: datetime


@dataclass(frozen=True)
class AppendMessage:
    """One message of a MULTIAPPEND (RFC 3502): the bytes (or a binary file at offset 0,
    a spool), its flags and INTERNALDATE (None: now)."""

    message: bytes | IO[bytes]
    flags: frozenset[str] = frozenset()
    internaldate: datetime | None = None


@dataclass(frozen=True)
class FetchWants:
    """Which columns a FETCH needs, so a ``FETCH 1:* (FLAGS)`` never reads bodies."""

    internaldate: bool = False
    size: bool = False
    envelope: bool = False
    bodystructure: bool = False
    content: bool = False  # body sections: blob_ref, sections and size


@dataclass
class Changes:
    """What happened in a folder since the session last looked (for unsolicited
    EXISTS/FETCH/EXPUNGE responses)."""

    new: list[MessageMeta] = field(default_factory=list)  # UIDs above the session's max
    changed: list[MessageMeta] = field(default_factory=list)  # known UIDs, MODSEQ > since
    expunged: list[int] = field(default_factory=list)  # known UIDs that are gone
    highestmodseq: int = 0


# Search keys, parsed by the protocol layer into nested tuples; sequence numbers are
# converted to UIDs by the protocol before the backend sees them:
#   ("all",) ("uid", [uids]) ("and", [k, ...]) ("or", k1, k2) ("not", k)
#   ("flag", "\\Seen", True|False)   -- SEEN/UNSEEN, ANSWERED/UNANSWERED, FLAGGED, DELETED, DRAFT
#   ("keyword", "label", True|False)
#   ("header", "from"|"to"|"cc"|"bcc"|"subject"|any-name, "substring")
#   ("body", "substring") ("text", "substring")
#   ("before"|"on"|"since", date)           -- INTERNALDATE, date is datetime.date
#   ("sentbefore"|"senton"|"sentsince", date)  -- Date: header
#   ("larger"|"smaller", n) ("modseq", n)
SearchKey = tuple[Any, ...]


class IMAPFolder(Protocol):
    """One folder, bound at SELECT/EXAMINE: what a session does with its selected mailbox.

    Every operation names messages by UID; NotFound when the folder itself is gone."""

    name: str  # as selected; APPEND compares it to tell whether to look for news

    async def fetch(self, uids: list[int], wants: FetchWants) -> list[FetchRow]:
        """Rows for the UIDs that still exist, ascending UID."""

    async def read_message(self, row: FetchRow) -> bytes:
        """The whole stored message of a fetched row, byte-exact: by its ``blob_ref`` when
        the fetch asked for content, else looked up by UID (NotFound if expunged
        meanwhile; KeyError if its bytes were collected meanwhile)."""

    async def read_range(self, row: FetchRow, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` of a row fetched with ``content``."""

    async def claim_recent(self, up_to_uid: int, claim: bool) -> int:
        """The highest UID another session was already told about (RFC 3501 \\Recent);
        with ``claim`` (SELECT, not EXAMINE), UIDs up to ``up_to_uid`` become this
        session's: no other session will see them as recent."""

    async def set_seen(self, uids: list[int]) -> list[MessageMeta]:
        """Add \\Seen (a non-PEEK body fetch); returns the messages whose flags changed."""

    async def store(self, uids: list[int], mode: str, flags: frozenset[str],
                    unchangedsince: int | None) -> tuple[list[MessageMeta], list[int]]:
        """mode is "+", "-" or "" (replace). Returns (messages after the change, UIDs that
        failed the UNCHANGEDSINCE test)."""

    async def copy(self, uids: list[int], dest: str) -> tuple[int, list[tuple[int, int]]]:
        """Returns (dest uidvalidity, [(source uid, dest uid)]); NotFound for a missing
        destination (the protocol answers NO [TRYCREATE])."""

    async def move(self, uids: list[int], dest: str) -> tuple[int, list[tuple[int, int]]]:
        """As :meth:`copy`, and the messages leave this folder."""

    async def expunge(self, uids: list[int] | None) -> list[int]:
        """Remove \\Deleted messages (only among ``uids`` when given); returns their UIDs."""

    async def search(self, key: SearchKey,
                     sort: list[tuple[str, bool]] | None = None) -> list[int]:
        """Matching UIDs, ascending; with ``sort`` ([(RFC 5256 key, reverse)]) in that
        order, ties by UID."""

    async def thread_fields(self, key: SearchKey) -> list[ThreadFields]:
        """THREAD: the threading fields of the messages matching ``key``, ascending UID
        (one query: THREAD REFERENCES needs them all at once)."""

    async def changes(self, known_uids: list[int], since_modseq: int,
                      fresh: bool = True) -> Changes:
        """What changed since the session last looked (see :class:`Changes`). Not
        ``fresh``: the session was woken by :meth:`watch`, and the backend may answer
        from what it read after that wake-up for another session of the process;
        ``fresh``: as the database is now (NOOP, CHECK, a direct call)."""

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (soon, maybe spuriously) whenever the folder may have changed,
        in this process or another (PostgreSQL LISTEN/NOTIFY). Returns an unsubscribe."""


class IMAPAccount(Protocol):
    """One logged-in inbox."""

    address: str
    can_write: bool  # the key holds messages:write (flags, APPEND, COPY/MOVE, EXPUNGE)
    # The Principal the session acts as: its key is re-checked before every command and
    # the session ends when the key dies (agentpost.auth.sessions.LiveCredentials).
    principal: Any

    async def list_folders(self) -> list[FolderInfo]: ...

    async def create_folder(self, name: str) -> None: ...

    async def delete_folder(self, name: str) -> None: ...

    async def rename_folder(self, old: str, new: str) -> None: ...

    async def set_subscribed(self, name: str, subscribed: bool) -> None: ...

    async def list_subscriptions(self) -> list[str]:
        """Every subscribed name, a folder of that name existing or not (RFC 3501
        §6.3.6: a subscription outlives its folder; LIST (SUBSCRIBED) \\NonExistent)."""

    async def select(self, name: str) -> tuple[IMAPFolder, FolderSnapshot]:
        """SELECT/EXAMINE: the folder, bound, and what is in it now."""

    async def status(self, name: str) -> FolderStatus: ...

    async def statuses(self, names: list[str]) -> dict[str, FolderStatus]:
        """STATUS of many folders at once (LIST ... RETURN (STATUS ...)), by name; a
        name that is no folder is left out."""

    def watch_folder(self, key: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (soon, maybe spuriously) whenever the folder with this
        :attr:`FolderInfo.key` may have changed, in any process (NOTIFY, RFC 5465).
        Returns an unsubscribe."""

    def watch_folder_list(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` whenever this inbox's folders may have been created,
        deleted, renamed or (un)subscribed, in any process. Returns an unsubscribe."""

    async def check_folder(self, name: str) -> None:
        """NotFound unless the folder exists (one row: APPEND asks before each literal)."""

    async def quota(self) -> tuple[int, int]:
        """(bytes the inbox uses, its limit in bytes; 0 when unlimited)."""

    async def append(self, folder: str, message: bytes | IO[bytes], flags: frozenset[str],
                     internaldate: datetime | None) -> tuple[int, int]:
        """Store through the single ingest path; returns (uidvalidity, uid). ``message`` is
        the bytes or a binary file at offset 0 (a spool). NotFound when the folder does
        not exist (the protocol answers NO [TRYCREATE])."""

    async def append_many(self, folder: str, messages: list[AppendMessage]
                          ) -> tuple[int, list[int]]:
        """MULTIAPPEND: every message stored in one transaction, or none; returns
        (uidvalidity, the UIDs in message order). Errors as :meth:`append`."""

    async def open_folder(self, name: str) -> tuple[IMAPFolder, int]:
        """A folder handle and its UIDVALIDITY without a snapshot of its messages
        (CATENATE reads one message of it by URL). NotFound if it does not exist."""


class IMAPBackend(Protocol):
    """Turns LOGIN/AUTHENTICATE credentials into an account."""

    async def authenticate(self, username: str, password: str, peer: str) -> IMAPAccount:
        """Username = the inbox address, password = an API key of its organization.
        Raises Unauthenticated (same timing whether or not the inbox exists) or
        RateLimited when the peer or account is throttled."""
