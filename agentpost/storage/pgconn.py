"""The pool's PostgreSQL connection: psycopg2's async mode, polled through a socket we own.

Why not txpostgres.Connection (storage.notify still uses it, for LISTEN): for every
statement it takes the connection off the reactor's readers, adds the cursor, takes the
cursor off, adds the connection back (four epoll_ctl calls and as many rounds of Twisted
bookkeeping), and hands each result over through ``callLater(0)``. That was a fifth of
the server's CPU per statement.

Why a duplicate of libpq's socket: keeping libpq's own fd registered for the
connection's life is not safe. When the link breaks, libpq closes that fd itself, while
the reactor still watches the number; the next socket opened may get the same number,
and Twisted's bookkeeping then points at the wrong socket (a stale entry, a KeyError, a
reader that never fires). Here the reactor watches ``os.dup`` of libpq's socket
(close-on-exec), which only this class closes, and only after removing it from the
reactor: libpq closing its fd leaves our duplicate, the socket behind it and its epoll
registration intact, and no number the reactor knows can be reused under it.

The duplicate stays a reader from connect to close; it is a writer only while a
statement's send would block. Any failure removes it from the reactor before anything
else, so a socket at end of file (readable for ever, level-triggered) cannot spin the
reactor. Results are handed over at once (nothing of ours runs after the hand-over, so
the next statement may start from inside the callback).

Scope: one statement at a time per connection (the pool lends a connection to one
transaction) and no LISTEN (NOTIFY on these sessions is never asked for). A statement
is psycopg2's, or a libpq pipeline with binary parameters (:meth:`PgConnection.run_pipeline`,
storage.libpq_pipeline), driven through the same socket and the same rules.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import psycopg2
import psycopg2.extensions
from twisted.internet import defer, main
from twisted.internet.interfaces import IReadWriteDescriptor
from twisted.python import failure
from zope.interface import implementer

from agentpost.storage.libpq_pipeline import Pipeline, Statement, Wait

_POLL_OK = psycopg2.extensions.POLL_OK
_POLL_READ = psycopg2.extensions.POLL_READ
_POLL_WRITE = psycopg2.extensions.POLL_WRITE


class CancelInProgress(Exception):
    """Raised by a statement's canceller: the server was asked to cancel, and the
    statement's Deferred fires (CancelledError) once the server answers, because the
    protocol only gets back to idle through that answer (txpostgres does the same)."""


class UnexpectedPollResult(Exception):
    """psycopg2's poll() answered something outside POLL_OK/READ/WRITE."""


class Cursor(psycopg2.extensions.cursor):
    """A psycopg2 cursor whose ``execute`` returns a Deferred (fired with the cursor).

    A subclass rather than a wrapper, so ``rowcount``, ``description`` and the fetches
    stay psycopg2's own C attributes on the hot path."""

    owner: PgConnection

    def execute(self, query: Any, vars: Any = None) -> Any:
        """Send ``query``; the Deferred fires once its result is in."""
        try:
            super().execute(query, vars)
        except Exception:
            return defer.fail()
        return self.owner._wait(self)


@implementer(IReadWriteDescriptor)
class PgConnection:
    """One async psycopg2 connection, watched through our own duplicate of its socket."""

    #: storage.database's state of this session (its prepared statements).
    _agentpost_session: Any = None

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        #: The psycopg2 connection (the same attribute name as txpostgres's).
        self._connection: Any = None
        self._fd = -1  # our duplicate of libpq's socket; -1 once closed
        self._reading = False
        self._writing = False
        self._connecting = False
        self._cancelling = False
        self._waiter: defer.Deferred[Any] | None = None
        self._result: Any = None
        self._pipeline: Pipeline | None = None  # a libpq pipeline in flight instead

    # -- the surface storage.database uses --------------------------------------

    def connect(self, dsn: str, **kwargs: Any) -> defer.Deferred[PgConnection]:
        """Open the connection; the Deferred fires with ``self`` once it is ready."""
        try:
            self._connection = psycopg2.connect(dsn, async_=True, **kwargs)
        except Exception:
            return defer.fail()
        self._connecting = True
        return self._wait(self)

    def cursor(self) -> Cursor:
        """A cursor whose statements run on this connection (one at a time)."""
        cur: Cursor = self._connection.cursor(cursor_factory=Cursor)
        cur.owner = self
        return cur

    def run_pipeline(self, statements: Sequence[Statement]) -> defer.Deferred[None]:
        """Send ``statements`` through libpq's pipeline mode (storage.libpq_pipeline: binary
        parameters, one round trip); the Deferred fires once all were answered, or fails
        with the first statement's error (in psycopg2's class)."""
        if self._waiter is not None:
            return defer.fail(RuntimeError("a statement is already in progress"))
        try:
            pipeline = Pipeline(self._connection, statements)
        except Exception:
            fault = failure.Failure()
            if self._connection.closed:
                self._unwatch()
            return defer.fail(fault)
        d: defer.Deferred[None] = defer.Deferred(self._cancel)
        self._waiter, self._result, self._pipeline = d, None, pipeline
        self._advance_pipeline()
        return d

    def close(self) -> None:
        """Close the link (safe to call again); a statement still waiting fails."""
        self._pipeline = None
        waiter, self._waiter = self._waiter, None
        self._unwatch()
        raw = self._connection
        if raw is not None and not raw.closed:
            raw.close()
        if waiter is not None:
            waiter.errback(failure.Failure(main.CONNECTION_DONE))

    # -- IReadWriteDescriptor ---------------------------------------------------

    def fileno(self) -> int:
        """Our duplicate (never libpq's own fd), or -1 once closed."""
        return self._fd

    def logPrefix(self) -> str:
        """Twisted's log context: "-", as before. Results are handed over inside
        doRead, so every legacy log line of the code they resume (a listener starting
        after the start-up queries, say) carries this prefix; naming the driver there
        would attribute those lines to it."""
        return "-"

    def doRead(self) -> None:
        """A result arriving, or between statements a notice or the end of the link."""
        if self._pipeline is not None:
            self._advance_pipeline()
        elif self._waiter is not None:
            if self._connecting and not self._reading:
                return  # a stale event (epoll reports IN to a writer too): libpq said wait
            self._advance()
        else:
            self._idle_read()

    def doWrite(self) -> None:
        """The rest of a statement that did not fit into the socket at once."""
        if self._pipeline is not None:
            self._advance_pipeline()
        elif self._waiter is not None:
            self._advance()
        else:
            self._set_writing(False)

    def connectionLost(self, reason: failure.Failure) -> None:
        """The reactor dropped us (shutdown, or an error event): this link is done. A
        statement still waiting is polled once first, to report the driver's own error."""
        if self._waiter is not None and self._pipeline is None \
                and self._connection is not None and not self._connection.closed:
            self._advance()
        self._pipeline = None
        waiter, self._waiter = self._waiter, None
        self._unwatch()
        if self._connection is not None and not self._connection.closed:
            self._connection.close()
        if waiter is not None:
            waiter.errback(reason)

    # -- polling ----------------------------------------------------------------

    def _wait(self, result: Any) -> defer.Deferred[Any]:
        """Poll until psycopg2 reports done; the Deferred then fires with ``result``."""
        if self._waiter is not None:  # psycopg2 refuses this before we get here
            return defer.fail(RuntimeError("a statement is already in progress"))
        d: defer.Deferred[Any] = defer.Deferred(self._cancel)
        self._waiter, self._result = d, result
        self._advance()
        return d

    def _advance(self) -> None:
        """One step of psycopg2's poll cycle. Firing the waiter comes last: its callbacks
        may start the next statement on this connection."""
        raw = self._connection
        try:
            state = raw.poll()
            if state == _POLL_OK:
                if self._connecting:
                    self._connecting = False
                    self._watch(reading=True, writing=False)  # for the connection's life
                else:
                    self._set_writing(False)
                self._fire(self._result)
            elif state != _POLL_READ and state != _POLL_WRITE:
                raise UnexpectedPollResult(state)
            elif self._connecting:
                self._watch(reading=state == _POLL_READ, writing=state == _POLL_WRITE)
            else:
                self._set_writing(state == _POLL_WRITE)
        except Exception:
            fault = failure.Failure()
            if raw.closed or self._connecting or fault.check(UnexpectedPollResult, OSError):
                self._unwatch()
                if not raw.closed:
                    raw.close()
            else:  # an error of the statement (the link is fine and idle again)
                self._set_writing(False)
            if self._cancelling and fault.check(psycopg2.extensions.QueryCanceledError):
                fault = failure.Failure(defer.CancelledError())
            self._fire(fault)

    def _advance_pipeline(self) -> None:
        """One step of a pipeline (run_pipeline): :meth:`_advance`'s rules, libpq's calls."""
        pipeline = self._pipeline
        assert pipeline is not None
        try:
            wait = pipeline.step()
        except Exception:  # the link: it is closed and leaves the reactor
            fault = failure.Failure()
            self._pipeline = None
            self._unwatch()
            if not self._connection.closed:
                self._connection.close()
            self._fire(fault)
            return
        if wait is not Wait.DONE:
            self._set_writing(wait is Wait.WRITE)
            return
        self._pipeline = None
        self._set_writing(False)
        error = pipeline.error
        if error is None:
            self._fire(None)
            return
        try:
            raise error
        except psycopg2.Error:
            fault = failure.Failure()
        if self._cancelling and fault.check(psycopg2.extensions.QueryCanceledError):
            fault = failure.Failure(defer.CancelledError())
        self._fire(fault)

    def _fire(self, result: Any) -> None:
        waiter, self._waiter, self._result = self._waiter, None, None
        self._cancelling = False
        if waiter is None:
            return
        if isinstance(result, failure.Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)

    def _idle_read(self) -> None:
        """Readable with no statement in flight: consume it (a notice, a parameter
        change); a link that errs or ended here is closed and leaves the reactor now,
        before level-triggered EOF can bring us back."""
        raw = self._connection
        try:
            raw.poll()
        except Exception:
            self._unwatch()
            if not raw.closed:
                raw.close()
            return
        if raw.closed:
            self._unwatch()
        elif raw.notifies:
            del raw.notifies[:]  # nobody LISTENs on a pooled session

    def _cancel(self, d: defer.Deferred[Any]) -> None:
        """Deferred cancellation. While connecting: give up the attempt (the Deferred
        then fails with CancelledError). A statement: ask the server to cancel it and
        keep waiting for its answer (CancelInProgress, as txpostgres)."""
        if self._connecting:
            self._waiter = self._result = None
            self._connecting = False
            self.close()
            return
        self._cancelling = True
        try:
            self._connection.cancel()
        except Exception:  # noqa: S110 - a dead link reports itself at the next poll
            pass
        raise CancelInProgress()

    # -- the reactor's view of our socket ------------------------------------------

    def _watch(self, *, reading: bool, writing: bool) -> None:
        """Watch libpq's current socket through our duplicate, for exactly ``reading``
        and ``writing`` (while connecting libpq asks for one; a premature poll could
        take a connect still in progress for done)."""
        raw_fd = self._connection.fileno()
        if self._fd == -1:
            self._fd = os.dup(raw_fd)  # non-inheritable (close-on-exec)
        elif not _same_socket(raw_fd, self._fd):
            # libpq moved to another socket (the next address, a retry without SSL):
            # off the reactor first, then the new socket under the SAME number, as the
            # reactor checks that the number it is dispatching did not change.
            self._reactor.removeReader(self)
            self._reactor.removeWriter(self)
            self._reading = self._writing = False
            os.dup2(raw_fd, self._fd, inheritable=False)
        if reading != self._reading:
            self._reading = reading
            if reading:
                self._reactor.addReader(self)
            else:
                self._reactor.removeReader(self)
        self._set_writing(writing)

    def _set_writing(self, writing: bool) -> None:
        if writing != self._writing and self._fd != -1:
            self._writing = writing
            if writing:
                self._reactor.addWriter(self)
            else:
                self._reactor.removeWriter(self)

    def _unwatch(self) -> None:
        """Leave the reactor, then close our duplicate (in that order: the reactor must
        never hold a number we no longer own)."""
        fd = self._fd
        if fd == -1:
            return
        self._reactor.removeReader(self)
        self._reactor.removeWriter(self)
        self._reading = self._writing = False
        self._fd = -1
        os.close(fd)


def _same_socket(fd_a: int, fd_b: int) -> bool:
    a, b = os.fstat(fd_a), os.fstat(fd_b)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
