"""IMAP mailbox patterns (LIST, LSUB, LIST-EXTENDED; RFC 3501 §6.3.8) in linear time.

Why not a regex: translating ``*`` to ``.*`` and ``%`` to ``[^/]*`` gives a
backtracking regex whose cost grows exponentially with the number of wildcards, so
``LIST "" "*%*%*%...*%b"`` held the reactor (every tenant's sessions) for minutes.

Here the patterns of one command become one non-deterministic automaton, simulated
with the states held as the bits of an integer (the "shift-and" technique): each
character of a mailbox name costs a few integer operations on a bit set as wide as
the patterns, whatever their shape, so matching is O(len(name) * len(patterns) / 64).
Runs of wildcards are collapsed first (``%*`` and ``*%`` mean ``*``; ``%%`` means
``%``), and the patterns' total length is capped (:data:`MAX_PATTERN_CHARS`).

Semantics: ``*`` matches any characters, the hierarchy delimiter included; ``%``
matches any characters except the delimiter; every other character matches itself.
A name is matched case-insensitively when the caller asks (INBOX, RFC 3501 §5.1).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["DELIMITER", "MAX_PATTERNS", "MAX_PATTERN_CHARS", "PatternSet", "PatternTooLong",
           "collapse"]

#: The server's hierarchy delimiter (LIST answers ``"/"``).
DELIMITER = "/"
#: Characters of all the patterns of one command, reference names included.
MAX_PATTERN_CHARS = 1024
#: Patterns of one LIST-EXTENDED command.
MAX_PATTERNS = 64


class PatternTooLong(ValueError):
    """The patterns exceed :data:`MAX_PATTERN_CHARS` or :data:`MAX_PATTERNS`."""


def collapse(pattern: str) -> str:
    """The equivalent pattern without runs of wildcards: a run holding a ``*`` is
    ``*``, a run of ``%`` alone is ``%`` (what a run can match does not change)."""
    out: list[str] = []
    for ch in pattern:
        if ch in "*%" and out and out[-1] in "*%":
            if ch == "*":
                out[-1] = "*"
            continue
        out.append(ch)
    return "".join(out)


class PatternSet:
    """Several patterns matched together: a name matches when any pattern does.

    Bit ``k`` of the state set means "the first k tokens of some pattern have
    matched a prefix of the name"; each pattern owns a block of bits (its start
    state then one state per token), so all patterns advance in one step.
    """

    def __init__(self, patterns: Iterable[str], *, delimiter: str = DELIMITER) -> None:
        patterns = list(patterns)
        if len(patterns) > MAX_PATTERNS:
            raise PatternTooLong(f"Too many mailbox patterns (at most {MAX_PATTERNS})")
        if sum(len(p) for p in patterns) > MAX_PATTERN_CHARS:
            raise PatternTooLong(
                f"Mailbox pattern too long (at most {MAX_PATTERN_CHARS} characters)")
        self._delimiter = delimiter
        self._start = 0  # each pattern's start state
        self._accept = 0  # each pattern's final state
        self._star = 0  # states with a self-loop on any character
        self._percent = 0  # states with a self-loop on anything but the delimiter
        self._chars: dict[str, int] = {}  # character -> states entered by reading it
        self._folded: dict[str, int] = {}  # the same, case-folded
        bit = 0
        for pattern in patterns:
            self._start |= 1 << bit
            for ch in collapse(pattern):
                bit += 1
                if ch == "*":
                    self._star |= 1 << bit
                elif ch == "%":
                    self._percent |= 1 << bit
                else:
                    self._chars[ch] = self._chars.get(ch, 0) | 1 << bit
                    low = ch.lower()
                    self._folded[low] = self._folded.get(low, 0) | 1 << bit
            self._accept |= 1 << bit
            bit += 1
        self._wild = self._star | self._percent
        self.steps = 0  # characters read so far (tests bound the work with it)

    def _closure(self, states: int) -> int:
        # A wildcard may match nothing: entering the state before it enters its own
        # state too. Wildcards never follow each other (collapse), so one step suffices.
        return states | (states << 1) & self._wild

    def matches(self, name: str, *, fold_case: bool = False) -> bool:
        """Whether ``name`` matches any of the patterns (``fold_case``: ignoring case)."""
        table = self._folded if fold_case else self._chars
        states = self._closure(self._start)
        for ch in name.lower() if fold_case else name:
            self.steps += 1
            loops = self._star if ch == self._delimiter else self._wild
            states = self._closure(((states << 1) & table.get(ch, 0)) | (states & loops))
            if not states:
                return False
        return bool(states & self._accept)

    def match_prefixes(self, name: str, *, fold_case: bool = False) -> tuple[bool, list[str]]:
        """Whether ``name`` matches, and which of its parents (the prefixes ending just
        before a delimiter) match: the same single pass over ``name`` as :meth:`matches`,
        so listing a folder's ancestors costs nothing more."""
        table = self._folded if fold_case else self._chars
        states = self._closure(self._start)
        parents: list[str] = []
        for i, ch in enumerate(name.lower() if fold_case else name):
            self.steps += 1
            if ch == self._delimiter and states & self._accept:
                parents.append(name[:i])
            loops = self._star if ch == self._delimiter else self._wild
            states = self._closure(((states << 1) & table.get(ch, 0)) | (states & loops))
            if not states:
                return False, parents
        return bool(states & self._accept), parents
