"""The data an SMTP session carries: its limits, its state and its transaction.

Kept apart from :mod:`agentpost.smtp.server` (the I/O state machine) and
:mod:`agentpost.smtp.commands` (what each verb does) so that both can share them.
"""

from __future__ import annotations

import enum
import tempfile
from dataclasses import dataclass
from typing import IO

from twisted.internet import defer

from agentpost.smtp.interfaces import Envelope
from agentpost.smtp.parser import MAX_COMMAND_LINE_BYTES, MAX_DATA_LINE_BYTES, MailParams
from agentpost.smtp.replies import Reply

__all__ = ["Chunk", "Result", "SMTPLimits", "State", "Transaction"]


@dataclass(frozen=True)
class SMTPLimits:
    """Per-session limits.  Timeouts follow RFC 5321 §4.5.3.2; deadlines bound trickles.

    The server allows ``command_timeout_s`` (§4.5.3.2.7: at least 5 minutes) from its
    previous reply for the next command line to arrive *complete*: bytes trickling in
    do not extend it.  In a message body it waits ``data_block_timeout_s`` (§4.5.3.2.5:
    3 minutes) for each block, and in addition, as Postfix's ``smtpd_min_data_rate``
    does, the body must average ``min_data_rate_bytes_per_s`` once
    ``min_data_rate_grace_s`` have passed, and end within ``data_deadline_s``.  The
    whole session ends after ``session_deadline_s`` however busy it is (never while a
    delivery is in flight: that reply is sent first).  Each expiry answers
    ``421 4.4.2`` and closes; 0 disables a deadline or the rate.  A close the peer does
    not complete (a TLS peer that never answers close_notify, a client that does not
    read) is aborted after ``close_grace_s``.

    The delivery agent gets less time than the client waits for our reply (5 minutes
    for MAIL/RCPT, 10 for the end of data, §4.5.3.2.2-6) so a hung dependency
    becomes a ``451`` the client sees, not a client-side timeout.
    """

    max_message_size_bytes: int = 10_485_760
    max_recipients: int = 100
    max_errors: int = 10
    command_timeout_s: float = 300.0
    data_block_timeout_s: float = 180.0
    session_deadline_s: float = 600.0
    data_deadline_s: float = 300.0
    min_data_rate_bytes_per_s: int = 500
    min_data_rate_grace_s: float = 60.0
    close_grace_s: float = 10.0
    check_timeout_s: float = 240.0
    deliver_timeout_s: float = 540.0
    #: While a command is in flight, pause reading once this much input is queued.
    max_buffered_input_bytes: int = 256 * 1024
    max_command_line_bytes: int = MAX_COMMAND_LINE_BYTES
    max_data_line_bytes: int = MAX_DATA_LINE_BYTES
    #: Bodies up to this size stay in memory while spooled; larger ones go to disk.
    spool_memory_bytes: int = 1024 * 1024


class State(enum.Enum):
    """Where the session is.  Transitions are made only by the command handlers."""

    GREETING = "greeting"  # connected (or just after STARTTLS): EHLO/HELO needed
    READY = "ready"  # greeted, no mail transaction
    MAIL = "mail"  # MAIL FROM accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted (also between BDAT chunks)
    DATA = "data"  # reading a DATA body
    BDAT = "bdat"  # reading the octets of one BDAT chunk
    CLOSED = "closed"  # QUIT or 421 sent, or the connection is gone


BODY_STATES = frozenset({State.DATA, State.BDAT})


@dataclass
class Transaction:
    """One MAIL transaction in progress."""

    envelope: Envelope
    params: MailParams
    spool: IO[bytes] | None = None
    queue_id: str = ""
    header_bytes: int = 0
    body_bytes: int = 0
    too_large: bool = False
    chunked: bool = False  # BDAT has been used: DATA is no longer allowed

    def open_spool(self, headers: bytes, memory_bytes: int, spool_dir: str | None) -> None:
        """Start the spooled message with our trace ``headers`` (memory up to
        ``memory_bytes``, then a file in ``spool_dir``)."""
        spool = tempfile.SpooledTemporaryFile(  # closed by discard, or by the delivery
            max_size=memory_bytes, dir=spool_dir)
        spool.write(headers)
        self.spool = spool
        self.header_bytes = len(headers)
        self.body_bytes = 0

    def add_body(self, data: bytes, max_bytes: int) -> None:
        """Count body octets against ``max_bytes``; keep them only while under it (past
        it the spool is freed at once, and the rest is only counted)."""
        self.body_bytes += len(data)
        if self.too_large:
            return
        if self.body_bytes > max_bytes:
            self.too_large = True
            self.discard()
            return
        assert self.spool is not None
        self.spool.write(data)

    def discard(self) -> None:
        """Close (and so delete) the spooled body."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None


@dataclass
class Chunk:
    """The BDAT chunk being read."""

    remaining: int
    size: int
    last: bool
    verdict: Reply | None  # an error to answer once the octets are consumed
    resume_state: State


#: What a command handler returns: a reply now, one later, or none (QUIT, BDAT).
Result = Reply | defer.Deferred | None
