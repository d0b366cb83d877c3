"""IDLE (RFC 2177): report the selected mailbox's changes as they happen, until DONE."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentpost.imap.commands.common import arguments
from agentpost.imap.errors import bad
from agentpost.imap.parser import Command
from agentpost.imap.states import State
from agentpost.imap.updates import report_changes

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol


async def idle(session: IMAP4ServerProtocol, command: Command) -> str:
    arguments(command, 0)
    session.send("+ idling")
    done: list[bytes] = []  # the line that ends IDLE
    view = session.selected
    if session.state is State.SELECTED and view is not None:
        view.dirty = True  # RFC 2177: report what is pending now

    def on_line(line: bytes) -> None:
        done.append(line)
        session.wake()

    session.set_line_handler(on_line)
    if session.notify is not None:
        session.notify.idling = True  # its events come through this loop (RFC 5465)
    try:
        while not done and session.state is not State.LOGOUT:
            notify = session.notify
            if notify is not None and notify.due:
                await notify.run(in_idle=True)
                continue
            view = session.selected
            if session.state is State.SELECTED and view is not None and view.dirty:
                await report_changes(session, expunge=True)
                continue
            await session.wait_for_wake()
    finally:
        session.clear_line_handler(on_line)
        if session.notify is not None:
            session.notify.idling = False
    if done and done[0].strip().upper() != b"DONE":
        raise bad("Expected DONE")
    return "IDLE terminated"
