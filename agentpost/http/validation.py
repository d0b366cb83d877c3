"""Request-body validation against the same JSON Schemas the OpenAPI document publishes.

A deliberately small validator (objects, strings, integers, booleans, arrays, enums,
lengths, date-times, nullables): enough for our schemas, with error messages that name
the field, and no runtime dependency on a general JSON Schema engine.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from agentpost.model.errors import InvalidRequest

_TYPES = {
    "object": dict, "string": str, "boolean": bool, "array": list, "integer": int,
    "null": type(None),
}


def validate(schema: dict[str, Any], value: Any, path: str = "") -> None:
    """Raise InvalidRequest naming the first offending field."""
    name = path or "body"
    types = schema.get("type")
    if types is not None:
        allowed = types if isinstance(types, list) else [types]
        if not any(_is_type(value, t) for t in allowed):
            raise InvalidRequest(f"{name} must be {' or '.join(allowed)}.", field=name)
    if value is None:
        return
    if "enum" in schema and value not in schema["enum"]:
        raise InvalidRequest(
            f"{name} must be one of: {', '.join(map(str, schema['enum']))}.", field=name)
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise InvalidRequest(f"{name} is too short.", field=name)
        if len(value) > schema.get("maxLength", 10_000):
            raise InvalidRequest(f"{name} is too long.", field=name)
        if schema.get("format") == "date-time":
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                raise InvalidRequest(f"{name} must be an RFC 3339 date-time.", field=name) \
                    from None
            if parsed.tzinfo is None:
                raise InvalidRequest(f"{name} must include a time zone.", field=name)
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", 1000):
            raise InvalidRequest(f"{name} has too many items.", field=name)
        for i, item in enumerate(value):
            validate(schema.get("items", {}), item, f"{name}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                field = f"{path}.{key}" if path else key
                raise InvalidRequest(f"{field} is required.", field=field)
        for key, item in value.items():
            field = f"{path}.{key}" if path else key
            if key not in props:
                if schema.get("additionalProperties", True) is False:
                    raise InvalidRequest(f"Unknown field: {field}.", field=field)
                continue
            validate(props[key], item, field)


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])
