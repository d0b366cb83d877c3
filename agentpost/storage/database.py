"""The one wrapper around the database driver (psycopg2 async, storage.pgconn).

Why our own pool rather than txpostgres.ConnectionPool: its pool never replaces a
connection that died (a PostgreSQL restart leaves it broken forever), and it cannot
tell a caller whether a COMMIT might have happened. Here every connection is checked
out for one named transaction, dropped when its link breaks, and reopened lazily on
the next request, so the service recovers from a database restart on its own.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from txpostgres import txpostgres

try:
    import ujson
except ImportError:  # pragma: no cover - ujson comes with autobahn
    ujson = None  # type: ignore[assignment]

from agentpost.model.errors import AgentPostError, Conflict, InvalidRequest, TemporaryFailure
from agentpost.storage import libpq_pipeline, sql_literals
from agentpost.storage.pgconn import PgConnection
from agentpost.storage.prepared import Preparer, Session, StatementCache, plan_invalidated

log = logging.getLogger(__name__)

T = TypeVar("T")

_RETRYABLE_TXN = (psycopg2.errors.SerializationFailure, psycopg2.errors.DeadlockDetected)
_LINK_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError, txpostgres.RollbackFailed)


class Txn:
    """A transaction in progress: run statements, register after-commit work."""

    def __init__(self, cursor: Any, now: datetime, begin: str | None = None,
                 preparer: Preparer | None = None) -> None:
        self._cursor = cursor
        self.now = now
        self._preparer = preparer
        #: Inside BEGIN ... COMMIT (a failed PREPARE needs a savepoint there).
        self._in_txn = False
        #: A prepared plan went stale under a statement (a table changed): run again.
        self.replan = False
        self._after_commit: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        #: Per-transaction scratch space of the stores (storage.message_bodies).
        self.memo: dict[str, Any] = {}
        # BEGIN travels with the first statement: one round trip less per transaction.
        self._begin = begin
        #: The transaction was committed by :meth:`commit_with` (nothing more to send).
        self.ended = False
        #: A pipeline sent without waiting (:meth:`pipeline`), until its answer is in.
        self._ahead: defer.Deferred[None] | None = None

    @property
    def started(self) -> bool:
        """Whether a statement (and so the BEGIN) has been sent."""
        return self._begin is None

    async def _send(self, sql: str, params: Any) -> None:
        if self._ahead is not None:
            await self.settle()
        if self._preparer is not None:
            sql = await self._preparer.rewrite(self._cursor, sql, params, in_txn=self._in_txn)
        if self._begin is not None:
            # Simple-query protocol: both statements run in order in one message; an
            # error in either aborts the transaction exactly as two messages would.
            sql, self._begin = f"{self._begin}; {sql}", None
            self._in_txn = True
        try:
            if type(params) in (list, tuple) and params \
                    and sql_literals.usable(self._cursor.connection):
                # our rendering, psycopg2's literals (storage.sql_literals); no params
                # left, so psycopg2 sends the bytes as they are
                await self._cursor.execute(sql_literals.render(sql, params,
                                                               self._cursor.connection))
            else:
                await self._cursor.execute(sql, params)
        except psycopg2.Error as exc:
            if self._preparer is not None and plan_invalidated(exc) and "EXECUTE ap_" in sql:
                self._preparer.session.reset = True
                self.replan = True
            raise
        except (ValueError, UnicodeEncodeError) as exc:
            # psycopg2 refused to adapt a parameter before sending anything: a NUL in a
            # string ("A string literal cannot contain NUL"), a lone surrogate. The
            # client's data, not a fault of ours; the connection is untouched. (Other
            # ValueErrors, such as a bad placeholder, are our bugs and stay 500s.)
            if not isinstance(exc, UnicodeEncodeError) and "NUL" not in str(exc):
                raise
            log.warning("refused parameters: %s", str(exc).strip())
            raise InvalidRequest(_UNSTORABLE) from exc

    @property
    def can_pipeline(self) -> bool:
        """Whether :meth:`pipeline` can run here (libpq 14 or later, the pool's link)."""
        return libpq_pipeline.available() and hasattr(self._cursor, "owner")

    async def pipeline(self, sql: str, name: str, params: Sequence[bytes],
                       binary: Sequence[bool], *, wait: bool = True) -> None:
        """Run ``sql`` with ``params`` sent as they are (``binary[i]``: in the type's
        binary form; storage.libpq_pipeline), in one round trip with the BEGIN when it is
        the transaction's first exchange. As the connection's prepared statement
        ``name`` (prepared in the same round trip the first time), unless the connection
        is about to forget its statements (storage.prepared).

        ``wait=False`` returns once it is sent: the caller goes on building its next
        statement while PostgreSQL works on this one, and the transaction's next
        exchange waits for this one's answer first (raising its error there)."""
        await self.settle()
        statements: list[libpq_pipeline.Statement] = []
        if self._begin is not None:
            statements.append(libpq_pipeline.Statement(self._begin))
            self._begin = None
            self._in_txn = True
        preparer = self._preparer
        session = preparer.session if preparer is not None else None
        if session is None or session.reset:
            statements.append(libpq_pipeline.Statement(sql, params, binary))
        else:
            prepare = name not in session.prepared
            statements.append(libpq_pipeline.Statement(sql, params, binary, name, prepare))
        sent = self._cursor.owner.run_pipeline(statements)
        self._ahead = defer.Deferred.fromCoroutine(self._pipeline_done(sent, name))
        if wait:
            await self.settle()

    async def _pipeline_done(self, sent: defer.Deferred[None], name: str) -> None:
        preparer = self._preparer
        try:
            await sent
        except Exception as exc:  # an error, a cancel, a lost link
            if preparer is not None:  # whether the PREPARE ran is unknown: start afresh
                preparer.session.reset = True
            if getattr(exc, "pgcode", None) in ("42P05", "26000"):
                self.replan = True  # the statement was there, or gone: run it again
            raise
        if preparer is not None and not preparer.session.reset:
            preparer.session.remember(name, preparer.now)

    async def settle(self) -> None:
        """Wait for a pipeline sent with ``wait=False`` (raising its error): the link
        takes one exchange at a time."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            await ahead

    async def settle_quietly(self) -> None:
        """:meth:`settle`, its error dropped: the transaction failed already and is
        rolled back next, which needs the link idle."""
        try:
            await self.settle()
        except Exception:  # noqa: S110 - the error that ends the transaction is raised
            pass

    async def execute(self, sql: str, params: Any = None) -> int:
        """Run a statement; return the affected row count."""
        await self._send(sql, params)
        rowcount: int = self._cursor.rowcount
        return rowcount

    async def fetchall(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        """Run a query and return its rows as dicts."""
        await self._send(sql, params)
        if self._cursor.description is None:
            return []
        cols = [c.name for c in self._cursor.description]
        # psycopg2's rows always match its description (no strict=): this is on every
        # read's path, a FETCH's hundred rows included, and strict= and the global
        # lookups were a third of its cost
        make, pair = dict, zip
        return [make(pair(cols, row)) for row in self._cursor.fetchall()]

    async def fetchone(self, sql: str, params: Any = None) -> dict[str, Any] | None:
        """Run a query and return its first row, or None."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchone_required(self, sql: str, params: Any = None) -> dict[str, Any]:
        """Run a query that always yields a row (``INSERT ... RETURNING``, an aggregate
        without ``GROUP BY``) and return that row; no row at all is a bug here."""
        row = await self.fetchone(sql, params)
        if row is None:
            raise RuntimeError(f"expected a row from: {sql[:80]}")
        return row

    async def fetchval(self, sql: str, params: Any = None) -> Any:
        """Run a query and return the first column of its first row, or None."""
        row = await self.fetchone(sql, params)
        return None if row is None else next(iter(row.values()))

    async def commit_with(self, sql: str, params: Sequence[Any],
                          result_sql: str = "NULL::int",
                          result_params: Sequence[Any] = ()) -> Any:
        """Run the transaction's last statements ``sql`` and COMMIT it, in ONE round trip;
        returns the JSON value of ``result_sql`` (an expression evaluated after ``sql``,
        in the transaction). Nothing may be sent in this transaction afterwards, and
        Database.run_interaction sends no COMMIT of its own. A statement that fails
        leaves nothing behind (the COMMIT is never reached); a link lost in this round
        trip leaves the outcome unknown: TemporaryFailure, never a retry (it could apply
        the change twice).

        The ending is :data:`_UNLOCK_THEN_FLUSH`'s: the locks go as soon as the COMMIT is
        processed, before the WAL flush, and the change is still durable before the
        caller hears of it (the synchronous COMMIT that follows flushes the WAL past
        ours). The result crosses the COMMIT in a session setting set in the transaction
        (so rolled back with it)."""
        full = (f"SET LOCAL synchronous_commit TO OFF; {sql}; "
                f"SELECT set_config('{_RESULT_SETTING}', "
                f"COALESCE(to_json(({result_sql}))::text, 'null'), false); "
                f"{_FLUSH_ENDING}; SELECT current_setting('{_RESULT_SETTING}') AS r")
        # A write-ahead still in flight answers first, outside the try: its lost link
        # is one before the COMMIT was sent, which Database._run may run again.
        await self.settle()
        try:
            value = await self.fetchval(full, [*params, *result_params])
        except _LINK_ERRORS as exc:
            self.ended = True
            raise TemporaryFailure() from exc
        self.ended = True
        return json.loads(value) if value else None

    def after_commit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` once the transaction has committed (never on rollback)."""
        self._after_commit.append((fn, args))


def text_array(values: Iterable[str]) -> str:
    """Strings as ONE text[] literal ('{"a","b"}', for ``%s::text[]``): psycopg2 sends a
    list as ARRAY['a','b'], whose statement text differs with every length, so each
    length was a statement of its own to prepare and plan."""
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return "{" + ",".join(quoted) + "}"


def json_param(value: Any) -> str:
    """``value`` as JSON text, for a ``jsonb`` parameter. psycopg2 quotes it exactly as
    its Json adapter would quote the same text (an untyped literal either way, typed by
    its place in the statement), without a Python adapter object per value: a delivery
    has ten of them, and their adapters were the largest part of quoting its write.
    ujson, where installed, writes it a few times faster than json; jsonb keeps the
    value, not the spelling, so what is stored is the same."""
    if ujson is not None:
        try:
            return str(ujson.dumps(value))
        except (TypeError, ValueError, OverflowError):
            pass  # what ujson cannot write, json writes (or refuses) as before
    return json.dumps(value)


def _is_broken(conn: PgConnection) -> bool:
    raw = conn._connection  # the psycopg2 connection
    return raw is None or bool(raw.closed)


class Database:
    """A bounded pool of PostgreSQL connections and the run_interaction contract."""

    def __init__(
        self,
        dsn: str,
        *,
        clock: IReactorTime,
        reactor: Any,
        pool_size: int = 10,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 30.0,
        retries: int = 3,
        application_name: str = "agentpost",
        prepare_threshold: int = 3,
    ) -> None:
        self._dsn = dsn
        self._clock = clock
        self._reactor = reactor
        self._size = pool_size
        self._connect_timeout_s = connect_timeout_s
        self._statement_timeout_ms = int(statement_timeout_s * 1000)
        self._retries = retries
        self._application_name = application_name
        self._idle: list[PgConnection] = []
        self._open = 0
        self._waiters: deque[defer.Deferred[None]] = deque()
        self._closed = False
        #: Statements run this often are prepared (storage.prepared; 0: never).
        self.statements = StatementCache(prepare_threshold)

    def now(self) -> datetime:
        """The injected clock's time, as SQL parameters want it."""
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    async def _connect(self) -> PgConnection:
        conn = PgConnection(self._reactor)
        options = f"-c statement_timeout={self._statement_timeout_ms}"
        d = conn.connect(
            self._dsn,
            application_name=self._application_name,
            options=options,
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
        d.addTimeout(self._connect_timeout_s, self._clock)
        try:
            await d
        except (psycopg2.Error, defer.TimeoutError, OSError) as exc:
            try:
                conn.close()
            except Exception:  # noqa: S110 - the connection never opened; nothing to close
                pass
            log.warning("database connection failed: %s", str(exc).strip())
            raise TemporaryFailure() from exc
        return conn

    async def _acquire(self) -> PgConnection:
        while True:
            if self._closed:
                raise TemporaryFailure("The service is shutting down.")
            if self._idle:
                conn = self._idle.pop()
                if not _is_broken(conn):
                    return conn
                self._discard(conn)
                continue
            if self._open < self._size:
                self._open += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiter)
            waiter.addTimeout(self._connect_timeout_s * 2, self._clock)
            try:
                await waiter
            except defer.TimeoutError:
                raise TemporaryFailure("The database is busy; try again shortly.") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                waiter.callback(None)
                return

    def _release(self, conn: PgConnection) -> None:
        if _is_broken(conn) or self._closed:
            self._discard(conn)
        else:
            self._idle.append(conn)
        self._wake_one()

    def _preparer(self, conn: PgConnection) -> Preparer | None:
        """The statement rewriter of ``conn``'s database session."""
        if not self.statements.enabled:
            return None
        session = getattr(conn, "_agentpost_session", None)
        if session is None:  # a new connection: a new session, nothing prepared
            session = Session()
            conn._agentpost_session = session
        return Preparer(self.statements, session, self._clock.seconds())

    def _discard(self, conn: PgConnection) -> None:
        self._open -= 1
        try:
            conn.close()
        except Exception:  # noqa: S110 - already dead; closing is best effort
            pass

    def run_interaction(
        self,
        desc: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        isolation: str = "read committed",
        unlock_before_flush: bool = False,
        **kwargs: Any,
    ) -> defer.Deferred[T]:
        """Run ``await fn(txn, *args, **kwargs)`` inside one transaction.

        Serialization failures and links lost before COMMIT are retried a bounded
        number of times; a link lost *during* COMMIT is not, because the outcome is
        unknown and retrying could apply the change twice. Driver failures surface as
        TemporaryFailure; integrity errors are left for the stores to translate, and those
        no store translated become Conflict or InvalidRequest (``_client_error``).

        ``unlock_before_flush`` ends the transaction with :data:`_UNLOCK_THEN_FLUSH`:
        its locks go as soon as the COMMIT is processed rather than after the WAL fsync,
        for transactions that hold a row every writer of a folder or inbox queues on.
        The call still returns only once the commit is on disk; other sessions may see
        the rows a few milliseconds before that (a crash then loses rows nobody was told
        were stored, so the sender retries).
        """
        return defer.Deferred.fromCoroutine(
            self._run(desc, fn, args, kwargs, isolation, unlock_before_flush)
        )

    async def _run(self, desc: str, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...],
                   kwargs: dict[str, Any], isolation: str,
                   unlock_before_flush: bool = False) -> T:
        attempt = 0
        while True:
            attempt += 1
            conn = await self._acquire()
            txn = Txn(conn.cursor(), self.now(), f"BEGIN ISOLATION LEVEL {isolation.upper()}",
                      self._preparer(conn))
            committing = False
            try:
                result = await fn(txn, *args, **kwargs)
                committing = True
                if txn.started and not txn.ended:  # nothing sent, or committed already
                    await txn.execute(_UNLOCK_THEN_FLUSH if unlock_before_flush
                                      else "COMMIT")
            except BaseException as exc:
                await txn.settle_quietly()
                await self._rollback_quietly(conn)
                self._release(conn)
                committing = committing or txn.ended  # committed (or maybe): no retry
                if (isinstance(exc, _RETRYABLE_TXN) or txn.replan) and not txn.ended \
                        and attempt <= self._retries:
                    log.info("%s: %s, retrying (attempt %d)", desc, type(exc).__name__, attempt)
                    continue
                if isinstance(exc, _LINK_ERRORS + _RETRYABLE_TXN):
                    if not committing and attempt <= self._retries and _link_error(exc):
                        log.warning("%s: database link lost, retrying", desc)
                        continue
                    log.warning("%s failed: %s", desc, str(exc).strip())
                    raise TemporaryFailure() from exc
                translated = _client_error(desc, exc)
                if translated is not None:
                    raise translated from exc
                raise
            self._release(conn)
            for hook, hook_args in txn._after_commit:
                try:
                    hook_result = hook(*hook_args)
                    if isinstance(hook_result, defer.Deferred):
                        hook_result.addErrback(_log_hook_failure, desc)
                except Exception:
                    log.exception("%s: after-commit hook failed", desc)
            return result

    async def _rollback_quietly(self, conn: PgConnection) -> None:
        if _is_broken(conn):
            return
        try:
            await conn.cursor().execute("ROLLBACK")
        except Exception:
            try:
                conn.close()
            except Exception:  # noqa: S110 - best effort on a dying link
                pass

    def run_query(self, desc: str, sql: str,
                  params: Any = None) -> defer.Deferred[list[dict[str, Any]]]:
        """A single read-only statement (the common read path)."""

        async def query(txn: Txn) -> list[dict[str, Any]]:
            return await txn.fetchall(sql, params)

        return self.run_read(desc, query)

    def run_read(self, desc: str, fn: Callable[..., Awaitable[T]], *args: Any,
                 **kwargs: Any) -> defer.Deferred[T]:
        """Run a read that issues ONE statement, without BEGIN/COMMIT.

        A single statement is atomic and sees one snapshot on its own, so the explicit
        transaction would only add two round trips; the hot paths (key lookup, lists)
        use this. ``fn`` must not issue more than one statement.
        """
        return defer.Deferred.fromCoroutine(self._run_read(desc, fn, args, kwargs))

    async def _run_read(self, desc: str, fn: Callable[..., Awaitable[T]],
                        args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        attempt = 0
        while True:
            attempt += 1
            conn = await self._acquire()
            txn = Txn(conn.cursor(), self.now(), None, self._preparer(conn))
            try:
                result = await fn(txn, *args, **kwargs)
            except BaseException as exc:
                self._release(conn)
                if txn.replan and attempt <= self._retries:
                    continue
                if isinstance(exc, _LINK_ERRORS):
                    if attempt <= self._retries and _link_error(exc):
                        log.warning("%s: database link lost, retrying", desc)
                        continue
                    log.warning("%s failed: %s", desc, str(exc).strip())
                    raise TemporaryFailure() from exc
                translated = _client_error(desc, exc)
                if translated is not None:
                    raise translated from exc
                raise
            self._release(conn)
            return result

    async def ping(self) -> bool:
        """Whether the database answers (readiness probes)."""
        try:
            await self.run_query("health.ping", "SELECT 1")
        except Exception:
            return False
        return True

    async def close(self) -> None:
        """Close every idle connection; in-flight ones close as they come back."""
        self._closed = True
        while self._idle:
            self._discard(self._idle.pop())
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                waiter.callback(None)


_UNSTORABLE = "The request holds a value the database cannot store."

#: One message: commit without waiting for the WAL flush (the locks go at once), then a
#: transaction that takes an xid and commits synchronously, which flushes the WAL up to
#: and past our commit record before the answer comes back (storage.imap_commits does
#: the same for IMAP's writes).
_FLUSH_ENDING = "COMMIT; BEGIN; SELECT pg_current_xact_id(); COMMIT"
_UNLOCK_THEN_FLUSH = f"SET LOCAL synchronous_commit TO OFF; {_FLUSH_ENDING}"
#: The session setting that carries Txn.commit_with's result past its COMMIT.
_RESULT_SETTING = "agentpost.result"


def _client_error(desc: str, exc: BaseException) -> AgentPostError | None:
    """The one translation of constraint and data errors no store caught itself.

    A unique (or exclusion, or foreign key) violation is a clash with existing state:
    Conflict (409). Any other integrity or data error (a check, a NOT NULL, an invalid
    byte sequence, a character not in the encoding, a date or number out of range) comes
    from a value the client sent: InvalidRequest (400). Stores still translate the cases
    they can word better; this is what keeps the rest from becoming a 500.
    """
    if isinstance(exc, psycopg2.errors.UniqueViolation | psycopg2.errors.ExclusionViolation
                  | psycopg2.errors.ForeignKeyViolation):
        log.info("%s: %s", desc, str(exc).strip())
        return Conflict()
    if isinstance(exc, psycopg2.IntegrityError | psycopg2.DataError):
        log.warning("%s: %s", desc, str(exc).strip())
        return InvalidRequest(_UNSTORABLE)
    return None


def _link_error(exc: BaseException) -> bool:
    """Lost or refused links, as opposed to a statement timeout or a bad query."""
    if isinstance(exc, psycopg2.errors.QueryCanceled):
        return False
    return isinstance(exc, _LINK_ERRORS) and not isinstance(exc, _RETRYABLE_TXN)


def _log_hook_failure(failure: Any, desc: str) -> None:
    log.error("%s: after-commit hook failed: %s", desc, failure.getErrorMessage())
