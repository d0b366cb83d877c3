"""Organizations, environments, users and memberships."""

from __future__ import annotations

from typing import Any

import psycopg2.errors

from agentpost.model.errors import Conflict
from agentpost.storage.database import Txn
from agentpost.storage.keys import notify_keys_held_by

_ENV_COLS = "id, org_id, name, slug, is_default, created_at, updated_at"
_ORG_COLS = "id, name, tier, created_at, updated_at"


async def insert_organization(txn: Txn, org_id: str, name: str, tier: str) -> dict[str, Any]:
    """Create an organization row."""
    return await txn.fetchone_required(
        f"INSERT INTO organizations (id, name, tier, created_at, updated_at) "
        f"VALUES (%s, %s, %s, %s, %s) RETURNING {_ORG_COLS}",
        (org_id, name, tier, txn.now, txn.now),
    )


async def get_organization(txn: Txn, org_id: str) -> dict[str, Any] | None:
    """One organization (admin and self-view only)."""
    return await txn.fetchone(f"SELECT {_ORG_COLS} FROM organizations WHERE id = %s", (org_id,))


async def list_organizations(txn: Txn, after_id: str | None, limit: int) -> list[dict[str, Any]]:
    """All organizations, newest first (admin API only)."""
    return await txn.fetchall(
        f"SELECT {_ORG_COLS} FROM organizations WHERE (%s::text IS NULL OR id < %s) "
        "ORDER BY id DESC LIMIT %s",
        (after_id, after_id, limit),
    )


async def set_tier(txn: Txn, org_id: str, tier: str) -> dict[str, Any] | None:
    """Change an organization's tier."""
    return await txn.fetchone(
        f"UPDATE organizations SET tier = %s, updated_at = %s WHERE id = %s RETURNING {_ORG_COLS}",
        (tier, txn.now, org_id),
    )


async def insert_environment(txn: Txn, org_id: str, env_id: str, name: str, slug: str,
                             is_default: bool) -> dict[str, Any]:
    """Create an environment; a taken slug is a Conflict."""
    try:
        return await txn.fetchone_required(
            "INSERT INTO environments (org_id, id, name, slug, is_default, created_at, updated_at)"
            f" VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_ENV_COLS}",
            (org_id, env_id, name, slug, is_default, txn.now, txn.now),
        )
    except psycopg2.errors.UniqueViolation:
        raise Conflict(f"An environment with slug '{slug}' already exists.") from None


async def list_environments(txn: Txn, org_id: str,
                            env_ids: frozenset[str] | None) -> list[dict[str, Any]]:
    """Environments of the organization that the caller may see."""
    return await txn.fetchall(
        f"SELECT {_ENV_COLS} FROM environments WHERE org_id = %s "
        "AND (%s::text[] IS NULL OR id = ANY(%s)) ORDER BY is_default DESC, id",
        (org_id, _arr(env_ids), _arr(env_ids)),
    )


async def get_environment(txn: Txn, org_id: str, env_id: str) -> dict[str, Any] | None:
    """One environment of the organization."""
    return await txn.fetchone(
        f"SELECT {_ENV_COLS} FROM environments WHERE org_id = %s AND id = %s", (org_id, env_id)
    )


async def get_default_environment(txn: Txn, org_id: str) -> dict[str, Any] | None:
    """The organization's default environment."""
    return await txn.fetchone(
        f"SELECT {_ENV_COLS} FROM environments WHERE org_id = %s AND is_default", (org_id,)
    )


async def update_environment(txn: Txn, org_id: str, env_id: str,
                             changes: dict[str, Any]) -> dict[str, Any] | None:
    """Rename an environment or change its slug."""
    sets = ", ".join(f"{col} = %s" for col in changes)  # columns come from core's allow-list
    try:
        return await txn.fetchone(
            f"UPDATE environments SET {sets}, updated_at = %s WHERE org_id = %s AND id = %s "
            f"RETURNING {_ENV_COLS}",
            (*changes.values(), txn.now, org_id, env_id),
        )
    except psycopg2.errors.UniqueViolation:
        raise Conflict("An environment with that slug already exists.") from None


async def delete_environment(txn: Txn, org_id: str, env_id: str) -> bool:
    """Delete a non-default, empty environment; one still holding resources is a Conflict."""
    try:
        count = await txn.execute(
            "DELETE FROM environments WHERE org_id = %s AND id = %s AND NOT is_default",
            (org_id, env_id),
        )
    except psycopg2.errors.ForeignKeyViolation:
        raise Conflict("The environment still has inboxes or domains; delete them first.") from None
    return count == 1


async def insert_user(txn: Txn, user_id: str, email: str, display_name: str) -> dict[str, Any]:
    """Create a person, or return the existing one with that address."""
    row = await txn.fetchone(
        "SELECT id, email, display_name FROM users WHERE lower(email) = lower(%s)", (email,)
    )
    if row:
        return row
    return await txn.fetchone_required(
        "INSERT INTO users (id, email, display_name, created_at) VALUES (%s, %s, %s, %s) "
        "RETURNING id, email, display_name",
        (user_id, email, display_name, txn.now),
    )


async def insert_membership(txn: Txn, org_id: str, user_id: str, role: str) -> None:
    """Add a person to an organization."""
    try:
        await txn.execute(
            "INSERT INTO org_memberships (org_id, user_id, role, created_at) "
            "VALUES (%s, %s, %s, %s)",
            (org_id, user_id, role, txn.now),
        )
    except psycopg2.errors.UniqueViolation:
        raise Conflict("That person is already a member (or the organization has an owner).") \
            from None


_MEMBER_SELECT = """
SELECT m.user_id, u.email, u.display_name, m.role, m.created_at,
       COALESCE((SELECT json_agg(json_build_object('environment_id', e.environment_id,
                                                   'role', e.role) ORDER BY e.environment_id)
                 FROM env_memberships e
                 WHERE e.org_id = m.org_id AND e.user_id = m.user_id), '[]'::json) AS environments
FROM org_memberships m JOIN users u ON u.id = m.user_id
"""


async def list_members(txn: Txn, org_id: str, after_id: str | None,
                       limit: int) -> list[dict[str, Any]]:
    """Members of the organization with their environment roles."""
    return await txn.fetchall(
        _MEMBER_SELECT + "WHERE m.org_id = %s AND (%s::text IS NULL OR m.user_id < %s) "
        "ORDER BY m.user_id DESC LIMIT %s",
        (org_id, after_id, after_id, limit),
    )


async def get_member(txn: Txn, org_id: str, user_id: str, *,
                     for_update: bool = False) -> dict[str, Any] | None:
    """One member of the organization."""
    lock = " FOR UPDATE OF m" if for_update else ""
    return await txn.fetchone(
        _MEMBER_SELECT + "WHERE m.org_id = %s AND m.user_id = %s" + lock, (org_id, user_id)
    )


async def set_member_role(txn: Txn, org_id: str, user_id: str, role: str) -> None:
    """Change an organization role; a second owner (a concurrent transfer) is a Conflict."""
    try:
        await txn.execute(
            "UPDATE org_memberships SET role = %s WHERE org_id = %s AND user_id = %s",
            (role, org_id, user_id),
        )
    except psycopg2.errors.UniqueViolation:
        raise Conflict("The organization already has an owner.") from None
    await notify_keys_held_by(txn, org_id, [user_id])


async def get_owner_id(txn: Txn, org_id: str, *, for_update: bool = False) -> str | None:
    """The user id of the organization's owner person, if it has one (locked, for an
    ownership transfer that must see the owner it replaces)."""
    lock = " FOR UPDATE" if for_update else ""
    row = await txn.fetchone(
        "SELECT user_id FROM org_memberships WHERE org_id = %s AND role = 'owner'" + lock,
        (org_id,))
    return row["user_id"] if row else None


async def demote_owner(txn: Txn, org_id: str) -> None:
    """The current owner becomes an admin (the first half of an ownership transfer)."""
    rows = await txn.fetchall(
        "UPDATE org_memberships SET role = 'admin' WHERE org_id = %s AND role = 'owner' "
        "RETURNING user_id", (org_id,))
    await notify_keys_held_by(txn, org_id, [row["user_id"] for row in rows])


async def set_member_environments(txn: Txn, org_id: str, user_id: str,
                                  assignments: list[tuple[str, str]],
                                  within: frozenset[str] | None = None) -> None:
    """Replace a member's environment roles, all of them or only those ``within`` some
    environments (an environment-confined caller must leave the others untouched)."""
    await txn.execute(
        "DELETE FROM env_memberships WHERE org_id = %s AND user_id = %s "
        "AND (%s::text[] IS NULL OR environment_id = ANY(%s))",
        (org_id, user_id, _arr(within), _arr(within)),
    )
    for env_id, role in assignments:
        await txn.execute(
            "INSERT INTO env_memberships (org_id, environment_id, user_id, role, created_at) "
            "VALUES (%s, %s, %s, %s, %s)",
            (org_id, env_id, user_id, role, txn.now),
        )
    await notify_keys_held_by(txn, org_id, [user_id])


async def delete_member(txn: Txn, org_id: str, user_id: str) -> bool:
    """Remove a person from the organization."""
    return await txn.execute(
        "DELETE FROM org_memberships WHERE org_id = %s AND user_id = %s", (org_id, user_id)
    ) == 1


def _arr(ids: frozenset[str] | None) -> list[str] | None:
    return None if ids is None else sorted(ids)
