"""twisted.cred glue: credentials, checkers and the one realm.

HTTP presents an ``IAPIKeyCredentials``; SMTP AUTH and IMAP LOGIN will present
``IUsernamePassword`` whose password is an API key. Both end at the same checker and
the same realm, which yields a ``Principal``, so every protocol enforces identical
rules (revocation, expiry, environments, scopes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred import credentials as tcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from agentpost.auth import secrets
from agentpost.auth.key_cache import KeyCache
from agentpost.model.principal import AdminPrincipal, Principal
from agentpost.model.scopes import ROLE_SCOPES, weakest_role
from agentpost.storage import keys as key_store
from agentpost.storage.database import Database

log = logging.getLogger(__name__)

LAST_USED_RESOLUTION_S = 60


class IAPIKeyCredentials(tcred.ICredentials):
    """A bearer API key."""

    key = Attribute("The presented key, as text.")


class IAdminKeyCredentials(tcred.ICredentials):
    """A bearer admin key."""

    key = Attribute("The presented admin key, as text.")


class IPrincipal(Interface):
    """Avatar interface: an organization-scoped Principal."""


class IAdminPrincipal(Interface):
    """Avatar interface: an installation operator."""


@implementer(IAPIKeyCredentials)
@dataclass(frozen=True)
class APIKeyCredentials:
    """A bearer API key presented over any protocol."""

    key: str


@implementer(IAdminKeyCredentials)
@dataclass(frozen=True)
class AdminKeyCredentials:
    """A bearer admin key presented to /admin/v1."""

    key: str


@dataclass(frozen=True)
class KeyIdentity:
    """What a checker proved: the stored key row (passed to the realm as the avatar id)."""

    row: dict[str, Any]


@dataclass(frozen=True)
class AdminIdentity:
    """What the admin checker proved."""

    admin_key_id: str


class RefusedKey(UnauthorizedLogin):
    """A well-formed API key that does not log in; when it exists (revoked, expired,
    holder gone), which organization and key it is, for that tenant's audit trail
    only — the client is answered exactly as for an unknown key."""

    def __init__(self, message: str, *, org_id: str | None = None, key_id: str | None = None,
                 state: str | None = None) -> None:
        super().__init__(message)
        self.org_id = org_id
        self.key_id = key_id
        self.state = state


@implementer(ICredentialsChecker)
class APIKeyChecker:
    """Checks organization API keys against their stored SHA-256 digests."""

    credentialInterfaces = (IAPIKeyCredentials, tcred.IUsernamePassword)

    def __init__(self, db: Database, cache: KeyCache | None = None) -> None:
        self._db = db
        self._cache = cache

    # Twisted annotates avatar ids as bytes, but Portal hands whatever the checker
    # produces to the realm untouched; ours are identities (see AgentPostRealm).
    def requestAvatarId(  # type: ignore[override]
            self, credentials: Any) -> defer.Deferred[KeyIdentity]:
        """Look the key up on every call, or in the key cache, which is emptied by every
        change to any key and not used at all while its LISTEN link is down
        (agentpost.auth.key_cache): no cached answer outlives a revocation."""
        presented = credentials.key if IAPIKeyCredentials.providedBy(credentials) else (
            _text(credentials.password)
        )
        if not secrets.looks_like_api_key(presented):
            return defer.fail(UnauthorizedLogin("malformed key"))
        digest = secrets.digest(presented)
        cache = self._cache
        if cache is not None:
            cached = cache.get(digest)
            if cached is not None:
                self._note_use(cached)
                return defer.succeed(KeyIdentity(cached))
            generation = cache.generation
        d = self._db.run_read("auth.api_key", key_store.authenticate_api_key, digest)

        def found(row: dict[str, Any] | None) -> KeyIdentity | defer.Deferred[KeyIdentity]:
            if row is None:
                return self._refuse(digest)
            if cache is not None:
                cache.put(digest, row, generation)
            self._note_use(row)
            return KeyIdentity(row)

        return d.addCallback(found)

    def forget_cached(self) -> None:
        """Empty this process's key cache at once (after a change it just committed to
        what keys may do): its own NOTIFY reaches the cache a moment after the COMMIT,
        and the client's next request could come first."""
        if self._cache is not None:
            self._cache.invalidate()

    def _refuse(self, digest: bytes) -> defer.Deferred[Any]:
        """Fail with the refused key's organization attached, so the refusal lands in
        that tenant's audit trail. Every refused well-formed key pays this lookup,
        found or not, so its timing tells the caller nothing."""
        d = self._db.run_read("auth.refused_key", key_store.org_of_key_digest, digest)

        def attribute(row: dict[str, Any] | None) -> None:
            if row is None:
                raise RefusedKey("unknown key")
            expired = row["expires_at"] is not None and row["expires_at"] <= self._db.now()
            state = "revoked" if row["revoked_at"] else "expired" if expired else "holder-gone"
            raise RefusedKey(f"{state} key", org_id=row["org_id"], key_id=row["id"],
                             state=state)

        def lookup_failed(failure: Any) -> Any:
            if failure.check(RefusedKey):
                return failure
            raise RefusedKey("unknown, revoked or expired key")

        return d.addCallback(attribute).addErrback(lookup_failed)

    def _note_use(self, row: dict[str, Any]) -> None:
        """Record last use at most once a minute per key, off the request's path."""
        now = self._db.now()
        last = row.get("last_used_at")
        if last is not None and (now - last).total_seconds() < LAST_USED_RESOLUTION_S:
            return
        row["last_used_at"] = now  # a cached row: not again within the resolution
        d = self._db.run_interaction("auth.touch_key", key_store.touch_api_key, row["org_id"],
                                     row["id"])
        d.addErrback(lambda f: log.info("could not record key use: %s", f.getErrorMessage()))


@implementer(ICredentialsChecker)
class AdminKeyChecker:
    """Checks installation admin keys; organization keys never pass here."""

    credentialInterfaces = (IAdminKeyCredentials,)

    def __init__(self, db: Database) -> None:
        self._db = db

    # An identity, not bytes, as for APIKeyChecker.
    def requestAvatarId(  # type: ignore[override]
            self, credentials: Any) -> defer.Deferred[AdminIdentity]:
        """Admin keys have their own prefix and table."""
        if not secrets.looks_like_admin_key(credentials.key):
            return defer.fail(UnauthorizedLogin("malformed admin key"))
        d = self._db.run_read(
            "auth.admin_key", key_store.authenticate_admin_key, secrets.digest(credentials.key)
        )

        def found(row: dict[str, Any] | None) -> AdminIdentity:
            if row is None:
                raise UnauthorizedLogin("unknown or revoked admin key")
            return AdminIdentity(row["id"])

        return d.addCallback(found)


def _effective_power(row: dict[str, Any]) -> tuple[str, frozenset[str] | None]:
    """The role and environments a key may use *now*: never more than it was minted
    with, and never more than its holder currently is.

    * Held by an organization owner or admin: the weaker of the minted role and the
      holder's current organization role; environments as the key was restricted.
    * Held by an organization Member: confined to the environments the person is
      currently assigned to (none assigned: none at all), acting with the weakest
      environment role the person has across the key's reach.
    * Held by nobody (operator-issued "owner seat" keys, from bootstrap or the admin
      API of an organization without an owner person, and keys those minted): owner
      power only while the organization has no owner person; once ownership has been
      given to a person they act at most as admin, like any former owner.
    * Confined to some environments: at most admin (environment admin), never owner.

    Rows lacking the holder columns (a freshly minted row, not one read by
    ``authenticate_api_key``) are judged as strictly as possible.
    """
    minted = row["role"]
    key_envs = frozenset(row["environment_ids"]) if row["env_restricted"] else None
    holder = row.get("user_id")
    if holder is None:
        ceiling = "admin" if row.get("org_has_owner", True) else "owner"
        envs = key_envs
    elif row.get("holder_role") in ("owner", "admin"):
        ceiling, envs = row["holder_role"], key_envs
    elif row.get("holder_role") == "member":
        env_roles: dict[str, str] = row.get("holder_environments") or {}
        envs = frozenset(env_roles) if key_envs is None else key_envs & frozenset(env_roles)
        ceiling = weakest_role(*(env_roles[e] for e in envs)) if envs else "member"
    else:
        raise UnauthorizedLogin("the key's holder is no longer a member")
    if envs is not None:
        ceiling = weakest_role(ceiling, "admin")
    return weakest_role(minted, ceiling), envs


def principal_from_key(row: dict[str, Any]) -> Principal:
    """Turn a stored key row into the Principal every core operation takes.

    The power is computed from the holder's roles read in the same query as the key
    (see ``authenticate_api_key``), so a demotion, an ownership transfer or a removal
    from an environment changes what the key may do on its very next use.
    """
    role, envs = _effective_power(row)
    return Principal(
        org_id=row["org_id"],
        role=role,
        scopes=frozenset(row["scopes"]) & ROLE_SCOPES.get(role, frozenset()),
        credential_type="api_key",
        credential_id=row["id"],
        environment_ids=envs,
        tier=row.get("tier", "free"),
        user_id=row.get("user_id"),
    )


#: Principals remembered per key row object; beyond this the memo starts over (rows
#: read afresh on every request, with the key cache off, must not pile up).
_PRINCIPAL_MEMO_MAX = 1024


@implementer(IRealm)
class AgentPostRealm:
    """The one realm: key identities become Principals, admin identities AdminPrincipals.

    A row served by the key cache is the same object on every request until the cache
    lets it go, and a Principal is a frozen function of its row, so the realm builds it
    once per row object (a row read from the database again is a new object, and is
    judged afresh). About 3% of a cached GET's CPU otherwise (issue 12)."""

    def __init__(self) -> None:
        # id(row) -> (row, its Principal); holding the row keeps its id from being reused.
        self._memo: dict[int, tuple[dict[str, Any], Principal]] = {}

    def _principal(self, row: dict[str, Any]) -> Principal:
        entry = self._memo.get(id(row))
        if entry is not None and entry[0] is row:
            return entry[1]
        principal = principal_from_key(row)
        if len(self._memo) >= _PRINCIPAL_MEMO_MAX:
            self._memo.clear()
        self._memo[id(row)] = (row, principal)
        return principal

    def requestAvatar(self, avatarId: object, mind: object, *interfaces: type[Interface]
                      ) -> tuple[type[Interface], object, Callable[[], None]]:
        """Build the avatar for whichever interface the protocol asked for."""
        if IPrincipal in interfaces and isinstance(avatarId, KeyIdentity):
            return IPrincipal, self._principal(avatarId.row), _logout
        if IAdminPrincipal in interfaces and isinstance(avatarId, AdminIdentity):
            return IAdminPrincipal, AdminPrincipal(avatarId.admin_key_id), _logout
        raise NotImplementedError("no avatar for these interfaces")


def _logout() -> None:
    """Principals hold no resources."""


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def build_portal(db: Database, key_cache: KeyCache | None = None) -> Portal:
    """The single Portal every listener logs in through (``key_cache``: see
    agentpost.auth.key_cache; None reads every key from the database)."""
    return Portal(AgentPostRealm(), [APIKeyChecker(db, key_cache), AdminKeyChecker(db)])
