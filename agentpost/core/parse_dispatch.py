"""Where a message is parsed: on the reactor thread when small and plain, else in the pool.

Why: parsing is pure Python and holds the GIL, so a pool thread gave small messages no
parallelism, only two thread handoffs per message (the pool's queue, then the reactor's
waker) and GIL hand-overs between the reactor and up to ten pool threads, much of it kernel
time (futex) on the MX (issue 12). A plain 4 KiB message parses in about half a
millisecond, less than one GIL switch interval.

Size alone is not enough: the stdlib parser has shapes that cost far more than their size
suggests (a 6 KiB message of nested multiparts took 34 ms, 8 KiB of Content-Type
parameters 125 ms). On the reactor such a message would stall every session; in a pool
thread the reactor still gets the GIL every switch interval. So a message is parsed
inline only when a few byte counts (C speed, microseconds) show none of those shapes;
anything else, and anything large, goes to the pool as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import threads

T = TypeVar("T")

#: Messages up to this many bytes may be parsed on the reactor thread.
INLINE_PARSE_MAX_BYTES = 16 * 1024
#: ... and only with at most this many of each costly shape (see looks_plain).
MAX_HEADER_BYTES = 8 * 1024
MAX_HEADER_LINES = 150
MAX_HEADER_SPACES = 600  # tokens of structured and encoded-word parsing
#: What separates tokens of a structured header: the header parser's cost grows with
#: their count, whichever one a sender uses (8 KiB of tabs or commas in To: cost 80-110
#: ms where spaces were counted and they were not).
_TOKEN_SEPARATORS = (b" ", b"\t", b",", b"<", b"(", b'"', b":")
MAX_BOUNDARY_LINES = 8
MAX_SEMICOLONS = 24  # MIME parameters
MAX_ENCODED_WORDS = 32
MAX_AT_SIGNS = 64  # addresses and message ids


def looks_plain(raw: bytes, limit: int = INLINE_PARSE_MAX_BYTES) -> bool:
    """Whether ``raw`` is small and has none of the shapes that make parsing slow."""
    if len(raw) > limit:
        return False
    end = raw.find(b"\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    if end < 0:
        end = len(raw)
    return (end <= MAX_HEADER_BYTES
            and raw.count(b"\n", 0, end) <= MAX_HEADER_LINES
            and sum(raw.count(sep, 0, end) for sep in _TOKEN_SEPARATORS)
            <= MAX_HEADER_SPACES
            and raw.count(b"\n--") <= MAX_BOUNDARY_LINES
            and raw.count(b";") <= MAX_SEMICOLONS
            and raw.count(b"=?") <= MAX_ENCODED_WORDS
            and raw.count(b"@") <= MAX_AT_SIGNS)


async def analyse(reactor: Any, analyse_fn: Callable[[bytes], T], raw: bytes,
                  inline_max: int | None = None) -> T:
    """``analyse_fn(raw)``: inline when ``raw`` looks plain, else in the reactor's pool."""
    limit = INLINE_PARSE_MAX_BYTES if inline_max is None else inline_max
    if looks_plain(raw, limit):
        return analyse_fn(raw)
    return await threads.deferToThreadPool(reactor, reactor.getThreadPool(), analyse_fn, raw)
