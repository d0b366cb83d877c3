"""The base subject of RFC 5256 section 2.1, which SORT SUBJECT (and THREAD) compares.

The input is the subject with its RFC 2047 encoded words already decoded (step 1's
decoding: what :mod:`agentpost.mail.parse` stores). Everything here scans by index (the one
regular expression is a single character class): a hostile subject of a megabyte of
``[`` costs linear time.

Grammar (RFC 5256 section 5), matched case-insensitively::

    subj-refwd   = ("re" / ("fw" ["d"])) *WSP [subj-blob] ":"
    subj-blob    = "[" *BLOBCHAR "]" *WSP
    subj-fwd-hdr = "[fwd:"
    subj-fwd-trl = "]"
    subj-leader  = (*subj-blob subj-refwd) / WSP
    subj-trailer = "(fwd)" / WSP
"""

from __future__ import annotations

import re

_WHITESPACE = frozenset(" \t\r\n")
_BRACKET = re.compile(r"[\[\]]")  # one character class: a linear scan, no backtracking


def _collapse(text: str) -> str:
    """Step 1's rest: tabs and line breaks become spaces, runs of spaces one space."""
    out: list[str] = []
    space = False
    for ch in text:
        if ch in _WHITESPACE:
            space = True
            continue
        if space:  # (a leading one is a subj-leader, a trailing one a subj-trailer)
            out.append(" ")
        space = False
        out.append(ch)
    if space:
        out.append(" ")
    return "".join(out)


def _blob_end(s: str, pos: int, end: int) -> int | None:
    """End of a subj-blob (with its trailing WSP) starting at ``pos``, or None."""
    if pos >= end or s[pos] != "[":
        return None
    # Only as far as the nearest bracket: finding "]" first scanned to the far end of
    # "[fwd:[fwd:...]]" once per "[fwd:" peeled (quadratic: 1 MB took 2 s).
    bracket = _BRACKET.search(s, pos + 1, end)
    if bracket is None or bracket.group() == "[":  # BLOBCHAR excludes "["
        return None
    pos = bracket.end()
    while pos < end and s[pos] == " ":
        pos += 1
    return pos


def _refwd_end(s: str, pos: int, end: int) -> int | None:
    """End of a subj-refwd starting at ``pos``, or None."""
    word = s[pos:pos + 2].lower()
    if word == "re":
        pos += 2
    elif word == "fw":
        pos += 2
        if pos < end and s[pos] in "dD":
            pos += 1
    else:
        return None
    while pos < end and s[pos] == " ":
        pos += 1
    after_blob = _blob_end(s, pos, end)
    if after_blob is not None and after_blob < end and s[after_blob] == ":":
        return after_blob + 1
    if pos < end and s[pos] == ":":
        return pos + 1
    return None


def base_subject(subject: str) -> str:
    """The RFC 5256 base subject of a decoded ``subject`` (not yet case-mapped: compare
    with i;ascii-casemap, as :data:`agentpost.storage.imap.SORT_KEYS` does)."""
    s = _collapse(subject)
    lo, hi = 0, len(s)
    # Blob runs already scanned without a subj-refwd after them: a subj-leader cannot
    # start at any blob boundary before this position (keeps steps 3-5 linear).
    no_leader_before = -1
    while True:
        # (2) trailers: "(fwd)" and WSP, repeatedly.
        while hi > lo:
            if s[hi - 1] == " ":
                hi -= 1
            elif hi - lo >= 5 and s[hi - 5:hi].lower() == "(fwd)":
                hi -= 5
            else:
                break
        # (3)-(5) leaders, then one blob if something is left after it, until neither.
        while True:
            if lo < hi and s[lo] == " ":
                lo += 1
                continue
            if lo > no_leader_before:
                pos = lo
                while (after := _blob_end(s, pos, hi)) is not None:
                    pos = after
                refwd = _refwd_end(s, pos, hi)
                if refwd is not None:
                    lo = refwd
                    continue
                no_leader_before = pos if pos > lo else -1
            after = _blob_end(s, lo, hi)
            if after is not None and after < hi:
                lo = after
                continue
            break
        # (6) "[fwd: ... ]" around the whole rest: unwrap and start again at (2).
        if hi - lo >= 6 and s[lo:lo + 5].lower() == "[fwd:" and s[hi - 1] == "]":
            lo, hi = lo + 5, hi - 1
            no_leader_before = -1
            continue
        return s[lo:hi]
