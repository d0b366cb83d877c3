"""IMAP keywords and API labels: which keyword is which label, and back.

IMAP keywords (RFC 3501/9051 ``flag-keyword``) are any atom a client likes, compared
case-insensitively; API labels are lowercase strings of a small alphabet that agents
filter on. Both live in ONE stored set per message (``messages.labels``), each element
case-folded, so SEARCH KEYWORD, the API's ``labels=`` filter and a thread's labels are
plain equality on the folded form. This module decides what each element means:

* A keyword is a **label** when its folded form is a valid API label and is not one of
  :data:`CLIENT_KEYWORDS`. Label -> keyword is the label itself (the label alphabet is
  made of atom characters); keyword -> label is :func:`fold`. So the mapping is
  reversible (label -> keyword -> label is the identity; keyword -> label -> keyword is
  the same keyword up to case, which IMAP ignores) and case-insensitive.
* Every other keyword is **IMAP-only**: ``$``-prefixed ones (RFC 5788: keywords with a
  defined meaning, such as ``$Forwarded``, ``$MDNSent``, ``$Junk``, ``$Label1``; no
  ``$`` can start a label), the non-``$`` ones clients set by themselves for their own
  bookkeeping (:data:`CLIENT_KEYWORDS`: mutt's ``Old``, Thunderbird's ``Junk`` and
  ``NonJunk``...), and atoms outside the label alphabet or longer than a label. They are
  stored so IMAP round-trips and searches them, but the API lists them apart, as
  ``imap_keywords``, because an agent filtering on labels should not see a client's
  internal state.

The case a keyword was first seen in (per inbox) is kept by storage
(``storage.keywords``) for display; everything here works on folded forms. No I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: An API label: what the API accepts, and what a keyword must fold to to be one.
LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9_\-:./]{0,63}\Z")
#: ATOM-CHAR of RFC 3501/9051: any 7-bit CHAR but atom-specials (``(){`` SP CTL ``%*``
#: ``"\`` and ``]``). A keyword is 1..MAX_KEYWORD_CHARS of them (``\`` cannot start it:
#: that is a system flag, and ``\`` is not an ATOM-CHAR anyway).
_ATOM_RE = re.compile(r'^[!#$&\'+,\-./0-9:;<=>?@A-Z\[^_`a-z|}~]+\Z')
#: Longest keyword accepted: a label is at most 64 characters, an IMAP-only keyword may
#: be longer, within reason (a STORE of 100 of them stays a few KiB).
MAX_KEYWORD_CHARS = 128
#: Per message: at most this many labels (what the API shows) ...
MAX_LABELS = 50
#: ... and, counted apart, at most this many IMAP-only keywords, so a client's own
#: bookkeeping never eats into the agent's labels and a row stays bounded.
MAX_IMAP_KEYWORDS = 50

#: Keywords without ``$`` that real clients set on their own (not on the user's asking),
#: folded: mutt's ``Old``; ``Junk``/``NonJunk``/``NotJunk`` (Thunderbird, Apple Mail,
#: Evolution junk classifiers); ``Forwarded``/``Redirected`` (Apple Mail, older KMail);
#: ``receipt-handled`` (Evolution's read-receipt mark). Never labels, so the API refuses
#: them as labels too (one meaning per name).
CLIENT_KEYWORDS = frozenset({"old", "junk", "nonjunk", "notjunk", "forwarded",
                             "redirected", "receipt-handled"})

_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_FOLD = str.maketrans(_UPPER, _UPPER.lower())


def fold(keyword: str) -> str:
    """i;ascii-casemap (RFC 4790), the comparison IMAP keywords use: only ASCII letters
    fold (Python's ``lower`` would also fold other scripts, which IMAP does not)."""
    return keyword.translate(_FOLD)


def is_keyword(atom: str) -> bool:
    """Whether ``atom`` may be stored as a keyword (a flag-keyword atom, not too long)."""
    return 0 < len(atom) <= MAX_KEYWORD_CHARS and bool(_ATOM_RE.match(atom))


def is_label(folded: str) -> bool:
    """Whether a stored (folded) keyword is an API label rather than IMAP-only."""
    return bool(LABEL_RE.match(folded)) and folded not in CLIENT_KEYWORDS


def label_problem(label: object) -> str | None:
    """Why ``label`` (from the API) cannot be a label, or None when it can."""
    if not isinstance(label, str) or not LABEL_RE.match(label):
        return ("labels are 1-64 lowercase letters, digits and _-:./, starting with a "
                "letter or digit.")
    if label in CLIENT_KEYWORDS:
        return (f"{label!r} is a keyword IMAP clients set for themselves, not a label "
                f"(reserved: {', '.join(sorted(CLIENT_KEYWORDS))}).")
    return None


def keyword_to_label(keyword: str) -> str | None:
    """The API label an IMAP keyword is, or None for an IMAP-only keyword."""
    folded = fold(keyword)
    return folded if is_label(folded) else None


def label_to_keyword(label: str) -> str:
    """The IMAP keyword an API label appears as (storage may give it a first-seen
    spelling; any spelling is the same keyword)."""
    if not is_label(label):
        raise ValueError(f"not an API label: {label!r}")
    return label


def parse(flags: Iterable[str]) -> dict[str, str]:
    """The keywords among IMAP flags, folded -> as the client spelled it (the first of
    several spellings wins); system flags (``\\...``) are skipped. ValueError names the
    first atom that cannot be a keyword."""
    out: dict[str, str] = {}
    for flag in sorted(flags):
        if flag.startswith("\\"):
            continue
        if not is_keyword(flag):
            raise ValueError(flag)
        out.setdefault(fold(flag), flag)
    return out


def split(stored: Iterable[str]) -> tuple[list[str], list[str]]:
    """A message's stored (folded) keywords as (labels, IMAP-only keywords), sorted."""
    labels: list[str] = []
    others: list[str] = []
    for keyword in sorted(set(stored)):
        (labels if is_label(keyword) else others).append(keyword)
    return labels, others


def cap_problem(stored: Iterable[str]) -> str | None:
    """Why a message cannot hold this set of folded keywords, or None when it can."""
    labels, others = split(stored)
    if len(labels) > MAX_LABELS:
        return f"A message holds at most {MAX_LABELS} labels."
    if len(others) > MAX_IMAP_KEYWORDS:
        return f"A message holds at most {MAX_IMAP_KEYWORDS} IMAP-only keywords."
    return None


def spell(folded: Iterable[str], spellings: dict[str, str]) -> list[str]:
    """Folded keywords as IMAP shows them: their first-seen spelling where known (a
    spelling that does not fold back to the keyword is ignored)."""
    out = []
    for keyword in folded:
        shown = spellings.get(keyword)
        out.append(shown if shown is not None and fold(shown) == keyword else keyword)
    return out
