"""Requests with unknown API keys draw on the same failed-login allowances as IMAP
and SMTP AUTH, and leave the same fail2ban line.

An ``ap_sk_`` key cannot be guessed, so a source that keeps presenting unknown keys is
either broken or probing; either way it should be slowed and visible to fail2ban. Keys
that exist but no longer log in (revoked, expired, holder gone) are not guesses: they
are audited with their tenant (framework.py) but do not spend the allowances, so one
forgotten agent with an old key cannot get its whole host refused.

A correct key costs nothing extra: only sources that failed recently (remembered in
this process) have their allowances read before the key is checked.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from agentpost.core.login_guard import LoginAttempt, LoginGuard, client_source

log = logging.getLogger(__name__)

#: Sources remembered as having failed, and for how long.
REMEMBERED_SOURCES = 10_000
REMEMBER_S = 600.0


def key_hint(token: str) -> str:
    """How a presented key appears in logs: a digest prefix, never the key itself."""
    return "key-" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class PendingKeyAttempt:
    """An attempt not worked out yet: parsing the source and hashing the key costs a
    few microseconds per request, and only a request whose key proves unknown needs
    them (``unknown_key``)."""

    peer: str
    token: str


class FailedKeyThrottle:
    """The HTTP door's use of :class:`LoginGuard`."""

    def __init__(self, guard: LoginGuard, clock: IReactorTime) -> None:
        self._guard = guard
        self._clock = clock
        self._failed: OrderedDict[str, float] = OrderedDict()

    def _recently_failed(self, peer: str) -> bool:
        # Remembered by source as the allowances count it (an IPv6 /64, not one
        # address): otherwise each fresh address of an attacker's /64 would skip the
        # allowance check and guess unthrottled.
        at = self._failed.get(client_source(peer))
        return at is not None and self._clock.seconds() - at < REMEMBER_S

    async def admit(self, peer: str | None,
                    token: str) -> LoginAttempt | PendingKeyAttempt | None:
        """Raise RateLimited when a source that failed recently has used up its
        allowance; otherwise the attempt to charge if the key turns out unknown."""
        if not peer:
            return None
        if self._recently_failed(peer):
            return await self._guard.admit("http", peer, key_hint(token))
        return PendingKeyAttempt(peer, token)

    async def unknown_key(self, attempt: LoginAttempt | PendingKeyAttempt | None) -> None:
        """Spend the allowances and log the fail2ban line; never fails the request
        differently (a database fault here still answers 401)."""
        if attempt is None:
            return
        if isinstance(attempt, PendingKeyAttempt):
            attempt = self._guard.attempt("http", attempt.peer, key_hint(attempt.token))
        source = client_source(attempt.peer)
        self._failed[source] = self._clock.seconds()
        self._failed.move_to_end(source)
        while len(self._failed) > REMEMBERED_SOURCES:
            self._failed.popitem(last=False)
        try:
            await self._guard.failed(attempt, None, "unknown-key")
        except Exception as exc:  # the line is logged; the allowance is best effort
            log.warning("could not record a failed key: %s", exc)
