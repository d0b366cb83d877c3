"""JSON Schemas for request bodies and responses (published in the OpenAPI document)."""

from __future__ import annotations

from typing import Any

from agentpost.model.scopes import SCOPES

_TS = {"type": "string", "format": "date-time"}
_TS_NULL = {"type": ["string", "null"], "format": "date-time"}
_STR_NULL = {"type": ["string", "null"]}

COMPONENTS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "message", "request_id"],
                "properties": {
                    "type": {"type": "string"},
                    "message": {"type": "string"},
                    "request_id": {"type": "string"},
                    "field": {"type": "string"},
                    "missing_scope": {"type": "string"},
                },
            }
        },
    },
    "Environment": {
        "type": "object",
        "required": ["id", "name", "slug", "is_default", "created_at", "updated_at"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": "^env_"},
            "name": {"type": "string"},
            "slug": {"type": "string"},
            "is_default": {"type": "boolean"},
            "created_at": _TS,
            "updated_at": _TS,
        },
    },
    "Inbox": {
        "type": "object",
        "required": ["id", "email", "username", "domain", "display_name", "environment_id",
                     "client_id", "send_paused", "used_bytes", "created_at", "updated_at"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": "^inb_"},
            "email": {"type": "string"},
            "username": {"type": "string"},
            "domain": {"type": "string"},
            "display_name": {"type": "string"},
            "environment_id": {"type": "string"},
            "client_id": _STR_NULL,
            "send_paused": {"type": "boolean"},
            "used_bytes": {"type": "integer", "minimum": 0,
                           "description": "Bytes the inbox's messages take (copies "
                                          "included); compared with [mail] inbox_quota."},
            "created_at": _TS,
            "updated_at": _TS,
        },
    },
    "ApiKey": {
        "type": "object",
        "required": ["id", "name", "prefix", "role", "scopes", "environment_ids", "created_at",
                     "expires_at", "revoked_at", "last_used_at", "created_by"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": "^key_"},
            "name": {"type": "string"},
            "prefix": {"type": "string"},
            "role": {"type": "string", "enum": ["owner", "admin", "member"]},
            "scopes": {"type": "array", "items": {"type": "string"}},
            "environment_ids": {"type": ["array", "null"], "items": {"type": "string"}},
            "created_at": _TS,
            "expires_at": _TS_NULL,
            "revoked_at": _TS_NULL,
            "last_used_at": _TS_NULL,
            "created_by": {"type": "object"},
            "key": {"type": "string", "description": "The secret; present only in the create "
                                                     "response."},
        },
    },
    "Member": {
        "type": "object",
        "required": ["user_id", "email", "display_name", "role", "environments", "created_at"],
        "additionalProperties": False,
        "properties": {
            "user_id": {"type": "string"},
            "email": {"type": "string"},
            "display_name": {"type": "string"},
            "role": {"type": "string", "enum": ["owner", "admin", "member"]},
            "environments": {"type": "array", "items": {
                "type": "object",
                "properties": {"environment_id": {"type": "string"},
                               "role": {"type": "string", "enum": ["admin", "member"]}}}},
            "created_at": _TS,
        },
    },
    "AuditEntry": {
        "type": "object",
        "required": ["id", "occurred_at", "actor", "action", "target_id", "outcome", "status",
                     "environment_id", "remote_addr", "request_id"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string"},
            "occurred_at": _TS,
            "actor": {"type": "object", "properties": {"type": {"type": "string"},
                                                        "id": _STR_NULL}},
            "action": {"type": "string"},
            "target_id": _STR_NULL,
            "environment_id": _STR_NULL,
            "outcome": {"type": "string", "enum": ["allowed", "denied", "failed"]},
            "status": {"type": ["integer", "null"]},
            "remote_addr": _STR_NULL,
            "request_id": _STR_NULL,
        },
    },
    "Domain": {
        "type": "object",
        "required": ["id", "name", "shared", "verified", "environment_id"],
        "properties": {
            "id": _STR_NULL,
            "name": {"type": "string"},
            "shared": {"type": "boolean"},
            "verified": {"type": "boolean"},
            "environment_id": _STR_NULL,
        },
    },
    "Organization": {
        "type": "object",
        "required": ["id", "name", "tier", "created_at", "updated_at"],
        "properties": {
            "id": {"type": "string", "pattern": "^org_"},
            "name": {"type": "string"},
            "tier": {"type": "string"},
            "default_environment_id": {"type": "string"},
            "created_at": _TS,
            "updated_at": _TS,
        },
    },
    "Scope": {"type": "string", "enum": sorted(SCOPES)},
}


def list_of(component: str) -> dict[str, Any]:
    """``{"data": [...], "limit": n, "next_page_token": …}``"""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "array", "items": {"$ref": f"#/components/schemas/{component}"}},
            "limit": {"type": "integer"},
            "next_page_token": _STR_NULL,
        },
    }


def ref(component: str) -> dict[str, Any]:
    """A reference to a component schema."""
    return {"$ref": f"#/components/schemas/{component}"}


# Request text (names, addresses, ids, values): bounded, and free of control characters
# (C0 and DEL). No such field needs one; NUL is what PostgreSQL text refuses outright, and
# the others end up in headers, logs and terminals. ECMA-262 syntax, as OpenAPI publishes it.
NO_CONTROLS = "^[^\\u0000-\\u001f\\u007f]*$"


def text(max_length: int, min_length: int = 0) -> dict[str, Any]:
    """A request string of at most ``max_length`` characters, no control characters."""
    schema: dict[str, Any] = {"type": "string", "maxLength": max_length,
                              "pattern": NO_CONTROLS,
                              "x-pattern-message": "{name} must not contain control characters."}
    if min_length:
        schema["minLength"] = min_length
    return schema


ENVIRONMENT_CREATE = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {"name": text(100, 1),
                   "slug": text(64, 1)},
}
ENVIRONMENT_UPDATE = {
    "type": "object", "additionalProperties": False,
    "properties": {"name": text(100, 1),
                   "slug": text(64, 1)},
}
INBOX_CREATE = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "username": text(64, 1),
        "domain": text(253, 1),
        "display_name": text(200),
        "environment_id": text(40),
        "client_id": text(200, 1),
    },
}
INBOX_UPDATE = {
    "type": "object", "additionalProperties": False,
    "properties": {"display_name": text(200),
                   "send_paused": {"type": "boolean"}},
}
API_KEY_CREATE = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "name": text(200),
        "scopes": {"type": "array", "maxItems": 64, "items": text(64)},
        "environment_ids": {"type": ["array", "null"], "maxItems": 100,
                            "items": text(40)},
        "expires_at": {"type": ["string", "null"], "format": "date-time"},
        "role": {"type": "string", "enum": ["owner", "admin", "member"]},
    },
}
MEMBER_CREATE = {
    "type": "object", "additionalProperties": False, "required": ["email"],
    "properties": {"email": text(320, 3),
                   "display_name": text(200),
                   "role": {"type": "string", "enum": ["admin", "member"]}},
}
_MEMBER_ENVIRONMENT = {
    "type": "object", "additionalProperties": False,
    "required": ["environment_id", "role"],
    "properties": {"environment_id": text(40),
                   "role": {"type": "string", "enum": ["admin", "member"]}},
}
MEMBER_UPDATE = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "role": {"type": "string", "enum": ["owner", "admin", "member"]},
        # One role per environment: a repeated environment_id is a 400, not a key clash.
        "environments": {"type": "array", "maxItems": 100, "x-unique-by": "environment_id",
                         "items": _MEMBER_ENVIRONMENT},
    },
}
ORG_CREATE = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {
        "name": text(200, 1),
        "tier": {"type": "string",
                 "enum": ["free", "developer", "startup", "business", "enterprise"]},
        "owner_email": text(320, 3),
    },
}
ORG_UPDATE = {
    "type": "object", "additionalProperties": False, "required": ["tier"],
    "properties": {"tier": {"type": "string",
                            "enum": ["free", "developer", "startup", "business", "enterprise"]}},
}
OWNER_KEY_CREATE = {
    "type": "object", "additionalProperties": False,
    "properties": {"name": text(200)},
}


_ADDR = {"type": "object", "properties": {"email": {"type": "string"},
                                          "name": {"type": "string"}}}
_ADDRS = {"type": "array", "items": _ADDR}
_ATTACHMENT = {
    "type": "object",
    "required": ["id", "message_id", "filename", "mime_type", "size"],
    "properties": {"id": {"type": "string", "pattern": "^att_"},
                   "message_id": {"type": "string"}, "filename": {"type": "string"},
                   "mime_type": {"type": "string"}, "size": {"type": "integer"},
                   "content_id": _STR_NULL, "disposition": _STR_NULL},
}
_MESSAGE_PROPS = {
    "id": {"type": "string", "pattern": "^msg_"},
    "inbox_id": {"type": "string"}, "thread_id": {"type": "string"},
    "environment_id": {"type": "string"},
    "direction": {"type": "string", "enum": ["inbound", "outbound"]},
    "subject": {"type": "string"},
    "from_address": {"type": ["object", "null"], "properties": _ADDR["properties"]},
    "to_addresses": _ADDRS, "cc_addresses": _ADDRS, "bcc_addresses": _ADDRS,
    "reply_to": _ADDRS,
    "message_id": _STR_NULL, "in_reply_to": _STR_NULL,
    "references": {"type": "array", "items": {"type": "string"}},
    "labels": {"type": "array", "items": {"type": "string"}},
    # Keywords IMAP clients set for themselves ($Forwarded, Old, NonJunk...), folded;
    # read-only here (agentpost.mail.keywords).
    "imap_keywords": {"type": "array", "items": {"type": "string"}},
    # The IMAP folder the message is in (one message, one folder) and its special use.
    "folder": {"type": "string"},
    "folder_role": {"type": ["string", "null"],
                    "enum": ["inbox", "sent", "drafts", "trash", "junk", "archive", "all",
                             "flagged", "important", None]},
    "read": {"type": "boolean"}, "flagged": {"type": "boolean"},
    "has_attachments": {"type": "boolean"}, "size": {"type": "integer"},
    "preview": {"type": "string"},
    "sent_at": _TS_NULL, "received_at": _TS,
    "text_body": _STR_NULL, "html_body": _STR_NULL, "extracted_text": _STR_NULL,
    "attachments": {"type": "array", "items": _ATTACHMENT},
}
COMPONENTS["MessageSummary"] = {
    "type": "object",
    "required": ["id", "inbox_id", "thread_id", "direction", "subject", "from_address",
                 "to_addresses", "labels", "imap_keywords", "folder", "folder_role", "read",
                 "has_attachments", "received_at"],
    "properties": {k: v for k, v in _MESSAGE_PROPS.items()
                   if k not in ("text_body", "html_body", "extracted_text", "attachments")},
}
COMPONENTS["Message"] = {
    "type": "object",
    "required": [*COMPONENTS["MessageSummary"]["required"], "text_body", "html_body",
                 "extracted_text", "attachments"],
    "properties": _MESSAGE_PROPS,
}
COMPONENTS["Thread"] = {
    "type": "object",
    "required": ["id", "inbox_id", "subject", "message_count", "last_message_at", "labels",
                 "participants"],
    "properties": {
        "id": {"type": "string", "pattern": "^thr_"}, "inbox_id": {"type": "string"},
        "environment_id": {"type": "string"}, "subject": {"type": "string"},
        "message_count": {"type": "integer"}, "last_message_at": _TS,
        "labels": {"type": "array", "items": {"type": "string"}},
        "participants": {"type": "array", "items": {"type": "string"}},
        "created_at": _TS,
        "messages": {"type": "array",
                     "items": {"$ref": "#/components/schemas/MessageSummary"}},
    },
}
COMPONENTS["FilterRule"] = {
    "type": "object",
    "required": ["id", "environment_id", "inbox_id", "direction", "action", "match_type",
                 "value", "created_at"],
    "properties": {
        "id": {"type": "string", "pattern": "^rul_"}, "environment_id": {"type": "string"},
        "inbox_id": _STR_NULL, "direction": {"type": "string", "enum": ["send", "receive"]},
        "action": {"type": "string", "enum": ["allow", "block"]},
        "match_type": {"type": "string",
                       "enum": ["address", "domain", "subdomain_wildcard"]},
        "value": {"type": "string"}, "created_at": _TS,
    },
}

MESSAGE_UPDATE = {
    "type": "object", "additionalProperties": False,
    "properties": {"read": {"type": "boolean"}},
}
LABELS_BODY = {
    "type": "object", "additionalProperties": False, "required": ["labels"],
    "properties": {"labels": {"type": "array", "maxItems": 50,
                              "items": text(64)}},
}
FILTER_RULE_CREATE = {
    "type": "object", "additionalProperties": False,
    "required": ["direction", "action", "match_type", "value"],
    "properties": {
        "direction": {"type": "string", "enum": ["send", "receive"]},
        "action": {"type": "string", "enum": ["allow", "block"]},
        "match_type": {"type": "string", "enum": ["address", "domain", "subdomain_wildcard"]},
        "value": text(320, 1),
        "environment_id": text(40),
        "inbox_id": text(40),
    },
}
