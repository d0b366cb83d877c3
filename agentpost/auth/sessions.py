"""Long-lived sessions that stay honest about the credential they logged in with.

An HTTP request presents its key every time and is checked every time. An IMAP
session (and, later, an SMTP submission session or a WebSocket) logs in once and may
then live for hours, IDLE included, so "a revoked or expired key is refused on every
subsequent request" needs a component of its own. :class:`LiveCredentials` is that
component; it knows nothing of any protocol:

- A session registers its :class:`~agentpost.model.principal.Principal` and an
  ``on_end(reason)`` callback, and calls :meth:`LiveSession.check` before each command
  (cheap: in-memory, no query) and :meth:`LiveSession.close` when it ends.
- Revocations arrive through PostgreSQL LISTEN/NOTIFY on
  :data:`agentpost.storage.keys.KEY_CHANNEL` (sent in the revoking transaction, so
  delivered at COMMIT to every process). A notification only says "look again": the
  key is re-read from the database, and its sessions end if it is dead.
- Notifications can be missed (the LISTEN link reconnecting), so every key with live
  sessions is also re-read every :data:`RECHECK_INTERVAL_S` seconds -- one statement
  for all the keys of the process, not one per command -- and a command never runs
  on a key last confirmed more than twice that long ago.
- A key reaching ``expires_at`` ends its sessions by a timer on the injected clock,
  whether or not they are doing anything.
- A key whose power shrank (its holder demoted or moved out of an environment) ends
  the sessions that were granted more: they log in again and get what is left.

Ending is the protocol's job (``on_end``): IMAP says ``* BYE`` and hangs up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from agentpost.auth.cred import principal_from_key
from agentpost.model.errors import Unauthenticated
from agentpost.model.principal import Principal
from agentpost.model.scopes import ROLE_RANK
from agentpost.storage import keys as key_store
from agentpost.storage.database import Database
from agentpost.storage.notify import Notifier

log = logging.getLogger(__name__)

__all__ = ["EXPIRED", "NARROWED", "RECHECK_INTERVAL_S", "REVOKED", "LiveCredentials",
           "LiveSession"]

#: Every key with live sessions is re-read from the database this often.
RECHECK_INTERVAL_S = 30.0
#: Keys per re-check statement.
KEYS_PER_QUERY = 1000

REVOKED = "The API key was revoked; log in again with a valid key"
EXPIRED = "The API key has expired; log in again with a valid key"
NARROWED = "The API key's permissions changed; log in again"


def _narrowed(old: Principal, new: Principal) -> bool:
    """Whether ``new`` may do less than ``old`` did (a widened key keeps its sessions)."""
    if not old.scopes <= new.scopes:
        return True
    if new.environment_ids is not None and (
            old.environment_ids is None or not old.environment_ids <= new.environment_ids):
        return True
    return ROLE_RANK.get(new.role, 0) < ROLE_RANK.get(old.role, 0)


class _Key:
    """What this process knows about one key with live sessions."""

    def __init__(self, org_id: str, key_id: str) -> None:
        self.org_id = org_id
        self.key_id = key_id
        self.sessions: set[LiveSession] = set()
        self.expires_at: float | None = None  # epoch seconds
        self.validated_at = float("-inf")  # when the last successful re-read started
        self.notified = 0  # the notification not yet followed by a re-read (0: none)
        self.expiry_timer: Any = None
        self.unwatch: Callable[[], None] | None = None


class LiveSession:
    """One session's hold on its credential; see :class:`LiveCredentials`."""

    def __init__(self, owner: LiveCredentials, key: _Key, principal: Principal,
                 on_end: Callable[[str], None]) -> None:
        self._owner = owner
        self._key = key
        self.principal = principal
        self._on_end = on_end
        self.active = False  # set once registration is complete
        self.ended: str | None = None  # why the session must end, once it must

    async def check(self) -> str | None:
        """None while the credential may still be used; else why the session must end.

        In memory, except when the key was last confirmed more than two re-check
        intervals ago (the periodic re-read failing): then the key is read now, and a
        database failure raises ``TemporaryFailure`` (the command fails, the session
        stays)."""
        if self.ended is None:
            await self._owner._check(self._key)
        return self.ended

    def close(self) -> None:
        """The session is over: stop tracking it."""
        self._owner._forget_session(self, None)


class LiveCredentials:
    """Tracks the credentials of live sessions and ends sessions whose key died.

    Generic over protocols: IMAP uses it today; SMTP submission and WebSockets can
    register their sessions the same way (see the module docstring).

    Arguments:
        db: where keys are re-read (``storage.keys.live_api_keys``).
        clock: every timer and every expiry comparison uses it.
        notifier: LISTEN on ``KEY_CHANNEL``, started and stopped with this component
            (None: periodic re-reads only).
        recheck_interval_s: how often keys with live sessions are re-read.
    """

    def __init__(self, db: Database, clock: IReactorTime, notifier: Notifier | None = None,
                 *, recheck_interval_s: float = RECHECK_INTERVAL_S) -> None:
        self._db = db
        self._clock = clock
        self._notifier = notifier
        self.recheck_interval_s = recheck_interval_s
        self._keys: dict[str, _Key] = {}
        self._notes = 0  # notifications received, numbered
        self._suspect_call: Any = None
        self._sweep_call: Any = None
        self.queries = 0  # re-read statements issued (tests count them)

    # ------------------------------------------------------------------ sessions

    async def register(self, principal: Principal,
                       on_end: Callable[[str], None]) -> LiveSession:
        """Track a session that just logged in with ``principal``'s key.

        The key is watched before it is read, so a revocation committed at any moment
        after the login's own check is seen. Raises Unauthenticated when the key died
        in between (``on_end`` is not called then), TemporaryFailure when the database
        cannot be read.
        """
        if principal.credential_type != "api_key":
            raise ValueError(f"cannot track {principal.credential_type} credentials")
        key = self._keys.get(principal.credential_id)
        if key is None:
            key = self._keys[principal.credential_id] = _Key(principal.org_id,
                                                              principal.credential_id)
            if self._notifier is not None:
                key.unwatch = self._notifier.watch(key.key_id,
                                                   lambda: self._suspect(key.key_id))
            self._arm_sweep()
        session = LiveSession(self, key, principal, on_end)
        key.sessions.add(session)
        try:
            if key.notified or \
                    self._clock.seconds() - key.validated_at > self.recheck_interval_s:
                await self._validate([key])
            else:
                self._expire_if_due(key)
        except BaseException:
            self._forget_session(session, None)
            raise
        if session.ended is not None:
            raise Unauthenticated("Authentication failed.")
        session.active = True
        return session

    def _expire_if_due(self, key: _Key) -> None:
        """End the key's sessions if it has expired by now (the in-memory check)."""
        if key.expires_at is not None and self._clock.seconds() >= key.expires_at:
            self._end_key(key, EXPIRED)

    async def _check(self, key: _Key) -> None:
        # A command never runs on a key that was notified and not re-read since (the
        # re-read is queued, but a pipelined command could come first), nor on a key
        # the periodic re-read has not confirmed for two intervals.
        stale = self._clock.seconds() - key.validated_at > 2 * self.recheck_interval_s
        if (key.notified or stale) and self._keys.get(key.key_id) is key:
            await self._validate([key])
        self._expire_if_due(key)

    def _forget_session(self, session: LiveSession, reason: str | None) -> None:
        key = session._key
        if session.ended is None:
            session.ended = reason or "closed"
        key.sessions.discard(session)
        if not key.sessions and self._keys.get(key.key_id) is key:
            del self._keys[key.key_id]
            if key.expiry_timer is not None and key.expiry_timer.active():
                key.expiry_timer.cancel()
            key.expiry_timer = None
            if key.unwatch is not None:
                unwatch, key.unwatch = key.unwatch, None
                unwatch()

    def _end_key(self, key: _Key, reason: str, only: set[LiveSession] | None = None) -> None:
        """End the key's sessions (or just ``only``): each is told why, once."""
        for session in list(only if only is not None else key.sessions):
            if session.ended is not None:
                continue
            self._forget_session(session, reason)
            if not session.active:
                continue  # still registering: register() raises instead
            log.info("ending a session of key %s: %s", key.key_id, reason)
            try:
                session._on_end(reason)
            except Exception:
                log.exception("ending a session of key %s failed", key.key_id)

    # ------------------------------------------------------------------ re-reading keys

    async def _validate(self, keys: list[_Key]) -> None:
        """Re-read ``keys`` (one statement per KEYS_PER_QUERY) and apply what was found."""
        for start in range(0, len(keys), KEYS_PER_QUERY):
            batch = keys[start:start + KEYS_PER_QUERY]
            started, notes = self._clock.seconds(), self._notes
            self.queries += 1
            rows = await self._db.run_read("auth.live_keys", key_store.live_api_keys,
                                           [(k.org_id, k.key_id) for k in batch])
            found = {(r["org_id"], r["id"]): r for r in rows}
            for key in batch:
                if key.notified <= notes:  # no notification came during the read
                    key.notified = 0
                self._apply(key, found.get((key.org_id, key.key_id)), started)

    def _apply(self, key: _Key, row: dict[str, Any] | None, started: float) -> None:
        key.validated_at = max(key.validated_at, started)
        current: Principal | None = None
        expires_at: float | None = None
        if row is not None:
            try:
                current = principal_from_key(row)
            except UnauthorizedLogin:  # its holder is no longer a member
                current = None
            if row["expires_at"] is not None:
                expires_at = row["expires_at"].timestamp()
        if current is None:
            expired = key.expires_at is not None and self._clock.seconds() >= key.expires_at
            self._end_key(key, EXPIRED if expired else REVOKED)
            return
        self._end_key(key, NARROWED, {s for s in key.sessions
                                      if _narrowed(s.principal, current)})
        if expires_at != key.expires_at or key.expiry_timer is None:
            key.expires_at = expires_at
            self._arm_expiry(key)

    def _arm_expiry(self, key: _Key) -> None:
        if key.expiry_timer is not None and key.expiry_timer.active():
            key.expiry_timer.cancel()
        key.expiry_timer = None
        if key.expires_at is None or self._keys.get(key.key_id) is not key:
            return
        delay = max(0.0, key.expires_at - self._clock.seconds())
        key.expiry_timer = self._clock.callLater(delay, self._expired, key)

    def _expired(self, key: _Key) -> None:
        key.expiry_timer = None
        if key.expires_at is not None and self._clock.seconds() >= key.expires_at:
            self._end_key(key, EXPIRED)
        else:
            self._arm_expiry(key)

    def _suspect(self, key_id: str) -> None:
        """A notification (or the LISTEN link coming back): re-read soon, coalesced, so a
        reconnect waking every key costs one statement."""
        key = self._keys.get(key_id)
        if key is None:
            return
        self._notes += 1
        key.notified = self._notes
        if self._suspect_call is None:
            self._suspect_call = self._clock.callLater(0, self._reread_suspects)

    def _reread_suspects(self) -> None:
        self._suspect_call = None
        keys = [key for key in self._keys.values() if key.notified]
        if keys:
            self._run(keys, "notified keys")

    def _run(self, keys: list[_Key], what: str) -> defer.Deferred[None]:
        d = defer.ensureDeferred(self._validate(keys))
        d.addErrback(lambda f: log.warning("re-reading %s failed: %s", what,
                                           f.getErrorMessage()))
        return d

    def _arm_sweep(self) -> None:
        if self._sweep_call is None:
            self._sweep_call = self._clock.callLater(self.recheck_interval_s, self._sweep)

    def _sweep(self) -> None:
        self._sweep_call = None
        if not self._keys:
            return
        d = self._run(list(self._keys.values()), "keys of live sessions")
        d.addBoth(lambda _: self._arm_sweep() if self._keys else None)

    async def start(self) -> None:
        """Start listening for key notifications (reconnecting in the background)."""
        if self._notifier is not None:
            await self._notifier.start()

    def stop(self) -> None:
        """Stop listening, every timer and watch (the process is stopping)."""
        if self._notifier is not None:
            self._notifier.stop()
        for call in (self._sweep_call, self._suspect_call):
            if call is not None and call.active():
                call.cancel()
        self._sweep_call = self._suspect_call = None
        for key in list(self._keys.values()):
            if key.expiry_timer is not None and key.expiry_timer.active():
                key.expiry_timer.cancel()
            if key.unwatch is not None:
                key.unwatch()
        self._keys.clear()
