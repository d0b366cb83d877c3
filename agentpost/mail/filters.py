"""Allow/block rules: the most specific matching rule decides.

Specificity: an exact address beats a domain, a domain beats a ``*.domain`` wildcard,
and a longer wildcard beats a shorter one. Between equally specific allow and block
rules, block wins: refusing is the safer mistake. Inbox rules and environment rules
compete on specificity alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_TYPE_RANK = {"address": 3, "domain": 2, "subdomain_wildcard": 1}


def _matches(rule: dict[str, Any], address: str, domain: str) -> bool:
    value = rule["value"]
    if rule["match_type"] == "address":
        return address == value
    if rule["match_type"] == "domain":
        return domain == value
    suffix = value[2:] if value.startswith("*.") else value
    return domain.endswith("." + suffix)


def decide(rules: Iterable[dict[str, Any]], address: str) -> str | None:
    """'allow', 'block', or None when no rule matches."""
    address = address.lower()
    domain = address.rpartition("@")[2]
    best: tuple[int, int, int] | None = None
    action = None
    for rule in rules:
        if not _matches(rule, address, domain):
            continue
        rank = (_TYPE_RANK[rule["match_type"]], len(rule["value"]),
                1 if rule["action"] == "block" else 0)
        if best is None or rank > best:
            best, action = rank, rule["action"]
    return action


def normalize_value(match_type: str, value: str) -> str:
    """Canonical lowercase form, or ValueError with a reason."""
    value = value.strip().lower()
    if match_type == "address":
        local, at, domain = value.rpartition("@")
        if not at or not local or "." not in domain:
            raise ValueError("an address rule needs a full address such as bot@example.com")
    elif match_type == "domain":
        if "@" in value or "." not in value or value.startswith(("*", ".")):
            raise ValueError("a domain rule needs a domain such as example.com")
    else:
        if not value.startswith("*.") or "." not in value[2:] or "@" in value:
            raise ValueError("a subdomain_wildcard rule looks like *.example.com")
    return value
