"""IMAP wire helpers: tokenize a response, parse and compact sequence sets, quote."""

from __future__ import annotations

import re
from typing import Any

LITERAL_AT_END = re.compile(rb"\{(\d+)(\+?)\}$")
_TOKEN = re.compile(
    rb'\s*(?:(?P<open>\()|(?P<close>\))|"(?P<quoted>(?:[^"\\]|\\.)*)"'
    rb'|(?P<lit>\x00L(?P<litn>\d+)\x00)'
    rb'|(?P<atom>[^\s()"\[\]{}\x00]+(?:\[[^\]]*\](?:<\d+>)?)?|\[[^\]]*\]))')


class Literal(bytes):
    """Literal data in a parsed response."""


class ParseFailure(ValueError):
    pass


def tokenize(segments: list[bytes], literals: list[bytes]) -> list[Any]:
    """The parenthesised structure of one response: atoms (bytes), quoted strings
    (str), literals (Literal) and lists."""
    text = b"".join(seg if i == len(segments) - 1 else
                    LITERAL_AT_END.sub(b"\x00L%d\x00" % i, seg)
                    for i, seg in enumerate(segments))
    stack: list[list[Any]] = [[]]
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == b"":
                break
            raise ParseFailure(f"cannot tokenize at {text[pos:pos + 40]!r}")
        pos = m.end()
        if m.group("open"):
            stack.append([])
        elif m.group("close"):
            if len(stack) < 2:
                raise ParseFailure("unbalanced ')'")
            done = stack.pop()
            stack[-1].append(done)
        elif m.group("quoted") is not None:
            unescaped = re.sub(rb"\\(.)", rb"\1", m.group("quoted"))
            stack[-1].append(unescaped.decode("utf-8", "replace"))
        elif m.group("lit"):
            stack[-1].append(Literal(literals[int(m.group("litn"))]))
        else:
            stack[-1].append(m.group("atom"))
    if len(stack) != 1:
        raise ParseFailure("unbalanced '('")
    return stack[0]


def parse_set(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if ":" in part:
            a, b = part.split(":")
            lo, hi = sorted((int(a), int(b)))
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    return out


def compact(nums: list[int]) -> str:
    nums = sorted(set(nums))
    out = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}:{nums[j]}")
        i = j + 1
    return ",".join(out)


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
