"""Rows to JSON: the only place that decides what a client sees of a record."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from agentpost.mail import keywords

#: Rendered timestamps by instant. Clients poll the same lists again and again, so most
#: timestamps were rendered before; a hit costs a sixth of formatting one (1.6 us, 40
#: of them in a page of inboxes: 4-6% of a GET). Equal instants render equally
#: whatever their time zone, so the instant is the key. Emptied when full.
_RENDERED: dict[datetime, str] = {}
_RENDERED_MAX = 20_000


def ts(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z."""
    if value is None:
        return None
    text = _RENDERED.get(value)
    if text is None:
        text = value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if len(_RENDERED) >= _RENDERED_MAX:
            _RENDERED.clear()
        _RENDERED[value] = text
    return text


def environment(row: dict[str, Any]) -> dict[str, Any]:
    """An environment."""
    return {"id": row["id"], "name": row["name"], "slug": row["slug"],
            "is_default": row["is_default"], "created_at": ts(row["created_at"]),
            "updated_at": ts(row["updated_at"])}


def inbox(row: dict[str, Any]) -> dict[str, Any]:
    """An inbox (20 per page of the most polled list: the cache is read inline)."""
    created, updated = row["created_at"], row["updated_at"]
    return {"id": row["id"], "email": row["email"], "username": row["username"],
            "domain": row["domain"], "display_name": row["display_name"],
            "environment_id": row["environment_id"], "client_id": row["client_id"],
            "send_paused": row["send_paused"], "used_bytes": row["used_bytes"],
            "created_at": _RENDERED.get(created) or ts(created),
            "updated_at": _RENDERED.get(updated) or ts(updated)}


def api_key(row: dict[str, Any], plaintext: str | None = None) -> dict[str, Any]:
    """Key metadata; the secret only when just minted."""
    body = {
        "id": row["id"], "name": row["name"], "prefix": row["display_prefix"],
        "role": row["role"], "scopes": list(row["scopes"]),
        "environment_ids": list(row["environment_ids"]) if row["env_restricted"] else None,
        "created_at": ts(row["created_at"]), "expires_at": ts(row["expires_at"]),
        "revoked_at": ts(row["revoked_at"]), "last_used_at": ts(row["last_used_at"]),
        "created_by": {"type": row["created_by_type"], "id": row["created_by_id"]},
    }
    if plaintext is not None:
        body["key"] = plaintext
    return body


def member(row: dict[str, Any]) -> dict[str, Any]:
    """A member with environment roles."""
    return {"user_id": row["user_id"], "email": row["email"],
            "display_name": row["display_name"], "role": row["role"],
            "environments": row["environments"], "created_at": ts(row["created_at"])}


def audit_entry(row: dict[str, Any]) -> dict[str, Any]:
    """An audit row."""
    return {"id": row["id"], "occurred_at": ts(row["occurred_at"]),
            "actor": {"type": row["actor_type"], "id": row["actor_id"]},
            "action": row["action"], "target_id": row["target_id"],
            "environment_id": row["environment_id"], "outcome": row["outcome"],
            "status": row["status"], "remote_addr": row["remote_addr"],
            "request_id": row["request_id"]}


def domain(row: dict[str, Any]) -> dict[str, Any]:
    """A domain inboxes may use."""
    return {"id": row["id"], "name": row["name"], "shared": row["shared"],
            "verified": row["verified"], "environment_id": row["environment_id"]}


def organization(row: dict[str, Any]) -> dict[str, Any]:
    """An organization (admin view)."""
    body = {"id": row["id"], "name": row["name"], "tier": row["tier"],
            "created_at": ts(row["created_at"]), "updated_at": ts(row["updated_at"])}
    if row.get("default_environment_id"):
        body["default_environment_id"] = row["default_environment_id"]
    return body


def attachment(row: dict[str, Any], message_id: str) -> dict[str, Any]:
    """Attachment metadata (the content is fetched separately)."""
    return {"id": row["id"], "message_id": message_id, "filename": row["filename"],
            "mime_type": row["mime_type"], "size": row["size"],
            "content_id": row["content_id"], "disposition": row["disposition"]}


def _folder_role(special_use: str | None) -> str | None:
    return special_use.lstrip("\\").lower() if special_use else None


def message_summary(row: dict[str, Any]) -> dict[str, Any]:
    """A message in a list: everything but the bodies. ``labels`` are the message's
    keywords that are labels; the rest (IMAP clients' own, agentpost.mail.keywords) are
    ``imap_keywords``, folded: shown, never mistaken for an agent's labels."""
    labels, imap_only = keywords.split(row["labels"])
    return {
        "id": row["id"], "inbox_id": row["inbox_id"], "thread_id": row["thread_id"],
        "environment_id": row["environment_id"], "direction": row["direction"],
        "subject": row["subject"], "from_address": row["from_address"],
        "to_addresses": row["to_addresses"], "cc_addresses": row["cc_addresses"],
        "bcc_addresses": row["bcc_addresses"], "reply_to": row["reply_to"],
        "message_id": row["message_id_header"], "in_reply_to": row["in_reply_to"],
        "references": list(row["reference_ids"]), "labels": labels,
        "imap_keywords": imap_only,
        "folder": row["folder_name"], "folder_role": _folder_role(row["folder_special_use"]),
        "read": row["seen"], "flagged": row["flagged"],
        "has_attachments": row["has_attachments"], "size": row["size"],
        "preview": row["preview"], "sent_at": ts(row["sent_at"]),
        "received_at": ts(row["received_at"]),
    }


def message(row: dict[str, Any]) -> dict[str, Any]:
    """A whole message."""
    body = message_summary(row)
    body.update(text_body=row["text_body"], html_body=row["html_body"],
                extracted_text=row["extracted_text"],
                attachments=[attachment(a, row["id"]) for a in row.get("attachments", [])])
    return body


def thread(row: dict[str, Any]) -> dict[str, Any]:
    """A thread (with its messages when loaded)."""
    body = {"id": row["id"], "inbox_id": row["inbox_id"],
            "environment_id": row["environment_id"], "subject": row["subject"],
            "message_count": row["message_count"],
            "last_message_at": ts(row["last_message_at"]),
            "labels": keywords.split(row["labels"])[0],
            "participants": list(row["participants"] or []),
            "created_at": ts(row["created_at"])}
    if "messages" in row:
        body["messages"] = [message_summary(m) for m in row["messages"]]
    return body


def filter_rule(row: dict[str, Any]) -> dict[str, Any]:
    """A filter rule."""
    return {"id": row["id"], "environment_id": row["environment_id"],
            "inbox_id": row["inbox_id"], "direction": row["direction"],
            "action": row["action"], "match_type": row["match_type"], "value": row["value"],
            "created_at": ts(row["created_at"])}
