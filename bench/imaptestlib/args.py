"""IMAP argument lists, tokenized the way imaptest's parser sees them.

Text is handled as latin-1 ``str`` so that every byte maps to one character. The
tokenizer follows the rules the script format relies on: atoms may hold any character
(``BODY[HEADER.FIELDS`` is one atom, ``]`` after a list another), ``)`` ends an atom only
inside a list, ``NIL`` is its own kind, quoted strings, and literals ``{n}``/``{n+}``/
``~{n}`` whose data follows a CRLF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ATOM, STRING, LITERAL, NIL, LIST = "atom", "string", "literal", "nil", "list"
_LIT = re.compile(r"~?\{(\d+)\+?\}\r\n")


@dataclass
class Arg:
    kind: str
    value: object = None  # str, or list[Arg] for LIST

    @property
    def astring(self) -> str | None:
        return self.value if self.kind in (ATOM, STRING, LITERAL) else None  # type: ignore[return-value]

    @property
    def atom(self) -> str | None:
        if self.kind == ATOM:
            return self.value  # type: ignore[return-value]
        return "NIL" if self.kind == NIL else None

    def __str__(self) -> str:
        return render([self])


class ParseError(ValueError):
    pass


def tokenize(text: str) -> list[Arg]:
    stack: list[list[Arg]] = [[]]
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \r\n":
            i += 1
        elif c == "(":
            stack.append([])
            i += 1
        elif c == ")" and len(stack) > 1:
            items = stack.pop()
            stack[-1].append(Arg(LIST, items))
            i += 1
        elif c == '"':
            out, i = [], i + 1
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                out.append(text[i])
                i += 1
            if i >= n:
                raise ParseError("unterminated quoted string")
            stack[-1].append(Arg(STRING, "".join(out)))
            i += 1
        elif (m := _LIT.match(text, i)) is not None:
            size = int(m.group(1))
            start = m.end()
            if start + size > n:
                raise ParseError("literal past the end of the line")
            stack[-1].append(Arg(LITERAL, text[start:start + size]))
            i = start + size
        else:
            j = i
            inside = len(stack) > 1
            while j < n and text[j] not in " \r\n" and not (inside and text[j] in "()"):
                j += 1
            word = text[i:j]
            stack[-1].append(Arg(NIL) if word.upper() == "NIL" else Arg(ATOM, word))
            i = j
    if len(stack) != 1:
        raise ParseError("unbalanced parentheses")
    return stack[0]


def _quote(s: str) -> str:
    if s and all(33 <= ord(ch) < 127 and ch not in '(){ %*"\\' for ch in s):
        return s
    if "\r" in s or "\n" in s or ('"' in s and "\\" in s):
        return f"{{{len(s)}}}{_show(s)}"
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _show(s: str, limit: int = 120) -> str:
    s = s.replace("\r\n", "\\r\\n")
    return s if len(s) <= limit else s[:limit] + "..."


def render(args: list[Arg]) -> str:
    out = []
    for a in args:
        if a.kind == LIST:
            out.append("(" + render(a.value) + ")")  # type: ignore[arg-type]
        elif a.kind == NIL:
            out.append("NIL")
        elif a.kind == ATOM:
            out.append(a.value)  # type: ignore[arg-type]
        elif a.kind == LITERAL:
            out.append(f"{{{len(a.value)}}}{_show(a.value)}")  # type: ignore[arg-type]
        else:
            out.append(_quote(a.value))  # type: ignore[arg-type]
    return " ".join(out)
