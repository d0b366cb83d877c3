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


def extract_new_text(text: str | None) -> str | None:
    """The author's new text; the whole text when nothing looks quoted.

    Walks the text line by line by offset (no list of every line), so a 10 MB body
    costs one copy of what is kept, not several.
    """
    if text is None:
        return None
    n = len(text)
    cut = n
    pos = 0
    prev_start, prev_line = -1, None
    while True:
        nl = text.find("\n", pos)
        end = n if nl < 0 else nl
        line = text[pos:end].removesuffix("\r")
        # A two-line attribution ("On Mon, ... <a@b>\nwrote:") is common too.
        if prev_line is not None and prev_line.strip().startswith("On ") and \
                line.strip().endswith("wrote:"):
            cut = prev_start
            break
        if _ATTRIBUTION.match(line) or _SEPARATOR.match(line):
            cut = pos
            break
        if nl < 0:
            break
        prev_start, prev_line = pos, line
        pos = nl + 1
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
