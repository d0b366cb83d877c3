"""When an SMTP client must have done what: the session's clock, as plain arithmetic.

Why not idle timers alone: an idle timer restarted by every byte lets one byte every
20 seconds hold a session (and a connection slot) forever.  Here only *progress*
moves a deadline: a reply of ours (the next command line must then be complete within
``command_timeout_s``), or body octets, which earn time at the minimum data rate
(Postfix's ``smtpd_min_data_rate`` model).  Over all of that sit a per-message body
deadline and a whole-session deadline.

The protocol asks :meth:`SessionDeadlines.next` for the earliest deadline that applies
in its current phase and keeps one timer for it; this module never touches a reactor,
so it is tested with plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentpost.smtp.session import SMTPLimits

__all__ = ["Expiry", "SessionDeadlines"]


@dataclass(frozen=True)
class Expiry:
    """A deadline: when, and what the 421 says about it."""

    at: float
    reason: str  # for the log
    text: str  # for the client


_SESSION = ("session deadline", "Error: session time limit exceeded")
_COMMAND = ("command timeout", "Error: timeout exceeded")
_BLOCK = ("data block timeout", "Error: timeout exceeded")
_DATA = ("data deadline", "Error: message transfer time limit exceeded")
_RATE = ("minimum data rate", "Error: data transfer too slow")


class SessionDeadlines:
    """The deadlines of one session, fed with clock readings by the protocol."""

    def __init__(self, limits: SMTPLimits, now: float) -> None:
        self.limits = limits
        self.session_ends = now + limits.session_deadline_s if limits.session_deadline_s \
            else None
        self.command_due = now + limits.command_timeout_s
        self.body_started: float | None = None
        self.body_bytes = 0
        self.last_body_at = now

    def replied(self, now: float) -> None:
        """We answered: the next command line is due ``command_timeout_s`` from now."""
        self.command_due = now + self.limits.command_timeout_s

    def body_begins(self, now: float) -> None:
        """A message body (DATA, or the first BDAT chunk) starts; no-op if it has."""
        if self.body_started is None:
            self.body_started = now
            self.body_bytes = 0
            self.last_body_at = now

    def body_received(self, count: int, now: float) -> None:
        """Body octets arrived (counted before dot-unstuffing or size checks)."""
        self.body_begins(now)
        self.body_bytes += count
        self.last_body_at = now

    def body_ends(self) -> None:
        """The transaction's body is over (delivered, refused or reset)."""
        self.body_started = None
        self.body_bytes = 0

    def next(self, in_body: bool) -> Expiry | None:
        """The earliest deadline of the current phase (None: no deadline at all). The
        first of equal ones wins, in the order session, block, whole body, data rate
        (or session, command). Plain comparisons: it runs after every reply and every
        read of a body, and only the winner is made an :class:`Expiry`."""
        at, which = self.session_ends, _SESSION
        if in_body:
            limits = self.limits
            started = self.body_started if self.body_started is not None \
                else self.last_body_at
            candidate = self.last_body_at + limits.data_block_timeout_s
            if at is None or candidate < at:
                at, which = candidate, _BLOCK
            if limits.data_deadline_s:
                candidate = started + limits.data_deadline_s
                if candidate < at:
                    at, which = candidate, _DATA
            if limits.min_data_rate_bytes_per_s:
                candidate = (started + limits.min_data_rate_grace_s
                             + self.body_bytes / limits.min_data_rate_bytes_per_s)
                if candidate < at:
                    at, which = candidate, _RATE
        elif at is None or self.command_due < at:
            at, which = self.command_due, _COMMAND
        return None if at is None else Expiry(at, *which)
