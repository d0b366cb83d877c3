"""First-seen spellings of IMAP keywords, per inbox (migration 0014).

Messages store keywords case-folded (agentpost.mail.keywords); IMAP shows each in the
case an inbox first saw it in. The spelling is recorded once, by whichever door stores
the keyword first, and never changes, so any process may show it without coordination.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agentpost.mail import keywords
from agentpost.storage.database import Txn

#: Distinct keywords an inbox remembers a spelling for; a keyword first seen after that
#: still works, shown folded. Bounds what a client inventing keywords can make us keep.
MAX_SPELLINGS_PER_INBOX = 1000


def _given(spelled: Iterable[str]) -> dict[str, str]:
    given: dict[str, str] = {}
    for flag in spelled:
        if not flag.startswith("\\") and keywords.is_keyword(flag):
            given.setdefault(keywords.fold(flag), flag)
    return given


def remember_sql(org_id: str, inbox_id: str, spelled: Iterable[str],
                 now: Any) -> tuple[str, list[Any]]:
    """:func:`remember` as a statement to send ahead of others ("" when there is no
    keyword); its result is then read back with :func:`spellings_of_sql`."""
    given = _given(spelled)
    if not given:
        return "", []
    folded = sorted(given)
    return (
        "WITH g(keyword, spelling) AS (SELECT * FROM unnest(%s::text[], %s::text[])), "
        "known AS (SELECT s.keyword, s.spelling FROM keyword_spellings s "
        "          WHERE s.org_id = %s AND s.inbox_id = %s AND s.keyword = ANY(%s)), "
        "ins AS (INSERT INTO keyword_spellings (org_id, inbox_id, keyword, spelling, "
        "        created_at) "
        "        SELECT %s, %s, g.keyword, g.spelling, %s FROM g "
        "        WHERE NOT EXISTS (SELECT 1 FROM known k WHERE k.keyword = g.keyword) "
        "          AND (SELECT count(*) FROM keyword_spellings s "
        "               WHERE s.org_id = %s AND s.inbox_id = %s) < %s "
        "        ON CONFLICT DO NOTHING RETURNING keyword, spelling) "
        "SELECT keyword, spelling FROM known UNION ALL SELECT keyword, spelling FROM ins",
        [folded, [given[k] for k in folded], org_id, inbox_id, folded, org_id, inbox_id,
         now, org_id, inbox_id, MAX_SPELLINGS_PER_INBOX])


def spellings_of_sql(org_id: str, inbox_id: str,
                     spelled: Iterable[str]) -> tuple[str, list[Any]]:
    """A scalar expression: the recorded spellings (text[]) of these keywords, for a
    statement that follows :func:`remember_sql` in the same transaction."""
    return ("(SELECT array_agg(s.spelling) FROM keyword_spellings s WHERE s.org_id = %s "
            "AND s.inbox_id = %s AND s.keyword = ANY(%s))",
            [org_id, inbox_id, sorted(_given(spelled))])


async def remember(txn: Txn, org_id: str, inbox_id: str,
                   spelled: Iterable[str]) -> dict[str, str]:
    """Record the spelling of keywords this inbox has not seen yet (IMAP flags as the
    client sent them, or API labels; system flags and non-keywords are skipped) and
    return folded -> first-seen spelling for all of them that have one. One statement,
    and none at all without keywords (STORE \\Seen pays nothing)."""
    sql, params = remember_sql(org_id, inbox_id, spelled, txn.now)
    if not sql:
        return {}
    rows = await txn.fetchall(sql, params)
    return {r["keyword"]: r["spelling"] for r in rows}


async def recorded(txn: Txn, org_id: str, inbox_id: str,
                   folded: Iterable[str]) -> dict[str, str]:
    """The recorded spellings of these folded keywords of an inbox, folded -> first
    seen (those without one -- stored before migration 0014, or past the inbox's
    MAX_SPELLINGS_PER_INBOX -- are left out: they show folded). What IMAP's flag reads
    ask when the process does not know a keyword yet (core.imap_spellings); a spelling
    that does not fold back to its keyword is not one."""
    rows = await txn.fetchall(
        "SELECT keyword, spelling FROM keyword_spellings WHERE org_id = %s "
        "AND inbox_id = %s AND keyword = ANY(%s::text[])",
        (org_id, inbox_id, sorted(set(folded))))
    return {r["keyword"]: r["spelling"] for r in rows
            if keywords.fold(r["spelling"]) == r["keyword"]}


async def spellings(txn: Txn, org_id: str, inbox_id: str) -> dict[str, str]:
    """Every recorded spelling of an inbox, folded -> first seen."""
    rows = await txn.fetchall(
        "SELECT keyword, spelling FROM keyword_spellings WHERE org_id = %s AND inbox_id = %s",
        (org_id, inbox_id))
    return {r["keyword"]: r["spelling"] for r in rows}
