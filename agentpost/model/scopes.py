"""The scope catalogue and the role matrix.

Scopes are what an API key may do; roles are what a person (or an owner-level key)
is. A key's scopes are always a subset of what its role allows, and a key can never
be minted with more than its creator holds.
"""

from __future__ import annotations

SCOPES: dict[str, str] = {
    "inboxes:read": "List and read inboxes.",
    "inboxes:write": "Create, update and delete inboxes.",
    "messages:read": "Read messages, threads and attachments (also IMAP read access).",
    "messages:write": "Change flags and labels, move and delete messages (also IMAP writes).",
    "messages:send": "Send mail through the API or SMTP submission.",
    "domains:read": "List hosted domains and their verification state.",
    "domains:write": "Add, verify and remove domains.",
    "events:read": "Read the event log (GET /events) and subscribe to the event stream.",
    "webhooks:read": "List webhook endpoints and deliveries.",
    "webhooks:write": "Create, update and delete webhook endpoints.",
    "api_keys:read": "List API keys (never their secrets).",
    "api_keys:write": "Create and revoke API keys.",
    "environments:read": "List environments.",
    "environments:write": "Create, update and delete environments.",
    "members:read": "List organization members and invitations.",
    "members:write": "Invite, change roles of, and remove members.",
    "audit:read": "Read the audit log.",
    "filters:read": "List allow/block filter rules.",
    "filters:write": "Create and delete allow/block filter rules.",
    "suppressions:read": "List the organization's suppressed recipient addresses.",
    "suppressions:write": "Add addresses to and remove them from the suppression list.",
}

ALL_SCOPES: frozenset[str] = frozenset(SCOPES)

ORG_ROLES = ("owner", "admin", "member")
ENV_ROLES = ("admin", "member")

_MEMBER_SCOPES = frozenset(
    {
        "inboxes:read", "inboxes:write", "messages:read", "messages:write", "messages:send",
        "domains:read", "webhooks:read", "environments:read", "members:read", "filters:read",
        "api_keys:read", "api_keys:write", "suppressions:read", "events:read",
    }
)

ROLE_SCOPES: dict[str, frozenset[str]] = {
    "owner": ALL_SCOPES,
    "admin": ALL_SCOPES,
    "member": _MEMBER_SCOPES,
}

ROLE_RANK = {"member": 1, "admin": 2, "owner": 3}


def role_at_least(role: str, minimum: str) -> bool:
    """Whether ``role`` is ``minimum`` or stronger."""
    return ROLE_RANK.get(role, 0) >= ROLE_RANK[minimum]


def weakest_role(*roles: str) -> str:
    """The weakest of ``roles`` (an unknown role counts as the weakest of all).

    A key's effective role is the weakest of what it was minted with and what its
    holder is *now*, so a demotion can only ever take power away.
    """
    return min(roles, key=lambda r: ROLE_RANK.get(r, 0)) if roles else "member"


def unknown_scopes(scopes: list[str]) -> list[str]:
    """Scopes not in the catalogue (typos must be rejected, not ignored)."""
    return sorted(s for s in scopes if s not in SCOPES)
