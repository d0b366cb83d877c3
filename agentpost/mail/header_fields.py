"""Removing whole fields from a raw header section, continuation lines included.

One implementation for every place that drops fields from a message as it passes
(submission drops a client's Return-Path:, the outbound queue drops Bcc: and SES's
control fields): a field's folded lines belong to it, and a name is compared without
the white space RFC 5322's obsolete syntax allows before the colon.
"""

from __future__ import annotations

from collections.abc import Callable


def without_fields(head: bytes, drop: Callable[[bytes], bool]) -> bytes:
    """``head`` (CRLF lines, no final blank line) without every field whose name
    (lower case, white space stripped) ``drop`` chooses, with its continuations."""
    kept: list[bytes] = []
    skipping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = drop(line.split(b":", 1)[0].strip().lower())
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept)
