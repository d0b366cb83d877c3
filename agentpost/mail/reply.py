"""Extract the new part of a reply, without the quoted history below it.

Heuristic, like every mail client's: cut at the first attribution line ("On … wrote:"
in several languages), an Outlook-style "Original Message" separator, or a run of
">"-quoted lines at the end; keep everything above.
"""

from __future__ import annotations

import re

_ATTRIBUTION = re.compile(
    r"^\s*(On\s.+wrote:|Le\s.+a écrit\s?:|Am\s.+schrieb.*:|El\s.+escribió:|"
    r"Il giorno\s.+ha scritto:|Op\s.+schreef.*:)\s*$",
    re.IGNORECASE,
)
_SEPARATOR = re.compile(r"^\s*(-{2,}\s*Original Message\s*-{2,}|_{10,}|From:\s.+)\s*$",
                        re.IGNORECASE)


def extract_new_text(text: str | None) -> str | None:
    """The author's new text; the whole text when nothing looks quoted."""
    if text is None:
        return None
    lines = text.replace("\r\n", "\n").split("\n")
    cut = len(lines)
    for i, line in enumerate(lines):
        if _ATTRIBUTION.match(line) or _SEPARATOR.match(line):
            cut = i
            break
        # A two-line attribution ("On Mon, … <a@b>\nwrote:") is common too.
        if i + 1 < len(lines) and line.strip().startswith("On ") and \
                lines[i + 1].strip().endswith("wrote:"):
            cut = i
            break
    kept = lines[:cut]
    while kept and (kept[-1].strip() == "" or kept[-1].lstrip().startswith(">")):
        kept.pop()
    return "\n".join(kept).strip()
