"""Request-body validation against the same JSON Schemas the OpenAPI document publishes.

A deliberately small validator (objects, strings, integers, booleans, arrays, enums,
lengths, patterns, unique items, date-times, nullables): enough for our schemas, with
error messages that name the field, and no runtime dependency on a general JSON Schema
engine.

It is also the HTTP edge's guard for bytes PostgreSQL will not take (house rule 12 and
the hostile review): a body is measured for nesting *before* it is parsed, without
recursion, and no string anywhere in it may hold a NUL or a lone surrogate. Dates must be
ones a ``timestamptz`` can store, and come back normalised to UTC.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from agentpost.model.errors import InvalidRequest

MAX_JSON_DEPTH = 32

_TYPES = {
    "object": dict, "string": str, "boolean": bool, "array": list, "integer": int,
    "null": type(None),
}

# A JSON string literal, unrolled so the engine never backtracks: '"', runs of plain
# bytes, each escape followed by more plain bytes, then '"' -- or the end of the body
# for an unterminated one, so that every quote starts a match and an unterminated
# '"\\"\\"\\"…' is not rescanned from each of its quotes (quadratic: 80 KB held the
# reactor for 43 s). UTF-8 continuation bytes are never '"' or '\\', so bytes are exact.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPENERS = frozenset(b"[{")

# RFC 3339 date-time (fractions of any length; the offset is mandatory).
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))")
# PostgreSQL refuses a time-zone displacement beyond 15:59 ("time zone displacement out
# of range"); Python accepts up to 23:59, which is how such a date used to reach it.
MAX_OFFSET = timedelta(hours=15, minutes=59)


def json_too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``raw`` nests arrays/objects more than ``limit`` deep.

    Linear and iterative: string literals are dropped first (brackets inside them do not
    count), then only the brackets are walked. Malformed input may be judged too deep;
    it would fail to parse anyway.
    """
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = 0
    for byte in brackets:
        if byte in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def parse_json_body(raw: bytes) -> Any:
    """Decode a request body: strict UTF-8, bounded depth, no NaN, storable strings."""
    if json_too_deep(raw):
        raise InvalidRequest(f"The body nests deeper than {MAX_JSON_DEPTH} levels.")
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("The body is not valid JSON.") from None
    _check_strings(value)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_strings(value: Any) -> None:
    """Every key and string value must be text PostgreSQL can store (iterative walk)."""
    stack: list[tuple[str, Any]] = [("body", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            check_text(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                field = key if path == "body" else f"{path}.{key}"
                check_text(key, "body" if path == "body" else path)
                stack.append((field, child))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(item))


def check_text(value: str, field: str) -> None:
    """Refuse NUL (PostgreSQL text cannot hold it) and lone surrogates (not UTF-8)."""
    if "\x00" in value:
        raise InvalidRequest(f"{field} must not contain NUL characters.", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{field} is not valid Unicode text.", field=field) from None


def parse_timestamp(raw: str, field: str) -> datetime:
    """An RFC 3339 date-time PostgreSQL can store, as an aware datetime in UTC."""
    match = _RFC3339.fullmatch(raw)
    if match is None:
        raise InvalidRequest(f"{field} must be an RFC 3339 date-time with a time zone.",
                             field=field)
    day, clock, fraction, zulu, sign, hours, minutes = match.groups()
    offset = timedelta(hours=int(hours), minutes=int(minutes)) if not zulu else timedelta()
    if offset > MAX_OFFSET or int(minutes or 0) > 59:
        raise InvalidRequest(f"{field} has a time-zone offset outside ±15:59.", field=field)
    text = f"{day}T{clock}" + (f".{fraction[:6]}" if fraction else "")
    text += "+00:00" if zulu else f"{sign}{hours}:{minutes}"
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{field} is not a date-time between years 1 and 9999.",
                             field=field) from None


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
        _validate_string(schema, value, name)
    if isinstance(value, list):
        _validate_array(schema, value, name)
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


def _validate_string(schema: dict[str, Any], value: str, name: str) -> None:
    if len(value) < schema.get("minLength", 0):
        raise InvalidRequest(f"{name} is too short.", field=name)
    if len(value) > schema.get("maxLength", 10_000):
        raise InvalidRequest(f"{name} is too long.", field=name)
    pattern = schema.get("pattern")
    if pattern is not None and _compiled(pattern).search(value) is None:
        raise InvalidRequest(schema.get("x-pattern-message", f"{name} is not allowed.")
                             .format(name=name), field=name)
    if schema.get("format") == "date-time":
        parse_timestamp(value, name)


def _validate_array(schema: dict[str, Any], value: list[Any], name: str) -> None:
    if len(value) > schema.get("maxItems", 1000):
        raise InvalidRequest(f"{name} has too many items.", field=name)
    for i, item in enumerate(value):
        validate(schema.get("items", {}), item, f"{name}[{i}]")
    key = schema.get("x-unique-by")
    seen = [item.get(key) for item in value] if key else value
    if (key or schema.get("uniqueItems")) and len(set(map(_hashable, seen))) != len(seen):
        what = f"{key} values" if key else "items"
        raise InvalidRequest(f"{name} repeats {what}; each may appear once.", field=name)


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _compiled(pattern: str) -> re.Pattern[str]:
    """Our schemas' own patterns (never client input), ECMA-262 style: a trailing ``$``
    means end of text, which Python spells ``\\Z`` (its ``$`` also matches before a
    final newline)."""
    compiled = _PATTERNS.get(pattern)
    if compiled is None:
        source = pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern
        compiled = _PATTERNS[pattern] = re.compile(source)
    return compiled


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])
