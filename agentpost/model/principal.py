"""The Principal: who is acting, for which organization, with what rights.

Every protocol (HTTP, SMTP, IMAP, WebSocket) turns its credentials into one of these
through the same twisted.cred portal; every core operation takes it as its first
argument, so tenancy cannot be forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentpost.model.errors import Forbidden, NotFound


@dataclass(frozen=True)
class Principal:
    """An authenticated actor within exactly one organization."""

    org_id: str
    role: str
    scopes: frozenset[str]
    credential_type: str  # "api_key" | "user"
    credential_id: str
    environment_ids: frozenset[str] | None = None  # None: every environment
    tier: str = "free"
    # The person whose power the credential carries (None: an operator-issued "owner
    # seat" key of an organization without an owner person). Keys minted by this
    # principal are held by the same person, so they can never outlive that person's role.
    user_id: str | None = None

    @property
    def actor(self) -> tuple[str, str]:
        """Audit identity of the actor."""
        return (self.credential_type, self.credential_id)

    def require(self, scope: str) -> None:
        """Raise Forbidden naming the scope when it is missing."""
        if scope not in self.scopes:
            raise Forbidden(f"This API key lacks the '{scope}' scope.", missing_scope=scope)

    def require_organization_wide(self, what: str) -> None:
        """Refuse organization-level powers to environment-confined principals.

        A credential confined to some environments (by its own restriction, or because
        its holder is an organization Member) manages at most those environments; it
        must never change who belongs to the organization, anyone's organization role,
        ownership, or the set of environments.
        """
        if self.environment_ids is not None:
            raise Forbidden(f"A credential confined to some environments cannot {what}.")

    def may_use_environment(self, env_id: str) -> bool:
        """Whether resources of ``env_id`` are visible to this principal."""
        return self.environment_ids is None or env_id in self.environment_ids

    def require_environment(self, env_id: str) -> None:
        """Hide environments outside the restriction as if they did not exist."""
        if not self.may_use_environment(env_id):
            raise NotFound()


@dataclass(frozen=True)
class AdminPrincipal:
    """An installation operator holding an admin key; acts on no single organization."""

    admin_key_id: str
