"""Section work on messages with very many lines goes to the reactor's thread pool.

Why: cutting a body section out of a stored message (``imapformat.section``,
``filter_header_fields``) walks header blocks line by line in Python, about 3 µs a line.
A stranger can mail an inbox a message whose header is a megabyte of short fields or
folded lines (300,000 of them took ~300 ms); every client that then asks for its
``BODY.PEEK[HEADER.FIELDS (...)]`` -- Thunderbird does for each new message -- would
stop the reactor, and every session of every tenant, for that long. A newline count
(C speed) tells the few such messages apart; they are cut in a pool thread, where the
reactor still gets the GIL every switch interval. Ordinary mail stays inline: a thread
hop costs more than cutting a section of a message of a few hundred lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

T = TypeVar("T")

#: Inputs with at most this many lines are cut on the reactor (a few ms at worst).
INLINE_MAX_LINES = 2000


async def cut(clock: Any, fn: Callable[..., T], data: bytes, *args: Any) -> T:
    """``fn(data, *args)``, inline when ``data`` is short in lines, else in the thread
    pool of ``clock`` (the session's reactor; a test's task.Clock has none: inline)."""
    if data.count(b"\n") <= INLINE_MAX_LINES or not IReactorThreads.providedBy(clock):
        return fn(data, *args)
    threads = cast(Any, clock)
    return await deferToThreadPool(threads, threads.getThreadPool(), fn, data, *args)
