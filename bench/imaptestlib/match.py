"""Matching server responses against a script's expectations, with ``$variables``.

``test_match`` returns FULL when ``expected`` matches ``got``, otherwise how many leading
arguments matched (used to pick the "best match" for a missing reply). Rules, as in
imaptest: atoms/strings/literals compare case-insensitively after expansion; ``$name``
binds on first use to the text up to the pattern's next character and must be equal later;
``$`` alone matches anything (and skips a list); ``$]`` skips up to an atom with ``]``;
``$N`` is the current number of the message that had sequence N when the group started;
``$$`` is a literal ``$``. A list without directives must match in order and in full;
``$!unordered[=n]`` matches chains of n in any order and allows extra items unless
``$!noextra`` (extras listed by ``$!ignore=`` are tolerated), ``$!ban=`` forbids extras.
With ``prefix`` (tagged replies, untagged OK/NO/BAD/BYE) trailing text may follow and the
last expected word only has to start the server's word.
"""

from __future__ import annotations

import sys

from .args import ATOM, LIST, NIL, Arg

FULL = sys.maxsize


def _var_char(c: str) -> bool:
    return c.isalnum() or c == "_"


class Vars:
    #: imaptest's rule: $modseqN must be at least the previous $modseqM + (N - M), and
    #: N may not go down. --plain-modseq turns it off (esearch-condstore numbers its
    #: STOREs 1, 3, 2, 4, which that rule can never accept, whatever the server).
    ordered_modseq = True

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.added: list[str] = []
        self.seqmap: list[int] = []
        self.modseq_idx = 0
        self.modseq_val = 0

    def relative_seq(self, seq: int) -> str:
        if seq == 0:
            return "<zero seq>"
        if seq > len(self.seqmap):
            return "<out of range>"
        if self.seqmap[seq - 1] == 0:
            return "<expunged>"
        return str(self.seqmap[seq - 1])

    def expunge(self, seq: int) -> None:
        if seq > len(self.seqmap):
            return
        for i in range(seq - 1, len(self.seqmap)):
            if self.seqmap[i] >= seq:
                self.seqmap[i] = 0 if self.seqmap[i] == seq else self.seqmap[i] - 1

    def rollback(self) -> None:
        for k in self.added:
            self.values.pop(k, None)
        self.added.clear()

    def _modseq(self, idx: int, text: str) -> str:
        if not text.isdigit():
            return "$modseq-not-number"
        if self.modseq_idx > idx:
            return "$modseq-order-mismatch"
        value = int(text)
        least = self.modseq_val + (idx - self.modseq_idx)
        result = text
        if value < least:
            result, value = f"$modseq-at-least-{least}", least
        self.modseq_idx, self.modseq_val = idx, value
        return result

    # -- command lines ----------------------------------------------------------------
    def expand_all(self, line: str, skip_unset: bool = False) -> str:
        """Expand ``$var``/``${var}``/``$N``/``$$`` in a command (or a message)."""
        out, i, n = [], 0, len(line)
        while i < n:
            c = line[i]
            if c != "$" or i + 1 == n:
                out.append(c)
                i += 1
                continue
            i += 1
            if line[i] == "$":
                out.append("$")
                i += 1
            elif line[i] == "!":
                while i < n and line[i] != " ":
                    i += 1
            else:
                if line[i] == "{":
                    end = line.find("}", i)
                    if end < 0:
                        raise KeyError("missing '}'")
                    name, i = line[i + 1:end], end + 1
                else:
                    j = i
                    while j < n and _var_char(line[j]):
                        j += 1
                    name, i = line[i:j], j
                if name.isdigit():
                    out.append(self.relative_seq(int(name)))
                elif name in self.values:
                    out.append(self.values[name])
                elif skip_unset:
                    out.append("$" + name)
                else:
                    raise KeyError(f"Uninitialized variable: {name}")
        return "".join(out)

    # -- matching ---------------------------------------------------------------------
    def expand_input(self, pat: str, inp: str) -> tuple[str | None, bool]:
        out: list[str] = []
        icase = True
        i, pos, n = 0, 0, len(pat)
        while i < n:
            if pat[i] != "$" or pat[i + 1:i + 2] == "$":
                if pat[i] == "$":
                    i += 1
                if pos >= len(inp) or pat[i].upper() != inp[pos].upper():
                    return None, icase
                out.append(pat[i])
                i += 1
                pos += 1
                continue
            i += 1
            if pat[i:i + 1] == "{":
                end = pat.find("}", i + 1)
                if end < 0:
                    return "", icase
                name, i = pat[i + 1:end], end + 1
            else:
                j = i
                while j < n and _var_char(pat[j]):
                    j += 1
                name, i = pat[i:j], j
            if name.isdigit():
                value = self.relative_seq(int(name))
            elif name.startswith("case:"):
                icase = False
                value = ""
            else:
                value = self.values.get(name) if name else None
                if value is None:
                    rest = pat[i:]
                    if rest.startswith("$"):
                        nxt, sub_icase = self.expand_input(rest, inp[pos:])
                        nxt = nxt or ""
                    else:
                        nxt, sub_icase = rest, True
                    stop = nxt[:1]
                    p = pos
                    while p < len(inp) and stop and (
                            inp[p].upper() != stop.upper() if sub_icase else inp[p] != stop):
                        p += 1
                    if not stop:
                        p = len(inp)
                    value = inp[pos:p]
                    if (name and name.startswith("modseq") and name[6:].isdigit()
                            and Vars.ordered_modseq):
                        value = self._modseq(int(name[6:]), value)
                        self.values[name] = value
                    elif name:
                        self.values[name] = value
                        self.added.append(name)
            out.append(value)
            if inp[pos:pos + len(value)] != value:
                return None, icase
            pos += len(value)
        return "".join(out), icase

    def match_list(self, match: list[Arg], args: list[Arg]) -> int:
        unordered, chain, noextra = False, 1, -1
        ignores: list[str] = []
        bans: list[str] = []
        k = 0
        while k < len(match) and match[k].kind == ATOM and match[k].value.startswith("$!"):  # type: ignore[union-attr]
            d = match[k].value[2:]  # type: ignore[index]
            if d.startswith("unordered"):
                unordered = True
                noextra = 0 if noextra == -1 else noextra
                if d[9:10] == "=":
                    chain = int(d[10:])
            elif d == "ordered":
                unordered = False
            elif d == "extra":
                noextra = 0
            elif d == "noextra":
                noextra = 1
            elif d.startswith("ignore="):
                ignores.append(d[7:].lower())
            elif d.startswith("ban="):
                bans.append(d[4:].lower())
            k += 1
        match = match[k:]
        if noextra == -1:
            noextra = 1
        if not unordered:
            return self.match_args(match, args)
        if len(args) % chain:
            return 0
        matched = [False] * len(args)
        ret = 0
        for m in range(0, len(match), chain):
            for i in range(0, len(args), chain):
                if self.match_args(match[m:m + chain], args[i:i + chain], chain) == FULL:
                    matched[i] = True
                    break
            else:
                return ret
            ret += 1
        for i in range(0, len(args), chain):
            s = args[i].astring
            if matched[i] or s is None:
                continue
            if noextra > 0 and s.lower() not in ignores:
                return ret
            if noextra <= 0 and s.lower() in bans:
                return ret
        return FULL

    def match_args(self, match: list[Arg], args: list[Arg], limit: int = FULL,
                   prefix: bool = False) -> int:
        ret, mi, ai = 0, 0, 0
        while mi < len(match) and limit > 0:
            m = match[mi]
            a = args[ai] if ai < len(args) else None
            if m.kind == NIL:
                if a is None or a.kind != NIL:
                    return ret
            elif m.kind == LIST:
                if a is None or a.kind != LIST:
                    return ret
                sub = self.match_list(m.value, a.value)  # type: ignore[arg-type]
                if sub != FULL:
                    return ret + sub
            else:
                pat: str = m.value  # type: ignore[assignment]
                if pat == "$" and a is not None and a.kind == LIST:
                    pass
                elif pat == "$]":
                    while a is not None and a.kind in (ATOM, NIL) and "]" not in (a.atom or ""):
                        ai += 1
                        a = args[ai] if ai < len(args) else None
                else:
                    s = a.astring if a is not None else None
                    if s is None:
                        return ret
                    expanded, icase = self.expand_input(pat, s)
                    if expanded is None:
                        return ret
                    last = prefix and mi == len(match) - 1
                    got, want = (s.lower(), expanded.lower()) if icase else (s, expanded)
                    if (not got.startswith(want)) if last else got != want:
                        return ret
            ret += 1
            mi += 1
            ai += 1
            limit -= 1
        if prefix or ai >= len(args) or limit == 0:
            return FULL
        return ret
