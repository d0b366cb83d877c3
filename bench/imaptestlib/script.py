"""Reading one scripted test: the header, then command groups.

Format (imaptest ``src/tests/``): ``key: value`` header lines up to the first blank line
(capabilities, connections, state, messages, ignore_extra_untagged); then commands.
A command line is ``[conn] [tagN] [ok|no|bad|""] command``; untagged expectations are
``* ...`` (must come), ``! ...`` (must not come) and ``? ...`` (may come); a command without
an expected reply on its line takes it from a later ``[conn] [tagN] ok ...`` line, which
lets several tagged commands be pipelined in one group. ``{{{`` ... ``}}}`` (``~{{{`` for
binary) is a multi-line literal. ``!ordered``, ``!sleep``, ``!output``, ``!ifenv`` work as
in imaptest. List directives (``$!unordered[=n]``, ``$!noextra``, ``$!extra``,
``$!ordered``, ``$!ignore=x``, ``$!ban=x``) open a list; defaults are added for LIST/LSUB
flags, STATUS and FETCH lists and FETCH FLAGS lists, as imaptest does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .args import ATOM, LIST, Arg, tokenize

MUST, MUST_NOT, MAY = "*", "!", "?"
STATES = ("nonauth", "auth", "created", "appended", "selected")


@dataclass
class Command:
    line: int
    text: str
    tag: int = 0              # the script's tagN, 0 if none
    reply: list[Arg] | None = None  # expected tagged reply; [Arg(ATOM,"")] = any


@dataclass
class Untagged:
    args: list[Arg]
    existence: str
    line: int


@dataclass
class Group:
    conn: int = 0
    commands: list[Command] = field(default_factory=list)
    untagged: list[Untagged] = field(default_factory=list)
    ordered: bool = False
    sleep_ms: int = 0
    output: list[str] = field(default_factory=list)
    pending: int = 0
    have_bye: bool = False


@dataclass
class Test:
    name: str
    path: Path
    mbox: Path
    own_mbox: bool
    capabilities: list[str] | None = None
    connections: int = 1
    state: str = "selected"
    messages: int | None = None  # None = all
    ignore_extra_untagged: bool = True
    groups: list[Group] = field(default_factory=list)
    banner_check: bool = False


class ScriptError(ValueError):
    pass


_REPLY = {"ok": "ok", "no": "no", "bad": "bad", '""': ""}


def _cmd_reply(line: str) -> tuple[int, list[Arg] | None, str]:
    """Strip an optional ``tagN`` and ``ok|no|bad|""`` from the front of a line."""
    tag, rest = 0, line
    first = rest.split(" ", 1)[0]
    if first[:3].lower() == "tag" and first[3:].isdigit() and int(first[3:]) > 0 and " " in rest:
        tag, rest = int(first[3:]), rest.split(" ", 1)[1]
        first = rest.split(" ", 1)[0]
    kind = _REPLY.get(first.lower())
    if kind is None:
        return tag, None, rest
    rest = rest[len(first):]
    if rest.startswith(" "):
        rest = rest[1:]
    return tag, [Arg(ATOM, kind)], rest


def _directives(items: list[Arg]) -> bool:
    n = 0
    for a in items:
        if a.kind == ATOM and a.value.startswith("$!"):  # type: ignore[union-attr]
            d = a.value[2:]  # type: ignore[index]
            if not (re.fullmatch(r"unordered(=\d+)?|ordered|noextra|extra", d)
                    or d.startswith(("ignore=", "ban="))):
                raise ScriptError(f"unknown directive ${d}")
            n += 1
        else:
            break
    return n > 0


def _add_defaults(reply: str, top: list[Arg]) -> None:
    """imaptest's default directives: LIST/LSUB flags unordered, STATUS and FETCH lists
    unordered in pairs, FETCH FLAGS unordered with nothing extra but \\Recent."""
    def insert(lst: list[Arg], *names: str) -> None:
        for nm in names:
            lst.insert(0, Arg(ATOM, nm))

    def walk(items: list[Arg], depth: int, top_index: int) -> None:
        prev_atom = None
        for idx, a in enumerate(items):
            if a.kind == ATOM:
                prev_atom = a.value.lower()  # type: ignore[union-attr]
            if a.kind != LIST:
                continue
            sub: list[Arg] = a.value  # type: ignore[assignment]
            if not _directives(sub):
                if depth == 0:
                    if reply in ("list", "lsub") and idx == 1:
                        insert(sub, "$!unordered")
                    elif reply in ("status", "fetch") and idx == 2:
                        insert(sub, "$!unordered=2")
                elif depth == 1 and reply == "fetch" and top_index == 2 and prev_atom == "flags":
                    insert(sub, "$!ignore=$HasNoAttachment", "$!ignore=$HasAttachment",
                           "$!ignore=\\recent", "$!noextra", "$!unordered")
            walk(sub, depth + 1, idx if depth == 0 else top_index)

    walk(top, 0, 0)


def _untagged(group: Group, text: str, existence: str, line: int) -> None:
    args = tokenize(text)
    reply = ""
    if args and args[0].kind == ATOM:
        reply = args[0].value  # type: ignore[assignment]
        if reply[:1] == "$" or reply[:1].isdigit():
            reply = args[1].value if len(args) > 1 and args[1].kind == ATOM else ""  # type: ignore[assignment]
    _add_defaults(reply.lower(), args)
    if reply.upper().startswith("BYE"):
        if existence == MAY:
            raise ScriptError("? BYE is not supported")
        if existence == MUST:
            group.have_bye = True
    group.untagged.append(Untagged(args, existence, line))


def _logical_lines(raw: bytes) -> list[tuple[int, str]]:
    """Join ``{{{``...``}}}`` blocks into literals; returns (first line number, text)."""
    out: list[tuple[int, str]] = []
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    i = 0
    while i < len(lines):
        start = i + 1
        cur = lines[i].decode("latin-1")
        i += 1
        if not cur.endswith("{{{"):
            out.append((start, cur))
            continue
        text = ""
        while cur.endswith("{{{"):
            binary = cur.endswith("~{{{")
            text += cur[:-4] if binary else cur[:-3]
            body: list[str] = []
            while True:
                if i >= len(lines):
                    raise ScriptError(f"multiline literal at line {start} not ended")
                raw_line = lines[i]
                i += 1
                s = raw_line.decode("latin-1")
                if s.startswith("}}}"):
                    cur = s[3:]
                    break
                # imaptest (test-parser.c): a ~{{{ literal keeps the line as it is, a CR
                # before the LF included, and joins lines with LF; a {{{ literal joins
                # them with CRLF. The line break before }}} is not part of the literal.
                if binary:
                    body.append(s + "\n")
                else:
                    body.append(s.rstrip("\r") + "\r\n")
            data = "".join(body)
            if body:
                data = data[:-1] if binary else data[:-2]
            text += ("~" if binary else "") + f"{{{len(data)}}}\r\n" + data
        out.append((start, text + cur))
    return out


def parse(path: Path, default_mbox: Path) -> Test:
    own = path.with_name(path.name + ".mbox")
    test = Test(path.name, path, own if own.exists() else default_mbox, own.exists())
    header = True
    group: Group | None = None
    skip_stack: list[tuple[bool, bool]] = []  # (outer skip, else seen)
    skip = False
    for lineno, line in _logical_lines(path.read_bytes()):
        if header:
            if line == "":
                header = False
                continue
            if line.startswith("#"):
                continue
            if ":" not in line:
                raise ScriptError(f"line {lineno}: missing ':' in header")
            key, value = line.split(":", 1)
            key, value = key.strip().lower(), value.strip()
            if key == "capabilities":
                test.capabilities = value.split()
            elif key == "connections":
                test.connections = int(value)
            elif key == "state":
                if value.lower() not in STATES:
                    raise ScriptError(f"line {lineno}: unknown state {value}")
                test.state = value.lower()
            elif key == "messages":
                test.messages = None if value == "all" else int(value)
            elif key == "ignore_extra_untagged":
                test.ignore_extra_untagged = value.startswith("y")
            elif key.startswith("user "):
                pass  # per-connection users: every connection logs in as the test user
            else:
                raise ScriptError(f"line {lineno}: unknown setting {key}")
            continue
        if line == "" or line.startswith("#"):
            continue
        if line.startswith(("!ifenv ", "!ifnenv ")):
            name = line.split(" ", 1)[1]
            unset = os.environ.get(name) is None
            if line.startswith("!ifnenv "):
                unset = not unset
            skip_stack.append((skip, False))
            skip = skip or unset
            continue
        if line == "!else":
            outer, _ = skip_stack.pop()
            skip_stack.append((outer, True))
            if not outer:
                skip = not skip
            continue
        if line == "!endif":
            skip = skip_stack.pop()[0]
            continue
        if skip:
            continue
        group = _command_line(test, group, lineno, line)
    if group is None:
        raise ScriptError("no commands in file")
    if group.pending:
        raise ScriptError("missing reply for the last command group")
    if not any(c.text.lower() == "logout" or g.have_bye for g in test.groups for c in g.commands):
        g = Group(conn=0)
        g.commands.append(Command(0, "logout", 0, [Arg(ATOM, "ok")]))
        test.groups.append(g)
    return test


def _command_line(test: Test, group: Group | None, lineno: int, line: str) -> Group:
    if group is not None:
        if line.startswith("!sleep "):
            group.sleep_ms = int(re.sub(r"\D", "", line[7:]) or 0)
            return group
        if line.startswith("!output "):
            group.output.append(line[8:])
            return group
        if line == "!ordered":
            group.ordered = True
            return group
        if line[:2] in ("* ", "! ", "? "):
            _untagged(group, line[2:], line[0], lineno)
            return group
        if group.pending:
            rest, conn = line, 0
            first = rest.split(" ", 1)[0]
            if test.connections > 1 and first.isdigit() and int(first) > 0:
                conn, rest = int(first), ([*rest.split(" ", 1), ""])[1]
            tag, reply, _after = _cmd_reply(rest)
            if reply is not None:
                if test.connections > 1 and conn - 1 != group.conn:
                    raise ScriptError(f"line {lineno}: reply for the wrong connection")
                cmd = next((c for c in group.commands if c.tag == tag), None)
                if cmd is None or cmd.reply is not None:
                    raise ScriptError(f"line {lineno}: reply for an unknown tag")
                full = tokenize(rest)
                cmd.reply = full[1:] if tag else full
                group.pending -= 1
                return group
    if group is None or group.pending == 0:
        group = Group()
        test.groups.append(group)
    if test.connections > 1:
        first = line.split(" ", 1)[0]
        if not first.isdigit() or int(first) == 0:
            raise ScriptError(f"line {lineno}: missing connection index")
        idx = int(first)
        if group.commands and group.conn != idx - 1:
            raise ScriptError(f"line {lineno}: pipelined commands must use one connection")
        group.conn = idx - 1
        test.connections = max(test.connections, idx)
        line = ([*line.split(" ", 1), ""])[1]
    tag, reply, rest = _cmd_reply(line)
    if tag == 0 and group.pending:
        raise ScriptError(f"line {lineno}: missing reply from the previous command group")
    if not group.commands and rest[:2] in ("* ", "! ", "? "):
        test.banner_check = True
        _untagged(group, rest[2:], rest[0], lineno)
        return group
    if reply is None:
        group.pending += 1
    group.commands.append(Command(lineno, rest, tag, reply))
    return group
