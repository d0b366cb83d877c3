"""NOTIFY (RFC 5465): ``NOTIFY SET [STATUS] (filter (events)) ...`` and ``NOTIFY NONE``.

This module reads the command and checks it as the RFC requires (BAD for what §5 and
§6 forbid, ``NO [BADEVENT (...)]`` for events this server does not support); the
watching and the unsolicited responses are :mod:`agentpost.imap.notifier_state`'s.

Supported: the filters SELECTED, SELECTED-DELAYED, INBOXES (INBOX: delivery's only
destination), PERSONAL, SUBSCRIBED, SUBTREE and MAILBOXES; the events MessageNew
(with fetch attributes for the selected mailbox), MessageExpunge, FlagChange,
MailboxName and SubscriptionChange. AnnotationChange, MailboxMetadataChange and
ServerMetadataChange (no ANNOTATE or METADATA here) and unknown events are BADEVENT.
MessageNew's fetch attributes are honoured for the selected mailbox; for others the
RFC's STATUS is sent instead, so they are accepted and have no effect there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agentpost.imap import rev2
from agentpost.imap.errors import no
from agentpost.imap.notifier_state import (
    MESSAGE_EVENTS,
    SELECTED_FILTERS,
    SUPPORTED_EVENTS,
    EventGroup,
    MailboxNotifier,
    NotifySpec,
)
from agentpost.imap.parser import (
    Atom,
    Command,
    FetchItem,
    ParseError,
    mailbox,
    parse_fetch_items,
)
from agentpost.imap.states import State

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

#: Every event name RFC 5465 defines, by its upper-case spelling.
_KNOWN_EVENTS = {e.upper(): e for e in (*SUPPORTED_EVENTS, "AnnotationChange",
                                        "MailboxMetadataChange", "ServerMetadataChange")}
_PLAIN_FILTERS = ("SELECTED", "SELECTED-DELAYED", "INBOXES", "PERSONAL", "SUBSCRIBED")
_NAMED_FILTERS = ("SUBTREE", "MAILBOXES")
#: Groups in one NOTIFY SET (a client names a handful; each costs every folder a test).
MAX_GROUPS = 32


async def notify(session: IMAP4ServerProtocol, command: Command) -> str:
    args = command.args
    if not args or not isinstance(args[0], Atom):
        raise ParseError("NOTIFY needs SET or NONE")
    verb = args[0].upper()
    if verb == "NONE":
        if len(args) != 1:
            raise ParseError("NOTIFY NONE takes no arguments")
        _stop(session)
        return "NOTIFY completed"
    if verb != "SET":
        raise ParseError("NOTIFY needs SET or NONE")
    spec = parse_notify_set(args[1:], lambda token: rev2.mailbox_arg(session, token))
    notifier = MailboxNotifier(session, spec)
    await notifier.start()
    if session.state is State.LOGOUT:
        notifier.stop()
        return "NOTIFY completed"
    _stop(session)
    session.notify = notifier
    if spec.status:
        await notifier.send_initial_status()
    return "NOTIFY completed"


def _stop(session: IMAP4ServerProtocol) -> None:
    if session.notify is not None:
        old, session.notify = session.notify, None
        old.stop()


def parse_notify_set(args: list[Any],
                     decode: Callable[[Any], str] = mailbox) -> NotifySpec:
    """``[STATUS] event-group *(SP event-group)``: BAD for syntax and for what RFC
    5465 §5/§6 forbid, then NO [BADEVENT] if an event is not supported."""
    status = bool(args) and isinstance(args[0], Atom) and args[0].upper() == "STATUS"
    groups_args = args[1:] if status else args
    if not groups_args:
        raise ParseError("NOTIFY SET needs at least one event group")
    if len(groups_args) > MAX_GROUPS:
        raise ParseError(f"At most {MAX_GROUPS} event groups")
    unsupported: set[str] = set()
    groups: list[EventGroup] = []
    selected: EventGroup | None = None
    for token in groups_args:
        group = _group(token, unsupported, decode)
        if group.filter in SELECTED_FILTERS:
            if selected is not None:
                raise ParseError("Only one of SELECTED and SELECTED-DELAYED may be given")
            selected = group
        else:
            groups.append(group)
    if unsupported:
        raise no(f"Unsupported event {sorted(unsupported)[0]}",
                 f"BADEVENT ({' '.join(SUPPORTED_EVENTS)})")
    return NotifySpec(tuple(groups), selected if selected and selected.events else None,
                      status)


def _group(token: Any, unsupported: set[str], decode: Callable[[Any], str]) -> EventGroup:
    """``(filter-mailboxes events)``."""
    if not isinstance(token, list) or not token or not isinstance(token[0], Atom):
        raise ParseError("An event group is (filter-mailboxes events)")
    name = token[0].upper()
    names: frozenset[str] = frozenset()
    if name in _PLAIN_FILTERS:
        if len(token) != 2:
            raise ParseError(f"{name} takes only a list of events")
    elif name in _NAMED_FILTERS:
        if len(token) != 3:
            raise ParseError(f"{name} takes mailboxes and a list of events")
        names = _mailboxes(token[1], decode)
    else:
        raise ParseError(f"Unknown mailbox filter {token[0]!s}")
    events, fetch_items, refused = _events(token[-1])
    _check_events(name, events | refused)
    unsupported |= refused
    if fetch_items and "MessageNew" not in events:
        raise ParseError("Fetch attributes belong to MessageNew")
    return EventGroup(name, names, frozenset(events & set(SUPPORTED_EVENTS)),
                      tuple(fetch_items) if name in SELECTED_FILTERS else ())


def _mailboxes(token: Any, decode: Callable[[Any], str]) -> frozenset[str]:
    """``one-or-more-mailbox``: a mailbox or a parenthesized list of them."""
    tokens = token if isinstance(token, list) else [token]
    if not tokens:
        raise ParseError("Empty mailbox list")
    return frozenset(decode(t) for t in tokens)


def _events(token: Any) -> tuple[set[str], list[FetchItem], set[str]]:
    """``"(" event *(SP event) ")" / "NONE"``; MessageNew may carry fetch attributes.
    Returns the supported events, the fetch attributes, and the events this server
    does not support (BADEVENT, once the whole command passed the BAD checks)."""
    if isinstance(token, Atom) and token.upper() == "NONE":
        return set(), [], set()
    if not isinstance(token, list) or not token:
        raise ParseError("Events are a parenthesized list or NONE")
    events: set[str] = set()
    unsupported: set[str] = set()
    fetch_items: list[FetchItem] = []
    i = 0
    while i < len(token):
        item = token[i]
        if not isinstance(item, Atom):
            raise ParseError("An event is an atom")
        event = _KNOWN_EVENTS.get(item.upper(), str(item))
        if event in SUPPORTED_EVENTS:
            events.add(event)
        else:
            unsupported.add(event)
        if event == "MessageNew" and i + 1 < len(token) and isinstance(token[i + 1], list):
            fetch_items = _fetch_items(token[i + 1])
            i += 1
        i += 1
    return events, fetch_items, unsupported


def _check_events(filter_name: str, events: set[str]) -> None:
    """RFC 5465 §5: MessageNew and MessageExpunge together; FlagChange and
    AnnotationChange only with both. §6.1: only message events for the selected
    mailbox. Each is BAD."""
    if ("MessageNew" in events) != ("MessageExpunge" in events):
        raise ParseError("MessageNew and MessageExpunge go together")
    if events & {"FlagChange", "AnnotationChange"} and "MessageNew" not in events:
        raise ParseError("FlagChange needs MessageNew and MessageExpunge")
    if filter_name in SELECTED_FILTERS and events - MESSAGE_EVENTS - {"AnnotationChange"}:
        raise ParseError(f"{filter_name} takes only message events")


def _fetch_items(token: Any) -> list[FetchItem]:
    """MessageNew's fetch attributes. A notification never sets \\Seen: BODY[...] is
    read as BODY.PEEK[...] (the response is the same), and RFC822 / RFC822.TEXT, whose
    only difference from BODY.PEEK is \\Seen, are refused (RFC 5465 §5.2: SHOULD NOT)."""
    if not isinstance(token, list) or not token:
        raise ParseError("MessageNew's fetch attributes are a parenthesized list")
    items = parse_fetch_items(token)
    out = []
    for item in items:
        if item.name in ("RFC822", "RFC822.TEXT"):
            raise ParseError(f"{item.name} would set \\Seen; use BODY.PEEK")
        out.append(FetchItem(item.name, item.section, True) if item.section else item)
    return out
