"""twisted.cred glue: credentials, checkers and the one realm.

HTTP presents an ``IAPIKeyCredentials``; SMTP AUTH and IMAP LOGIN will present
``IUsernamePassword`` whose password is an API key. Both end at the same checker and
the same realm, which yields a ``Principal``, so every protocol enforces identical
rules (revocation, expiry, environments, scopes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from twisted.cred import credentials as tcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from agentpost.auth import secrets
from agentpost.model.principal import AdminPrincipal, Principal
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


@implementer(ICredentialsChecker)
class APIKeyChecker:
    """Checks organization API keys against their stored SHA-256 digests."""

    credentialInterfaces = (IAPIKeyCredentials, tcred.IUsernamePassword)

    def __init__(self, db: Database) -> None:
        self._db = db

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[KeyIdentity]:
        """Look the key up on every call: no cache may outlive a revocation."""
        presented = credentials.key if IAPIKeyCredentials.providedBy(credentials) else (
            _text(credentials.password)
        )
        if not secrets.looks_like_api_key(presented):
            return defer.fail(UnauthorizedLogin("malformed key"))
        d = self._db.run_read(
            "auth.api_key", key_store.authenticate_api_key, secrets.digest(presented)
        )

        def found(row: dict[str, Any] | None) -> KeyIdentity:
            if row is None:
                raise UnauthorizedLogin("unknown, revoked or expired key")
            self._note_use(row)
            return KeyIdentity(row)

        return d.addCallback(found)

    def _note_use(self, row: dict[str, Any]) -> None:
        """Record last use at most once a minute per key, off the request's path."""
        now = self._db.now()
        last = row.get("last_used_at")
        if last is not None and (now - last).total_seconds() < LAST_USED_RESOLUTION_S:
            return
        d = self._db.run_interaction("auth.touch_key", key_store.touch_api_key, row["org_id"],
                                     row["id"])
        d.addErrback(lambda f: log.info("could not record key use: %s", f.getErrorMessage()))


@implementer(ICredentialsChecker)
class AdminKeyChecker:
    """Checks installation admin keys; organization keys never pass here."""

    credentialInterfaces = (IAdminKeyCredentials,)

    def __init__(self, db: Database) -> None:
        self._db = db

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[AdminIdentity]:
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


def principal_from_key(row: dict[str, Any]) -> Principal:
    """Turn a stored key row into the Principal every core operation takes."""
    envs = frozenset(row["environment_ids"]) if row["env_restricted"] else None
    return Principal(
        org_id=row["org_id"],
        role=row["role"],
        scopes=frozenset(row["scopes"]),
        credential_type="api_key",
        credential_id=row["id"],
        environment_ids=envs,
        tier=row.get("tier", "free"),
    )


@implementer(IRealm)
class AgentPostRealm:
    """The one realm: key identities become Principals, admin identities AdminPrincipals."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple:
        """Build the avatar for whichever interface the protocol asked for."""
        if IPrincipal in interfaces and isinstance(avatarId, KeyIdentity):
            return IPrincipal, principal_from_key(avatarId.row), _logout
        if IAdminPrincipal in interfaces and isinstance(avatarId, AdminIdentity):
            return IAdminPrincipal, AdminPrincipal(avatarId.admin_key_id), _logout
        raise NotImplementedError("no avatar for these interfaces")


def _logout() -> None:
    """Principals hold no resources."""


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def build_portal(db: Database) -> Portal:
    """The single Portal every listener logs in through."""
    return Portal(AgentPostRealm(), [APIKeyChecker(db), AdminKeyChecker(db)])
