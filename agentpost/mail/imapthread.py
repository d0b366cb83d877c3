"""RFC 5256 THREAD=ORDEREDSUBJECT and THREAD=REFERENCES, without the protocol.

The IMAP THREAD handler loads one :class:`ThreadMessage` per searched message (from the
stored Message-ID, References, In-Reply-To, decoded subject, Date and internal date),
calls :func:`thread_references` or :func:`thread_orderedsubject` and sends
``"* " + thread_data(threads)``.

Why it looks the way it does:

* Mail is hostile input: a 100,000-message reply chain, References that loop, a
  Message-ID shared by thousands of messages. Nothing here recurses (every walk is an
  explicit stack), children are insertion-ordered dicts (O(1) unlink), and the "would
  this link make a loop?" question of step 1 is answered by a link-cut forest in
  O(log n) amortised instead of by walking up a chain that may be 100,000 deep.
* Message IDs are normalised as RFC 5256 asks (quoting removed, so
  ``<"a"@b>`` and ``<a@b>`` match) and then compared case-sensitively; a msg-id
  without ``@`` is not valid and counts as absent.
* Ties in sent date are broken by :attr:`ThreadMessage.number`: pass UIDs or sequence
  numbers, whichever the response shows -- within one mailbox both orders agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from agentpost.mail.basesubject import base_subject

__all__ = ["ThreadMessage", "ThreadNode", "normalize_msgid", "render_threads",
           "subject_info", "thread_data", "thread_orderedsubject", "thread_references"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_WSP_RUN = re.compile(r"[ \t\r\n]+")  # a plain character-class run: linear
_ASCII_CASEMAP = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


# --------------------------------------------------------------------------- inputs


def normalize_msgid(text: str | None) -> str | None:
    """The RFC 5256 normal form of one msg-id (``<`` ``>`` optional), or None when it is
    not a valid Message ID: quoting of the left part is undone (``"a.b"@c`` is
    ``a.b@c``), stray whitespace dropped; the result is compared case-sensitively."""
    if not text:
        return None
    s = text.strip()
    if " " in s or "\t" in s or "\r" in s or "\n" in s:
        s = "".join(s.split())
    if s.startswith("<") != s.endswith(">"):
        return None
    if s.startswith("<"):
        s = s[1:-1]
    if s.startswith('"'):
        out: list[str] = []
        i = 1
        while i < len(s) and s[i] != '"':
            if s[i] == "\\" and i + 1 < len(s):
                i += 1
            out.append(s[i])
            i += 1
        if i >= len(s) or not s.startswith("@", i + 1):
            return None
        left, right = "".join(out), s[i + 2:]
    else:
        left, _, right = s.partition("@")
    if not left or not right or "<" in right or ">" in right:
        return None
    return f"{left}@{right}"


def _collapsed(subject: str) -> str:
    return _WSP_RUN.sub(" ", subject)


def _blobs_reach(s: str, target: int) -> bool:
    """Whether ``s[:target]`` is a run of WSP and subj-blobs and nothing else."""
    pos = 0
    while pos < target:
        if s[pos] == " ":
            pos += 1
        elif s[pos] == "[":
            close = s.find("]", pos + 1)
            if close < 0 or s.find("[", pos + 1, close) >= 0:
                return False
            pos = close + 1
        else:
            return False
    return pos == target


def subject_info(subject: str) -> tuple[str, bool]:
    """``(base subject, is reply or forward)`` of a decoded subject (RFC 5256 §2.1).

    REFERENCES step 5 needs to know whether extraction removed a subj-refwd, a
    ``(fwd)`` trailer or a ``[fwd: ...]`` wrapper. :func:`base_subject` only returns the
    base; the flag is derived from it: extraction that removed nothing but blobs and
    whitespace leaves the base as the collapsed subject minus a leading run of blobs and
    spaces and minus trailing spaces. Anything else removed was a reply/forward marker.
    (tests/test_imapthread.py checks this against a re-run of the extraction that
    tracks the markers.)
    Linear, no regular expression on the input beyond a whitespace run.
    """
    base = base_subject(subject)
    s = _collapsed(subject)
    if not base:  # a blob is only removed when text remains after it: a marker went
        return base, bool(s.strip(" "))
    hi = len(s.rstrip(" "))
    lo = hi - len(base)
    plain = lo >= 0 and s[lo:hi] == base and _blobs_reach(s, lo)
    return base, not plain


def _utc(when: datetime) -> datetime:
    return when.astimezone(UTC) if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class ThreadMessage:
    """One searched message as the threading algorithms see it.

    ``references`` and ``in_reply_to`` are msg-id lists as stored (with or without angle
    brackets); ``base_subject``/``is_reply`` come from :func:`subject_info`; ``sent`` is
    the Date header, or the internal date when Date is missing or unparseable.
    """

    number: int
    message_id: str | None = None
    references: tuple[str, ...] = ()
    in_reply_to: tuple[str, ...] = ()
    base_subject: str = ""
    is_reply: bool = False
    sent: datetime = _EPOCH

    @classmethod
    def from_fields(cls, number: int, *, message_id: str | None,
                    references: Sequence[str] = (), in_reply_to: str | Sequence[str] | None = None,
                    subject: str = "", sent_at: datetime | None = None,
                    internal_date: datetime | None = None) -> ThreadMessage:
        """Build a record from stored message fields (decoded subject, parsed Date)."""
        base, is_reply = subject_info(subject or "")
        replies = (in_reply_to,) if isinstance(in_reply_to, str) else tuple(in_reply_to or ())
        return cls(number=number, message_id=message_id, references=tuple(references),
                   in_reply_to=replies, base_subject=base, is_reply=is_reply,
                   sent=sent_at or internal_date or _EPOCH)

    def subject_key(self) -> str:
        """The base subject as THREAD compares it (i;ascii-casemap)."""
        return self.base_subject.translate(_ASCII_CASEMAP)

    def sort_key(self) -> tuple[datetime, int]:
        """Sent date (as an instant), ties by number (RFC 5256 §2.2)."""
        return _utc(self.sent), self.number


@dataclass
class ThreadNode:
    """A node of a thread tree; ``number`` is None for a dummy (only at the top level)."""

    number: int | None
    children: list[ThreadNode] = field(default_factory=list)


# --------------------------------------------------------------------------- ORDEREDSUBJECT


def thread_orderedsubject(messages: Iterable[ThreadMessage]) -> list[ThreadNode]:
    """RFC 5256 ORDEREDSUBJECT: group by base subject; the first (by sent date) message
    of a group is the root and every other one its child; threads in the order of
    their first messages."""
    groups: dict[str, list[ThreadMessage]] = {}
    for msg in messages:
        groups.setdefault(msg.subject_key(), []).append(msg)
    threads: list[tuple[tuple[datetime, int], ThreadNode]] = []
    for group in groups.values():
        group.sort(key=ThreadMessage.sort_key)
        root = ThreadNode(group[0].number, [ThreadNode(m.number) for m in group[1:]])
        threads.append((group[0].sort_key(), root))
    threads.sort(key=lambda pair: pair[0])
    return [node for _, node in threads]


# --------------------------------------------------------------------------- link-cut forest


class _Forest:
    """A link-cut forest (splay trees, no re-rooting): mirrors the parent links made in
    REFERENCES step 1 so "is A inside B's tree?" costs O(log n) amortised."""

    def __init__(self) -> None:
        self.left: list[int] = []
        self.right: list[int] = []
        self.up: list[int] = []  # splay parent, or path-parent for a splay root

    def add(self) -> int:
        self.left.append(-1)
        self.right.append(-1)
        self.up.append(-1)
        return len(self.up) - 1

    def _is_splay_root(self, x: int) -> bool:
        p = self.up[x]
        return p < 0 or (self.left[p] != x and self.right[p] != x)

    def _rotate(self, x: int) -> None:
        left, right, up = self.left, self.right, self.up
        p = up[x]
        g = up[p]
        if not self._is_splay_root(p):
            if left[g] == p:
                left[g] = x
            else:
                right[g] = x
        up[x] = g
        if left[p] == x:
            moved = right[x]
            left[p], right[x] = moved, p
        else:
            moved = left[x]
            right[p], left[x] = moved, p
        if moved >= 0:
            up[moved] = p
        up[p] = x

    def _splay(self, x: int) -> None:
        while not self._is_splay_root(x):
            p = self.up[x]
            if not self._is_splay_root(p):
                g = self.up[p]
                zigzig = (self.left[g] == p) == (self.left[p] == x)
                self._rotate(p if zigzig else x)
            self._rotate(x)

    def _access(self, x: int) -> None:
        last, y = -1, x
        while y >= 0:
            self._splay(y)
            self.right[y] = last
            last, y = y, self.up[y]
        self._splay(x)

    def root(self, x: int) -> int:
        """The root of x's tree."""
        self._access(x)
        while self.left[x] >= 0:
            x = self.left[x]
        self._splay(x)
        return x

    def link(self, child: int, parent: int) -> None:
        """Hang ``child`` (a tree root) under ``parent``."""
        self._access(child)
        self.up[child] = parent

    def cut(self, x: int) -> None:
        """Detach x (and its subtree) from its parent."""
        self._access(x)
        above = self.left[x]
        if above >= 0:
            self.up[above] = -1
            self.left[x] = -1


# --------------------------------------------------------------------------- REFERENCES


class _Box:
    """A container: a message, or a dummy standing for a referenced one."""

    __slots__ = ("children", "index", "msg", "parent")

    def __init__(self, index: int, msg: ThreadMessage | None = None) -> None:
        self.index = index
        self.msg = msg
        self.parent: _Box | None = None
        self.children: dict[_Box, None] = {}


class _Links:
    """Step 1: the id_table and the parent/child links, kept loop-free."""

    def __init__(self) -> None:
        self.forest = _Forest()
        self.boxes: list[_Box] = []
        self.by_id: dict[str, _Box] = {}
        self.normalized: dict[str, str | None] = {}  # each id recurs in many References

    def ids(self, raw: Iterable[str]) -> list[str]:
        """The valid Message IDs among ``raw``, normalised, in order."""
        out: list[str] = []
        for text in raw:
            msgid = self.normalized.get(text, "")
            if msgid == "":
                msgid = self.normalized[text] = normalize_msgid(text)
            if msgid:
                out.append(msgid)
        return out

    def new_box(self, msg: ThreadMessage | None = None) -> _Box:
        box = _Box(self.forest.add(), msg)
        self.boxes.append(box)
        return box

    def box_for(self, msgid: str) -> _Box:
        box = self.by_id.get(msgid)
        if box is None:
            box = self.by_id[msgid] = self.new_box()
        return box

    def link(self, parent: _Box, child: _Box) -> None:
        """Make the link unless it would close a loop (``child`` is a root here). A
        childless ``child`` can only close one onto itself: no forest walk needed."""
        if parent is child or (child.children and
                               self.boxes[self.forest.root(parent.index)] is child):
            return
        self.forest.link(child.index, parent.index)
        child.parent = parent
        parent.children[child] = None

    def unlink(self, child: _Box) -> None:
        if child.parent is not None:
            del child.parent.children[child]
            child.parent = None
            self.forest.cut(child.index)

    def add(self, msg: ThreadMessage) -> None:
        """Steps 1.A and 1.B for one message (messages come in number order)."""
        refs = self.ids(msg.references) or self.ids(msg.in_reply_to)[:1]
        previous: _Box | None = None
        for ref in refs:
            box = self.box_for(ref)
            if previous is not None and box.parent is None:
                self.link(previous, box)
            previous = box
        msgid = next(iter(self.ids((msg.message_id or "",))), None)
        own = self.by_id.get(msgid) if msgid else None
        if own is None or own.msg is not None:  # no id, or a duplicate: a unique one
            own = self.new_box(msg)
            if msgid and msgid not in self.by_id:
                self.by_id[msgid] = own
        else:
            own.msg = msg
        self.unlink(own)
        if previous is not None:
            self.link(previous, own)


def _key(box: _Box) -> tuple[datetime, int]:
    """Sort key of a container: its message, or a dummy's first (sorted) child."""
    while box.msg is None:
        box = next(iter(box.children))
    return box.msg.sort_key()


def _sorted_children(box: _Box) -> None:
    box.children = dict.fromkeys(sorted(box.children, key=_key))


def _post_order(roots: Iterable[_Box]) -> list[_Box]:
    out: list[_Box] = []
    stack = list(roots)
    while stack:
        box = stack.pop()
        out.append(box)
        stack.extend(box.children)
    out.reverse()
    return out


def _prune(top: dict[_Box, None]) -> None:
    """Step 3: delete childless dummies, splice the others' children into their place;
    a top-level dummy stays only when it has two or more children."""
    for box in _post_order(list(top)):
        if box.msg is not None:
            continue
        parent = box.parent
        if parent is not None:
            del parent.children[box]
            for child in box.children:
                child.parent = parent
                parent.children[child] = None
        elif len(box.children) < 2:
            del top[box]
            for child in box.children:
                child.parent = None
                top[child] = None
        else:
            continue
        box.children = {}


def _thread_subject(box: _Box) -> tuple[str, bool]:
    first = box if box.msg is not None else next(iter(box.children))
    assert first.msg is not None
    return first.msg.subject_key(), first.msg.is_reply


def _adopt(parent: _Box, child: _Box, top: dict[_Box, None]) -> None:
    top.pop(child, None)
    child.parent = parent
    parent.children[child] = None


def _group_by_subject(top: dict[_Box, None], links: _Links) -> None:
    """Step 5: merge top-level threads whose thread subjects are equal."""
    roots = list(top)
    subjects = {box: _thread_subject(box) for box in roots}
    table: dict[str, _Box] = {}
    for box in roots:  # (B) one container per subject
        subject, is_reply = subjects[box]
        if not subject:
            continue
        held = table.get(subject)
        if held is None or (held.msg is not None and (
                box.msg is None or (subjects[held][1] and not is_reply))):
            table[subject] = box
    for box in roots:  # (C) merge the others into it
        subject, is_reply = subjects[box]
        held = table.get(subject) if subject else None
        if held is None or held is box:
            continue
        if held.msg is None and box.msg is None:
            for child in list(box.children):
                _adopt(held, child, top)
            box.children = {}
            del top[box]
        elif held.msg is None or (is_reply and not subjects[held][1]):
            _adopt(held, box, top)
        else:
            dummy = links.new_box()
            top[dummy] = None
            _adopt(dummy, held, top)
            _adopt(dummy, box, top)
            table[subject] = dummy


def _export(top: list[_Box]) -> list[ThreadNode]:
    """Step 6 (sort every sibling set, deepest first) and conversion to ThreadNodes."""
    order = _post_order(top)
    for box in order:
        _sorted_children(box)
    nodes: dict[_Box, ThreadNode] = {}
    for box in order:
        nodes[box] = ThreadNode(box.msg.number if box.msg is not None else None,
                                [nodes.pop(child) for child in box.children])
    return [nodes[box] for box in sorted(top, key=_key)]


def thread_references(messages: Iterable[ThreadMessage]) -> list[ThreadNode]:
    """RFC 5256 REFERENCES: steps 1-6, in linear-logarithmic time, no recursion."""
    links = _Links()
    for msg in sorted(messages, key=lambda m: m.number):
        links.add(msg)
    top = {box: None for box in links.boxes if box.parent is None}  # step 2
    _prune(top)  # step 3
    for box in top:  # step 4 needs each dummy's first child
        if box.msg is None:
            _sorted_children(box)
    top = dict.fromkeys(sorted(top, key=_key))
    _group_by_subject(top, links)  # step 5
    return _export(list(top))  # step 6


# --------------------------------------------------------------------------- rendering


def _kids(node: ThreadNode) -> list[ThreadNode]:
    """The children with any dummy among them replaced by its own children."""
    out: list[ThreadNode] = []
    stack = list(reversed(node.children))
    while stack:
        child = stack.pop()
        if child.number is None:
            stack.extend(reversed(child.children))
        else:
            out.append(child)
    return out


def render_threads(threads: Sequence[ThreadNode]) -> str:
    """The thread-lists of RFC 5256 §4, e.g. ``(2)(3 6 (4 23)(44 7 96))``.

    A chain is written flat (``3 6``), a node with several children ends with one
    parenthesised thread-list per child, a dummy root is ``((a)(b))``. Iterative: a
    100,000-deep chain renders without recursion.
    """
    out: list[str] = []
    stack: list[ThreadNode | str] = []
    for root in reversed(threads):
        if root.number is not None or _kids(root):
            stack.extend((")", root, "("))
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        node, first = item, True
        while True:
            kids = _kids(node)
            if node.number is not None:
                out.append(str(node.number) if first else f" {node.number}")
                first = False
            if len(kids) != 1:
                break
            node = kids[0]
        if kids:
            if not first:
                out.append(" ")
            for kid in reversed(kids):
                stack.extend((")", kid, "("))
    return "".join(out)


def thread_data(threads: Sequence[ThreadNode]) -> str:
    """The untagged response's text, ``THREAD`` [SP 1*thread-list]."""
    text = render_threads(threads)
    return f"THREAD {text}" if text else "THREAD"
