"""Server-side prepared statements for the statements this process repeats (issue 12).

psycopg2 sends every statement as text with its values quoted in, so PostgreSQL parses
and plans it again each time. Measured on the MX (pg_stat_statements, 4 KiB messages),
planning was more than half of PostgreSQL's CPU per message: a delivery's statements
are few but wide (CTEs over many tables), and they are planned once per message.

This module rewrites a statement that has run ``threshold`` times in this process into
``EXECUTE name(values)``, after a one-time ``PREPARE name AS ...`` on each connection
that uses it; PostgreSQL then reuses the plan (its plan cache picks a generic plan when
that costs no more than the custom ones). A string seen fewer times is rewritten too when
each of its statements has run ``threshold`` times in other strings (a group-commit
batch: the same statements, a different number of them each time). The caller's SQL
and parameters do not change: the values are still quoted by psycopg2, only now as the
arguments of EXECUTE, in the same order. A multi-statement string (``a; b; c``, one
round trip) is rewritten part by part; parts that cannot be prepared (BEGIN, COMMIT,
SET, DDL, a tuple for ``IN %s``) are sent as before.

Why the result cannot change: in the original statement every quoted string, JSON value
or NULL is an untyped literal that PostgreSQL types from its context, which is exactly
how PREPARE types a ``$n`` in the same place. Only non-string values (numbers, booleans,
arrays, timestamps, bytes) carry their own type; for those, the types PostgreSQL chose
at PREPARE (read back from ``pg_prepared_statements``) are checked against the Python
values on every execution, and a mismatch (an int where the statement was typed ``text``,
a number out of an ``integer``'s range) runs that execution the old way. A statement
PostgreSQL cannot prepare at all (a parameter whose type it cannot infer) is never tried
again in this process.

A generic plan is made from the statistics of its day: one made while a table was
nearly empty (a new installation, a benchmark's first seconds) scans the table, and
keeps scanning it as it grows, until an ANALYZE invalidates the plan. Each session
therefore forgets its statements and prepares them again with what PostgreSQL knows by
then: after 10 s, then 20, 40, ... doubling up to ``max_age`` (a young session's tables
are the likeliest to have changed size).

Prepared statements live in the database session, so this must be off
(``[database] prepare_threshold = 0``) behind a pooler that hands one client's
statements to different server sessions (PgBouncer in transaction mode).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from psycopg2.extras import Json

#: Put first in the SQL of a statement whose plan does not depend on its values, as the
#: last round trip of a transaction or alone (the setting lasts to the transaction's end).
#: PostgreSQL's own choice ("auto") compares a generic plan with the custom ones by cost
#: estimates: for statements with a branch a parameter switches off (a poll's "present"
#: part, SELECT's first load or delta) or an array parameter, the generic estimate
#: loses, and every EXECUTE is planned again -- for IMAP's polls, SELECT, FETCH rows and
#: the writes of STORE and EXPUNGE that was 3-4 times the execution time of the
#: statement (pg_stat_statements with track_planning, bench/imap_mixed.py).
GENERIC_PLANS = "SET LOCAL plan_cache_mode TO force_generic_plan"
_PREPARABLE = ("select", "insert", "update", "delete", "with", "values")
#: Parameter types an int may fill, with the largest value each holds (None: any).
_INT_TYPES: dict[str, int | None] = {
    "smallint": 2**15 - 1, "integer": 2**31 - 1, "bigint": 2**63 - 1, "numeric": None,
    "real": None, "double precision": None}
_FLOAT_TYPES = frozenset({"numeric", "real", "double precision"})
_TIME_TYPES = frozenset({"timestamp with time zone", "timestamp without time zone"})


@dataclass(eq=False)
class Part:
    """One statement of a template: its text, placeholders and prepared form."""

    text: str
    nparams: int
    preparable: bool
    name: str = ""
    prepare_sql: str = ""
    execute_sql: str = ""
    #: PostgreSQL's parameter types, once one connection prepared it (None: not yet).
    types: list[str] | None = None
    #: PostgreSQL refused to prepare it: run as text from now on.
    refused: bool = False
    #: Per parameter, the Python types that always fit it (from ``types``, built once).
    accepts: list[frozenset[type]] | None = field(default=None, repr=False)
    #: How many times it was sent in strings not yet worth preparing as a whole.
    seen: int = 0

    def fits(self, params: Sequence[Any]) -> bool:
        """Whether these values would be read the same by the prepared statement."""
        types = self.types
        if types is None or len(types) != len(params):
            return False
        accepts = self.accepts
        if accepts is None:
            accepts = self.accepts = [_always_fitting(pgtype) for pgtype in types]
        # A delivery's write has a thousand parameters: one set lookup for nearly all.
        for value, accepted, pgtype in zip(params, accepts, types, strict=True):
            if type(value) not in accepted and not _fits(value, pgtype):
                return False
        return True


@dataclass(eq=False)
class Template:
    """A whole SQL string as callers send it, split into its statements."""

    parts: list[Part]
    uses: int = 0


@dataclass(eq=False)
class Session:
    """What one connection has prepared (a database session's own namespace)."""

    prepared: set[str] = field(default_factory=set)
    #: Send DEALLOCATE ALL first (too many statements, or a plan became invalid).
    reset: bool = False
    #: When the oldest statement of ``prepared`` was prepared (clock seconds).
    since: float = 0.0
    #: How many times the session forgot its statements (each lifetime doubles).
    generation: int = 0

    def remember(self, name: str, now: float) -> None:
        """``name`` is prepared on this connection from ``now`` (clock seconds)."""
        if not self.prepared:
            self.since = now
        self.prepared.add(name)

    def expired(self, now: float, max_age: float) -> bool:
        """Whether the statements are old enough to be planned afresh."""
        if not self.prepared:
            return False
        return now - self.since >= min(max_age, 10.0 * (1 << min(self.generation, 16)))


class StatementCache:
    """The templates this process has seen (shared by every connection of a pool)."""

    def __init__(self, threshold: int = 3, *, max_templates: int = 2048,
                 max_per_session: int = 500, max_age: float = 60.0) -> None:
        self.threshold = threshold
        self.max_age = max_age
        self.max_templates = max_templates
        self.max_per_session = max_per_session
        self._templates: dict[str, Template] = {}
        self._parts: dict[str, Part] = {}

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def template(self, sql: str, params: Any) -> Template | None:
        """The template of ``sql`` once it is worth preparing, else None (counted)."""
        if not self.enabled or (params is not None and not isinstance(params, list | tuple)):
            return None  # named parameters (a dict): left alone
        found = self._templates.get(sql)
        if found is None:
            if len(self._templates) >= self.max_templates:
                self._templates.clear()  # shapes built on the fly (IN lists) churn
            found = Template(self._split(sql))
            self._templates[sql] = found
        found.uses += 1
        if found.uses < self.threshold and not self._parts_ready(found):
            return None
        return found

    def _parts_ready(self, template: Template) -> bool:
        """Whether every statement of a new string has run often enough in others: a
        group-commit batch (core.group_commit) is the same few statements, a different
        number of them each time, so its strings rarely repeat whole; its statements do."""
        ready, any_preparable = True, False
        for part in template.parts:
            part.seen += 1
            if part.preparable:
                any_preparable = True
                ready = ready and part.seen >= self.threshold
        return ready and any_preparable

    def _split(self, sql: str) -> list[Part]:
        parts = []
        for text in split_statements(sql):
            part = self._parts.get(text)
            if part is None:
                part = _make_part(text)
                if len(self._parts) < self.max_templates * 4:
                    self._parts[text] = part
            parts.append(part)
        return parts


def _make_part(text: str) -> Part:
    count, named = _count_placeholders(text)
    head = text.lstrip().split(None, 1)[0].lower() if text.strip() else ""
    head = head.lstrip("(")
    # Without parameters psycopg2 sends the text as it is, "%%" included: such a text
    # is taken only when it has no "%" at all, so both forms read the same.
    preparable = not named and head in _PREPARABLE and (count > 0 or "%" not in text)
    part = Part(text, count, preparable)
    if preparable:
        digest = hashlib.blake2b(text.encode(), digest_size=10).hexdigest()
        part.name = f"ap_{digest}"
        part.prepare_sql = f"PREPARE {part.name} AS {_numbered(text)}"
        part.execute_sql = (f"EXECUTE {part.name}({', '.join(['%s'] * count)})" if count
                            else f"EXECUTE {part.name}")
    return part


#: Where split_statements has to look: everything else is skipped in C (a batch's SQL,
#: core.group_commit, is tens of kilobytes of text).
_SPECIAL = re.compile(r"['\"$;]|--|/\*")


def split_statements(sql: str) -> list[str]:
    """``sql`` cut at its top-level semicolons (not inside quotes or comments)."""
    out: list[str] = []
    start = i = 0
    n = len(sql)
    search = _SPECIAL.search
    while i < n:
        found = search(sql, i)
        if found is None:
            break
        i = found.start()
        c = sql[i]
        if c in "'\"":
            end = sql.find(c, i + 1)
            while end != -1 and end + 1 < n and sql[end + 1] == c:  # doubled quote
                end = sql.find(c, end + 2)
            i = n if end == -1 else end + 1
            continue
        if c == "$":
            tag_end = sql.find("$", i + 1)
            tag = sql[i:tag_end + 1] if tag_end != -1 else ""
            if tag and (tag == "$$" or tag[1:-1].replace("_", "a").isalnum()) \
                    and not tag[1:-1][:1].isdigit():
                end = sql.find(tag, tag_end + 1)
                i = n if end == -1 else end + len(tag)
                continue
        elif c == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end == -1 else end + 1
            continue
        elif c == "/" and sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end == -1 else end + 2
            continue
        elif c == ";":
            piece = sql[start:i].strip()
            if piece:
                out.append(piece)
            start = i + 1
        i += 1
    piece = sql[start:].strip()
    if piece:
        out.append(piece)
    return out


def _count_placeholders(text: str) -> tuple[int, bool]:
    """(number of ``%s``, whether any ``%(name)s``): psycopg2 reads every ``%``,
    quoted or not, so this does too."""
    count = 0
    i = text.find("%")
    while i != -1:
        nxt = text[i + 1:i + 2]
        if nxt == "s":
            count += 1
        elif nxt == "(":
            return count, True
        i = text.find("%", i + 2)
    return count, False


def _numbered(text: str) -> str:
    """The statement with ``%s`` as ``$1..$n`` and ``%%`` as ``%`` (PREPARE is sent
    without parameters, so psycopg2 does not unescape it)."""
    out = []
    n = 0
    i = 0
    while True:
        j = text.find("%", i)
        if j == -1:
            out.append(text[i:])
            break
        out.append(text[i:j])
        nxt = text[j + 1:j + 2]
        if nxt == "s":
            n += 1
            out.append(f"${n}")
        else:  # "%%"
            out.append("%")
        i = j + 2
    return "".join(out)


def _always_fitting(pgtype: str) -> frozenset[type]:
    """The exact Python types whose every value :func:`_fits` a parameter of ``pgtype``
    (ints and floats are left to it: their range or type is checked per value)."""
    kinds: set[type] = {str, type(None), Json}
    if pgtype == "boolean":
        kinds.add(bool)
    if pgtype in _TIME_TYPES:
        kinds.add(dt.datetime)
    if pgtype == "date":
        kinds.add(dt.date)
    if pgtype.endswith("[]"):
        kinds.add(list)
    if pgtype == "bytea":
        kinds.update((bytes, bytearray, memoryview))
    return frozenset(kinds)


def _fits(value: Any, pgtype: str) -> bool:
    kind = type(value)
    if kind is str or value is None or isinstance(value, str | Json):
        return True  # an untyped literal either way: typed by its context
    if isinstance(value, bool):
        return pgtype == "boolean"
    if isinstance(value, int):
        if pgtype not in _INT_TYPES:
            return False
        limit = _INT_TYPES[pgtype]
        return limit is None or -limit - 1 <= value <= limit
    if isinstance(value, float | Decimal):
        return pgtype in _FLOAT_TYPES
    if isinstance(value, dt.datetime):
        return pgtype in _TIME_TYPES
    if isinstance(value, dt.date):
        return pgtype == "date"
    if isinstance(value, dt.timedelta):
        return pgtype == "interval"
    if isinstance(value, list):
        return pgtype.endswith("[]")
    if isinstance(value, bytes | bytearray | memoryview):
        return pgtype == "bytea"
    if isinstance(value, uuid.UUID):
        return pgtype == "uuid"
    # An adapter whose SQL is an expression of one known type (storage.blob_body's
    # offset: a checked function call) is as good an EXECUTE argument as a literal.
    declared = getattr(kind, "pg_param_type", None)
    if declared is not None:
        return bool(declared == pgtype)
    return False  # a tuple (IN %s), an adapter we do not know: as text


class Preparer:
    """Rewrites one connection's statements (used by storage.database.Txn)."""

    def __init__(self, cache: StatementCache, session: Session, now: float) -> None:
        self.cache = cache
        self.session = session
        self.now = now  # the clock's seconds when the transaction began

    async def rewrite(self, cursor: Any, sql: str, params: Any, *, in_txn: bool) -> str:
        """``sql`` with its prepared parts as EXECUTE; PREPAREs what this connection
        lacks first (one round trip each, once per connection)."""
        template = self.cache.template(sql, params)
        if template is None:
            return sql
        params = params or ()
        session = self.session
        if session.reset or session.expired(self.now, self.cache.max_age):
            await self._forget_all(cursor)
        out: list[str] = []
        offset = 0
        changed = False
        for part in template.parts:
            values = params[offset:offset + part.nparams]
            offset += part.nparams
            if part.preparable and not part.refused:
                if part.name not in session.prepared:
                    await self._prepare(cursor, part, in_txn=in_txn)
                if part.name in session.prepared and part.fits(values):
                    out.append(part.execute_sql)
                    changed = True
                    continue
            out.append(part.text)
        if offset != len(params) or not changed:
            return sql  # a count we misread: psycopg2 will say so, exactly as before
        return "; ".join(out)

    async def _forget_all(self, cursor: Any) -> None:
        await cursor.execute("DEALLOCATE ALL")
        self.session.prepared.clear()
        self.session.reset = False
        self.session.generation += 1

    async def _prepare(self, cursor: Any, part: Part, *, in_txn: bool) -> None:
        session = self.session
        if len(session.prepared) >= self.cache.max_per_session:
            session.reset = True  # not now: earlier parts of this string may use them
            return
        # The parameter types are read back once per process (the same text gives the
        # same types on every connection of one schema).
        types_sql = ("; SELECT parameter_types::text[] AS types FROM pg_prepared_statements "
                     f"WHERE name = '{part.name}'") if part.types is None else ""
        if in_txn:  # a refused PREPARE must not abort the caller's transaction
            sql = (f"SAVEPOINT agentpost_prepare; {part.prepare_sql}; "
                   f"RELEASE SAVEPOINT agentpost_prepare{types_sql}")
        else:
            sql = f"{part.prepare_sql}{types_sql}"
        try:
            await cursor.execute(sql)
        except Exception as exc:
            if not _refusal(exc):
                raise
            if in_txn:
                await cursor.execute("ROLLBACK TO SAVEPOINT agentpost_prepare; "
                                     "RELEASE SAVEPOINT agentpost_prepare")
            if getattr(exc, "pgcode", None) == "42P05":  # already there (should not be)
                session.reset = True  # the next statement starts the session afresh
            else:
                part.refused = True
            return
        row = cursor.fetchone() if types_sql else None
        session.remember(part.name, self.now)
        if row is not None and part.types is None:
            part.types = list(row[0])


def _refusal(exc: BaseException) -> bool:
    """PostgreSQL answered that it cannot prepare this statement (as opposed to a lost
    link or a cancelled query, which the caller's transaction handles)."""
    code = getattr(exc, "pgcode", None)
    return code is not None and code[:2] in ("42", "0A", "22")


def plan_invalidated(exc: BaseException) -> bool:
    """``cached plan must not change result type``: a table changed under a prepared
    statement (a migration while this process ran); the session starts afresh."""
    return getattr(exc, "pgcode", None) == "0A000"
