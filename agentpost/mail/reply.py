"""Extract the new part of a reply, without the quoted history below it.

Heuristic, like every mail client's: cut at the first attribution line ("On … wrote:"
in several languages), an Outlook-style "Original Message" separator, or a run of
">"-quoted lines at the end; keep everything above.
"""

from __future__ import annotations

import re

# "schrieb"/"schreef" are found by a lookahead, which never backtracks into itself:
# as ``.+schrieb.*:`` the engine tried every occurrence against every colon after it,
# and a one-line body of "Am schriebschrieb..." from a stranger took minutes.
_ATTRIBUTION = re.compile(
    r"^\s*(On\s.+wrote:|Le\s.+a écrit\s?:|Am\s(?=.+schrieb).*:|El\s.+escribió:|"
    r"Il giorno\s.+ha scritto:|Op\s(?=.+schreef).*:)\s*$",
    re.IGNORECASE,
)
_SEPARATOR = re.compile(r"^\s*(-{2,}\s*Original Message\s*-{2,}|_{10,}|From:\s.+)\s*$",
                        re.IGNORECASE)
#: Every line the patterns above (or a two-line "On ...\nwrote:") can match holds one of
#: these (":" ends each attribution and "From:"; the separators have "--" or "_" x 10),
#: none a letter, so case-folding cannot match them otherwise. Only lines holding one
#: are tested: a few C-speed scans instead of two regex matches per line (a quarter of
#: ingest's analysis of an ordinary message).
_MARKS = (":", "--", "_" * 10)


class _Candidates:
    """Offsets of the marks in order; each mark is searched forward only, so the
    whole walk stays linear however many lines hold one."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._next = [text.find(mark) for mark in _MARKS]

    def first_from(self, start: int) -> int:
        """The first mark at or after ``start``; -1: none."""
        best = -1
        for i, found in enumerate(self._next):
            if 0 <= found < start:
                found = self._next[i] = self._text.find(_MARKS[i], start)
            if found >= 0 and (best < 0 or found < best):
                best = found
        return best


def extract_new_text(text: str | None) -> str | None:
    """The author's new text; the whole text when nothing looks quoted.

    Walks the text by offset (no list of every line), so a 10 MB body costs one copy
    of what is kept, not several; only lines that could be a cut are looked at.
    """
    if text is None:
        return None
    n = len(text)
    cut = n
    search_from = 0
    marks = _Candidates(text)
    while (hit := marks.first_from(search_from)) >= 0:
        pos = text.rfind("\n", 0, hit) + 1
        nl = text.find("\n", hit)
        line = text[pos:n if nl < 0 else nl].removesuffix("\r")
        # A two-line attribution ("On Mon, ... <a@b>\nwrote:") is common too.
        if pos > 0 and line.strip().endswith("wrote:"):
            prev_start = text.rfind("\n", 0, pos - 1) + 1
            if text[prev_start:pos - 1].removesuffix("\r").strip().startswith("On "):
                cut = prev_start
                break
        if _ATTRIBUTION.match(line) or _SEPARATOR.match(line):
            cut = pos
            break
        if nl < 0:
            break
        search_from = nl + 1
    if cut == 0:
        return ""
    end = n if cut == n else cut - 1  # without the newline before the cut line
    # Drop trailing blank and ">"-quoted lines.
    while end > 0:
        start = text.rfind("\n", 0, end) + 1
        last = text[start:end]
        if last.strip() != "" and not last.lstrip().startswith(">"):
            break
        end = start - 1 if start > 0 else 0
    return text[:end].replace("\r\n", "\n").strip()
