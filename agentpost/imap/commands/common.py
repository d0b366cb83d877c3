"""Helpers every command module uses: argument counts, the write check, the session's
account and selected mailbox (asserted present: the table's states guarantee them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentpost.imap.errors import no
from agentpost.imap.interfaces import IMAPAccount
from agentpost.imap.parser import Command, ParseError
from agentpost.imap.selected import SelectedMailbox

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol


def arguments(command: Command, count: int, at_most: int | None = None) -> list[Any]:
    """The command's arguments, BAD unless there are ``count`` (to ``at_most``)."""
    args = command.args
    if len(args) < count or len(args) > (count if at_most is None else at_most):
        raise ParseError(f"Wrong number of arguments for {command.name}")
    return args


def require_write(session: IMAP4ServerProtocol) -> None:
    """NO [NOPERM] unless the login's key may change messages."""
    if session.account is None or not session.account.can_write:
        raise no("This key may not change messages (messages:write needed)", "NOPERM")


def require_writable(session: IMAP4ServerProtocol, view: SelectedMailbox) -> None:
    """As :func:`require_write`, and NO [READ-ONLY] in an EXAMINEd mailbox."""
    require_write(session)
    if view.readonly:
        raise no("Mailbox is read-only", "READ-ONLY")


def account(session: IMAP4ServerProtocol) -> IMAPAccount:
    """The logged-in account (commands valid in the authenticated states)."""
    assert session.account is not None
    return session.account


def selected(session: IMAP4ServerProtocol) -> SelectedMailbox:
    """The selected mailbox (commands valid in the selected state)."""
    assert session.selected is not None and session.account is not None
    return session.selected
