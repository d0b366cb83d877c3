"""NOTIFY (RFC 5465) at run time: which mailboxes a session watches, and the unsolicited
responses it owes when they change.

Why a module of its own: NOTIFY turns a session that speaks only when spoken to into
one that speaks at any time, and that is where a server corrupts its own output
(an EXPUNGE inside a FETCH, a STATUS inside a literal) or lets one client make it do
unbounded work. Here:

- **Only between commands.** Responses are written by :meth:`MailboxNotifier.run`,
  started through the session's ``run_unsolicited`` (which holds off the next command
  while it runs and refuses while one is in progress) or from IDLE's loop. A change
  seen during a command waits for its end (RFC 3501 §7.4.1, RFC 5465 §4); the command
  itself reports the selected mailbox's changes as it always did.
- **Wake-ups say "look again"**: a folder's key (its LISTEN/NOTIFY key) or "the
  folder list changed"; what changed is read from the store, so a lost or repeated
  wake-up cannot send a wrong response. Renames are told from delete + create by
  the folder's key (:attr:`agentpost.imap.interfaces.FolderInfo.key`).
- **Coalesced**: wake-ups within :data:`COALESCE_S` (on the injected clock) make one
  pass, so a burst of deliveries is one STATUS per mailbox.
- **Bounded**: pending work is a set of watched keys (at most
  :data:`MAX_WATCHED_MAILBOXES`) and two flags. More mailboxes than that, or a client
  that stops reading for :data:`OVERFLOW_BLOCKED_S`, ends notifications with
  ``* OK [NOTIFICATIONOVERFLOW]`` (RFC 5465 §5.8).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentpost.imap import rev2
from agentpost.imap.commands.fetch import fetch_for_notify
from agentpost.imap.errors import IMAPError, no
from agentpost.imap.interfaces import FolderInfo, FolderStatus
from agentpost.imap.parser import FetchItem, encode_mailbox
from agentpost.imap.states import State
from agentpost.imap.updates import report_changes
from agentpost.imap.wire import quote, status_text
from agentpost.model import errors

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

log = logging.getLogger(__name__)

#: Wake-ups closer together than this make one pass (one STATUS per mailbox).
COALESCE_S = 0.25
#: While a command is in progress, look again this much later.
RETRY_S = 0.25
#: Mailboxes one session may watch for message events (and 4x that many folders in all).
MAX_WATCHED_MAILBOXES = 500
#: A client that reads nothing for this long while notifications wait gets
#: NOTIFICATIONOVERFLOW instead of an ever-growing backlog.
OVERFLOW_BLOCKED_S = 30.0

MESSAGE_EVENTS = frozenset({"MessageNew", "MessageExpunge", "FlagChange"})
#: What BADEVENT lists (RFC 5465 §5.9: every event the server supports).
SUPPORTED_EVENTS = ("MessageNew", "MessageExpunge", "FlagChange", "MailboxName",
                    "SubscriptionChange")
SELECTED_FILTERS = ("SELECTED", "SELECTED-DELAYED")


@dataclass(frozen=True)
class EventGroup:
    """One ``(filter-mailboxes events)`` of NOTIFY SET.

    Attributes:
        filter: SELECTED SELECTED-DELAYED INBOXES PERSONAL SUBSCRIBED SUBTREE MAILBOXES.
        names: the mailboxes of SUBTREE and MAILBOXES.
        events: the supported events asked for (empty: NONE).
        fetch_items: MessageNew's fetch attributes (selected mailbox only).
    """

    filter: str
    names: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset()
    fetch_items: tuple[FetchItem, ...] = ()

    @property
    def message_events(self) -> bool:
        return "MessageNew" in self.events

    @property
    def delayed(self) -> bool:
        return self.filter == "SELECTED-DELAYED"

    def matches(self, info: FolderInfo) -> bool:
        """Whether this group's filter names the folder (RFC 5465 §6.2)."""
        name = info.name
        if self.filter == "PERSONAL":
            return True
        if self.filter == "INBOXES":
            return name == "INBOX"  # the one mailbox delivery writes to
        if self.filter == "SUBSCRIBED":
            return info.subscribed
        if name in self.names:
            return self.filter in ("MAILBOXES", "SUBTREE")
        if self.filter == "SUBTREE":
            cut = name.rfind("/")
            while cut > 0:  # linear in the name: each ancestor is one set lookup
                name = name[:cut]
                if name in self.names:
                    return True
                cut = name.rfind("/")
        return False


@dataclass(frozen=True)
class NotifySpec:
    """A whole NOTIFY SET: the groups for other mailboxes in the client's order (the
    first that names a mailbox decides its events), the selected mailbox's group."""

    groups: tuple[EventGroup, ...]
    selected: EventGroup | None
    status: bool


def _key(info: FolderInfo) -> str:
    return info.key or info.name


def _rev1_name(name: str) -> str:
    return quote(encode_mailbox(name))


def _list_line_for(info: FolderInfo, *, subscribed: bool = False,
                   oldname: str | None = None, wire: Callable[[str], str] = _rev1_name,
                   gone: bool = False) -> str:
    """An unsolicited LIST (RFC 5465 §5.4, §5.5; OLDNAME is RFC 5465's extended item)."""
    if gone:
        attrs = ["\\NonExistent"]
    else:
        attrs = ["\\HasChildren" if info.has_children else "\\HasNoChildren"]
        if info.special_use:
            attrs.append(info.special_use)
        if subscribed and info.subscribed:
            attrs.append("\\Subscribed")
    extra = f' ("OLDNAME" ({wire(oldname)}))' if oldname is not None else ""
    return f'* LIST ({" ".join(attrs)}) "/" {wire(info.name)}{extra}'


def _worth_telling(before: FolderStatus, now: FolderStatus, group: EventGroup) -> bool:
    """Whether a mailbox's new STATUS reports an event the group asked for: messages
    came or went (MessageNew/MessageExpunge), or only flags changed (FlagChange)."""
    if (before.messages, before.uidnext, before.uidvalidity) != \
            (now.messages, now.uidnext, now.uidvalidity):
        return True
    flags_changed = (before.unseen, before.highestmodseq) != (now.unseen, now.highestmodseq)
    return flags_changed and "FlagChange" in group.events


class MailboxNotifier:
    """One session's NOTIFY SET in effect: its watches, what is pending, the timer.

    Built and started by the NOTIFY command; the session holds it as ``notify`` and
    calls :meth:`selected_changed` when its selected folder signals, IDLE runs it when
    :attr:`due`, and :meth:`stop` ends it (NOTIFY NONE, a new NOTIFY SET, the end of
    the connection)."""

    def __init__(self, session: IMAP4ServerProtocol, spec: NotifySpec) -> None:
        assert session.account is not None
        self.session = session
        self.account = session.account
        self.spec = spec
        self.active = True
        self.due = False  # IDLE: run now
        self._idling = False
        self.folders: dict[str, FolderInfo] = {}  # the folder list as last seen, by key
        self._watches: dict[str, Callable[[], None]] = {}
        self._unwatch_list: Callable[[], None] | None = None
        self._pending: set[str] = set()  # watched keys whose folder signalled
        self._list_dirty = False
        self._selected_dirty = False
        self._overflowed = False
        self._last: dict[str, FolderStatus] = {}  # the STATUS last sent, by key
        self._timer: Any = None
        self._blocked_since: float | None = None
        self._selected_view: Any = None
        self._selected_key: str | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Watch the folder list, read it, watch the mailboxes with message events;
        NO [NOTIFICATIONOVERFLOW] (nothing watched) when they are too many."""
        if self.spec.groups:
            self._unwatch_list = self.account.watch_folder_list(self._list_changed)
        try:
            infos = await self.account.list_folders()
            self.folders = {_key(i): i for i in infos}
            wanted = self._wanted()
            if len(wanted) > MAX_WATCHED_MAILBOXES or \
                    len(self.folders) > 4 * MAX_WATCHED_MAILBOXES:
                raise no(f"Watch at most {MAX_WATCHED_MAILBOXES} mailboxes",
                         "NOTIFICATIONOVERFLOW")
            self._rewatch(wanted)
        except BaseException:
            self.stop()
            raise

    async def send_initial_status(self) -> None:
        """NOTIFY SET STATUS: a STATUS for every watched mailbox but the selected one
        (RFC 5465 §3.1), which also is the base later changes are compared with."""
        for key in sorted(self._watches, key=lambda k: self.folders[k].name):
            if not self._live():
                return
            await self._status(key, always=True)

    def stop(self) -> None:
        """No more watching, timers or responses."""
        self.active = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._unwatch_all()
        if self._unwatch_list is not None:
            unwatch, self._unwatch_list = self._unwatch_list, None
            self._unwatch(unwatch)
        self._pending.clear()
        self._last.clear()

    @property
    def idling(self) -> bool:
        return self._idling

    @idling.setter
    def idling(self, value: bool) -> None:
        """IDLE began or ended: what waited for its loop now waits for the timer."""
        self._idling = value
        if not value and (self.due or self._has_work()):
            self.due = False
            self._schedule()

    # ------------------------------------------------------------------ wake-ups

    def selected_changed(self) -> None:
        """The selected folder signalled: report it now if SELECTED asked for it."""
        if not self.active or self.spec.selected is None:
            return
        self._selected_dirty = True
        if self._idling:
            self.due = True  # the session wakes IDLE right after this
        else:
            self._schedule()

    def _folder_changed(self, key: str) -> None:
        if self.active and key in self._watches:
            self._pending.add(key)
            self._schedule()

    def _list_changed(self) -> None:
        if self.active:
            self._list_dirty = True
            self._schedule()

    def _has_work(self) -> bool:
        return self._overflowed or self._list_dirty or self._selected_dirty or \
            bool(self._pending)

    def _schedule(self, delay: float = COALESCE_S) -> None:
        if self._timer is None and self.active:
            self._timer = self.session.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if not self.active or not self._has_work():
            return
        if self._idling:
            self.due = True
            self.session.wake()
            return
        outcome = self.session.run_unsolicited(lambda: self.run(in_idle=False))
        if outcome in ("started", "closed"):
            self._blocked_since = None
            return
        if outcome == "blocked":
            now = self.session.clock.seconds()
            if self._blocked_since is None:
                self._blocked_since = now
            elif now - self._blocked_since >= OVERFLOW_BLOCKED_S:
                self._overflow()
        else:
            self._blocked_since = None
        self._schedule(RETRY_S)

    def _overflow(self) -> None:
        """Too much to watch or to tell: stop watching now (nothing more piles up);
        the next pass says so (RFC 5465 §5.8)."""
        self._overflowed = True
        self._unwatch_all()
        if self._unwatch_list is not None:
            unwatch, self._unwatch_list = self._unwatch_list, None
            self._unwatch(unwatch)
        self._pending.clear()
        self._list_dirty = self._selected_dirty = False

    # ------------------------------------------------------------------ one pass

    def _live(self) -> bool:
        session = self.session
        return self.active and session.notify is self and \
            session.state is not State.LOGOUT and not session.bye_sent

    async def run(self, in_idle: bool) -> None:
        """Send what is pending: LIST for folder-list changes, the selected mailbox's
        EXISTS/EXPUNGE/FETCH, STATUS for the others -- or NOTIFICATIONOVERFLOW."""
        self.due = False
        if not self._live():
            return
        if self._list_dirty and not self._overflowed:
            self._list_dirty = False
            await self._relist()
        if self._overflowed:
            if self._live():
                self.session.send("* OK [NOTIFICATIONOVERFLOW] Too many notifications; "
                                  "NOTIFY NONE is in effect")
                self.session.notify = None
            self.stop()
            return
        if self._selected_dirty and self._live():
            self._selected_dirty = False
            await self._report_selected(in_idle)
        keys, self._pending = self._pending, set()
        for key in sorted(keys, key=lambda k: self.folders[k].name if k in self.folders
                          else k):
            if not self._live():
                return
            await self._status(key)
        if self._live() and self._has_work() and not in_idle:
            self._schedule()

    async def _report_selected(self, in_idle: bool) -> None:
        """EXISTS/EXPUNGE/FETCH as after NOOP; then MessageNew's fetch attributes for
        the messages this pass announced. SELECTED-DELAYED keeps expunges for the next
        command that may report them (IDLE may)."""
        group, session = self.spec.selected, self.session
        view = session.selected
        if group is None or view is None or session.state is not State.SELECTED:
            return
        before = view.top_uid
        await report_changes(session, expunge=in_idle or not group.delayed)
        if not group.fetch_items or session.selected is not view or not self._live():
            return
        new = view.uids[bisect.bisect_right(view.uids, before):]
        if new:
            try:
                await fetch_for_notify(session, view, new, list(group.fetch_items))
            except IMAPError:
                pass  # expunged meanwhile: its EXPUNGE comes in a later pass

    async def _status(self, key: str, *, always: bool = False) -> None:
        """``* STATUS`` for a watched mailbox that is not the selected one, when it
        reports an event its group asked for (RFC 5465 §5.1-§5.3)."""
        info = self.folders.get(key)
        if info is None or self._is_selected(key):
            return
        group = self._group_for(info)
        if group is None or not group.message_events:
            return
        try:
            st = await self.account.status(info.name)
        except errors.NotFound:
            self._list_dirty = True  # renamed or deleted meanwhile: read the list again
            return
        except errors.AgentPostError as exc:
            if exc.temporary and key in self._watches:
                self._pending.add(key)  # the next pass tries again
            return
        if not self._live():
            return
        before = self._last.get(key)
        self._last[key] = st
        if before is not None and not always and not _worth_telling(before, st, group):
            return
        session = self.session
        items = ["MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN"]
        if session.condstore or session.qresync or "FlagChange" in group.events:
            # RFC 5465 §5.2: with FlagChange monitored the STATUS carries HIGHESTMODSEQ
            # (a flag change moves nothing else STATUS shows), CONDSTORE enabled or not.
            items.append("HIGHESTMODSEQ")
        session.send(f"* STATUS {rev2.mailbox_wire(session, info.name)} "
                     f"({status_text(st, items)})")

    async def _relist(self) -> None:
        """Read the folder list again and tell what changed (by key: a rename keeps
        its key) as LIST responses: MailboxName (§5.4), SubscriptionChange (§5.5)."""
        infos = await self.account.list_folders()
        if not self._live():
            return
        old, self.folders = self.folders, {_key(i): i for i in infos}
        self._selected_view = None  # names may have changed: find the selected one again
        lines: list[tuple[str, str]] = []
        session = self.session

        def _list_line(info: FolderInfo, **kw: Any) -> str:
            return _list_line_for(info, wire=lambda n: rev2.mailbox_wire(session, n), **kw)

        for key, info in self.folders.items():
            was = old.get(key)
            if was is None:
                if self._wants(info, "MailboxName"):
                    lines.append((info.name, _list_line(info)))
            elif was.name != info.name:
                if self._wants(info, "MailboxName") or self._wants(was, "MailboxName"):
                    lines.append((info.name, _list_line(info, oldname=was.name)))
            elif was.subscribed != info.subscribed and \
                    self._wants(info, "SubscriptionChange"):
                lines.append((info.name, _list_line(info, subscribed=True)))
        for key in old.keys() - self.folders.keys():
            was = old[key]
            self._last.pop(key, None)
            if self._wants(was, "MailboxName"):
                lines.append((was.name, _list_line(was, gone=True)))
        for _, line in sorted(lines):
            self.session.send(line)
        wanted = self._wanted()
        if len(wanted) > MAX_WATCHED_MAILBOXES or \
                len(self.folders) > 4 * MAX_WATCHED_MAILBOXES:
            self._overflow()
            return
        self._rewatch(wanted)

    # ------------------------------------------------------------------ which mailboxes

    def _group_for(self, info: FolderInfo) -> EventGroup | None:
        """The first group (in the client's order) whose filter names the folder."""
        return next((g for g in self.spec.groups if g.matches(info)), None)

    def _wants(self, info: FolderInfo, event: str) -> bool:
        group = self._group_for(info)
        return group is not None and event in group.events

    def _wanted(self) -> set[str]:
        """The keys of the folders whose group asks for message events."""
        out = set()
        for key, info in self.folders.items():
            group = self._group_for(info)
            if group is not None and group.message_events:
                out.add(key)
        return out

    def _is_selected(self, key: str) -> bool:
        session = self.session
        view = session.selected
        if view is None or session.state is not State.SELECTED:
            return False
        if view is not self._selected_view:
            self._selected_view = view
            self._selected_key = next((k for k, i in self.folders.items()
                                       if i.name == view.name), None)
        return key == self._selected_key

    def _rewatch(self, wanted: set[str]) -> None:
        for key in list(self._watches.keys() - wanted):
            self._unwatch(self._watches.pop(key))
            self._pending.discard(key)
        for key in wanted - self._watches.keys():
            self._watches[key] = self.account.watch_folder(
                key, lambda key=key: self._folder_changed(key))  # type: ignore[misc]

    def _unwatch_all(self) -> None:
        watches, self._watches = self._watches, {}
        for unwatch in watches.values():
            self._unwatch(unwatch)

    def _unwatch(self, unwatch: Callable[[], None]) -> None:
        try:
            unwatch()
        except Exception:
            log.exception("imap %s: unwatch failed", self.session.session_id)
