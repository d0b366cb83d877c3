"""A few statements with binary parameters, sent through libpq's pipeline mode on one of
the pool's psycopg2 connections (issue 12).

Why: psycopg2 binds every parameter client-side, into the statement's text. A message
kept in PostgreSQL (storage.blobs.inline) therefore travels as a literal the size of the
message, which the server's lexer then reads a byte at a time: at 100 KiB that was a
fifth of PostgreSQL's CPU per delivery (``perf``: ``core_yylex``), about as much as
compressing and WAL-logging the same bytes. A ``bytea`` parameter in binary format is
copied as it is. psycopg2 cannot send one, but the libpq it runs on can:
``PQsendQueryParams`` with a binary format, in pipeline mode so that ``BEGIN`` and the
statements travel in one round trip.

How it is safe to use libpq beside psycopg2:

- **The same libpq.** The functions are looked up through psycopg2's own extension
  module (``dlsym`` on its handle searches the libraries it was linked with), so they
  are exactly those of the library that owns the connection, whether psycopg2 was
  built against the system's libpq or ships its own. Without pipeline mode (libpq
  before 14) :func:`available` is False and callers keep the literal.
- **Only between psycopg2's statements.** A pipeline starts on an idle connection,
  and :class:`Pipeline` reads every result, up to the pipeline's sync, and leaves
  pipeline mode before the connection is handed back: psycopg2 finds it as idle as it
  left it (in a transaction, or in an aborted one after an error, which the caller's
  ROLLBACK ends as usual).
- **Errors in psycopg2's classes.** A statement's error becomes the psycopg2 exception
  of its SQLSTATE (``psycopg2.errors.lookup``), so the callers' handling (deadlock
  retries, constraint translation) is unchanged; a broken link is an
  ``OperationalError``.

The socket is the connection's (storage.pgconn watches it); this module only says
whether the next step needs it readable or writable.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.errors

# libpq's ExecStatusType values read here (libpq-fe.h)
_FATAL_ERROR, _PIPELINE_SYNC = 7, 10
_DIAG_SQLSTATE = ord("C")
_BYTEA_OID = 17


class Wait(enum.Enum):
    """What :meth:`Pipeline.step` needs next."""

    READ = "read"
    WRITE = "write"
    DONE = "done"


@dataclass(frozen=True)
class Statement:
    """One statement of a pipeline: ``$n`` parameters as bytes (text format: the value's
    text, UTF-8; binary: the type's binary form), ``binary[i]`` says which.

    ``name``: run the connection's prepared statement of that name (``prepare``: prepare
    it from ``sql`` first, in the same pipeline); without one the statement is parsed and
    planned every time."""

    sql: str
    params: Sequence[bytes | None] = ()
    binary: Sequence[bool] = ()
    name: str | None = None
    prepare: bool = False


def bytea_array(values: Sequence[bytes]) -> bytes:
    """A one-dimensional ``bytea[]`` in PostgreSQL's binary format (array_recv): its
    header, then each element as its length and its bytes (one copy of the bytes)."""
    parts = [struct.pack("!iiIii", 1, 0, _BYTEA_OID, len(values), 1)]
    for value in values:
        parts.append(struct.pack("!i", len(value)))
        parts.append(value)
    return b"".join(parts)


class _LibPQ:
    """The libpq functions a pipeline needs, from psycopg2's own libpq."""

    def __init__(self) -> None:
        import psycopg2._psycopg as extension

        lib = ctypes.CDLL(extension.__file__)
        vp, ci, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p

        def fn(name: str, restype: Any, *argtypes: Any) -> Any:
            f = getattr(lib, name)  # AttributeError: this libpq lacks it
            f.restype, f.argtypes = restype, list(argtypes)
            return f

        self.send = fn("PQsendQueryParams", ci, vp, cp, ci, vp, ctypes.POINTER(cp),
                       ctypes.POINTER(ci), ctypes.POINTER(ci), ci)
        self.send_prepare = fn("PQsendPrepare", ci, vp, cp, cp, ci, vp)
        self.send_prepared = fn("PQsendQueryPrepared", ci, vp, cp, ci, ctypes.POINTER(cp),
                                ctypes.POINTER(ci), ctypes.POINTER(ci), ci)
        self.enter = fn("PQenterPipelineMode", ci, vp)
        self.exit = fn("PQexitPipelineMode", ci, vp)
        self.sync = fn("PQpipelineSync", ci, vp)
        self.flush = fn("PQflush", ci, vp)
        self.consume = fn("PQconsumeInput", ci, vp)
        self.busy = fn("PQisBusy", ci, vp)
        self.result = fn("PQgetResult", vp, vp)
        self.status = fn("PQresultStatus", ci, vp)
        self.field = fn("PQresultErrorField", cp, vp, ci)
        self.message = fn("PQresultErrorMessage", cp, vp)
        self.error = fn("PQerrorMessage", cp, vp)
        self.clear = fn("PQclear", None, vp)


def _load() -> _LibPQ | None:
    try:
        return _LibPQ()
    except (OSError, AttributeError, ImportError):
        return None


_LIB = _load()


def available() -> bool:
    """Whether psycopg2's libpq has pipeline mode (14 or later) and could be reached."""
    return _LIB is not None


class Pipeline:
    """One pipeline on one idle psycopg2 connection (``raw``): sent by the constructor,
    then driven by :meth:`step` until it answers :attr:`Wait.DONE`; :attr:`error` is
    the first statement's error, if any (the others were then skipped by the server).
    A broken link raises from the constructor or from :meth:`step`."""

    def __init__(self, raw: Any, statements: Sequence[Statement]) -> None:
        if _LIB is None:
            raise psycopg2.InterfaceError("libpq pipeline mode is not available")
        self._lib = _LIB
        self._ptr = ctypes.c_void_p(raw.pgconn_ptr)
        self._raw = raw
        self.error: psycopg2.Error | None = None
        self._flushing = True
        lib, ptr = self._lib, self._ptr
        if raw.closed or not lib.enter(ptr):
            raise psycopg2.InterfaceError(self._link_message("cannot enter pipeline mode"))
        try:
            for statement in statements:
                if not self._send(statement):
                    raise psycopg2.OperationalError(self._link_message("send failed"))
            if not lib.sync(ptr):
                raise psycopg2.OperationalError(self._link_message("sync failed"))
        except BaseException:
            # half a pipeline queued (a refused send, a value ctypes cannot pass): the
            # link cannot go back to psycopg2 in that state
            self._abandon()
            raise

    def _send(self, statement: Statement) -> bool:
        count = len(statement.params)
        values = (ctypes.c_char_p * count)(*statement.params)
        lengths = (ctypes.c_int * count)(*(len(p or b"") for p in statement.params))
        formats = (ctypes.c_int * count)(*(int(b) for b in statement.binary)) \
            if statement.binary else None
        lib, ptr, sql = self._lib, self._ptr, statement.sql.encode("utf-8")
        if statement.name is None:
            return bool(lib.send(ptr, sql, count, None, values, lengths, formats, 0))
        name = statement.name.encode("ascii")
        if statement.prepare and not lib.send_prepare(ptr, name, sql, count, None):
            return False
        return bool(lib.send_prepared(ptr, name, count, values, lengths, formats, 0))

    def step(self) -> Wait:
        """Send what is left, read what has arrived; what to wait for next."""
        lib, ptr = self._lib, self._ptr
        if self._flushing:
            sent = lib.flush(ptr)
            if sent < 0:
                raise psycopg2.OperationalError(self._link_message("send failed"))
            if sent:
                # libpq may need our input read before it can write more
                if not lib.consume(ptr):
                    raise psycopg2.OperationalError(self._link_message("receive failed"))
                return Wait.WRITE
            self._flushing = False
        if not lib.consume(ptr):
            raise psycopg2.OperationalError(self._link_message("receive failed"))
        ended = False
        while not lib.busy(ptr):
            result = lib.result(ptr)
            if not result:
                if ended:  # never twice in a row on a sound link: do not spin on it
                    raise psycopg2.OperationalError(self._link_message("results lost"))
                ended = True  # the end of one statement's results
                continue
            ended = False
            try:
                status = lib.status(result)
                if status == _PIPELINE_SYNC:
                    if not lib.exit(ptr):
                        raise psycopg2.OperationalError(
                            self._link_message("cannot leave pipeline mode"))
                    return Wait.DONE
                if status == _FATAL_ERROR and self.error is None:
                    self.error = self._statement_error(result)
            finally:
                lib.clear(result)
        return Wait.READ

    def _statement_error(self, result: int) -> psycopg2.Error:
        lib = self._lib
        code = (lib.field(result, _DIAG_SQLSTATE) or b"").decode("ascii", "replace")
        text = (lib.message(result) or b"").decode("utf-8", "replace").strip()
        try:
            cls = psycopg2.errors.lookup(code)
        except KeyError:
            cls = psycopg2.DatabaseError
        error: psycopg2.Error = cls(text)
        # pgcode and pgerror as psycopg2's own errors carry them (its pickling hook)
        error.__setstate__({"pgerror": text, "pgcode": code or None})  # type: ignore[no-untyped-call]
        return error

    def _link_message(self, what: str) -> str:
        detail = (self._lib.error(self._ptr) or b"").decode("utf-8", "replace").strip()
        return f"{what}: {detail}" if detail else what

    def _abandon(self) -> None:
        """A send failed half-way: the link is unusable; closed here (the caller then
        takes it off the reactor)."""
        self._raw.close()
