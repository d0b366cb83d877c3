"""IMAP4rev2 (RFC 9051) beside IMAP4rev1: what changes once a client sends
``ENABLE IMAP4rev2``.

Why a module of its own: a server advertising both revisions must answer a client that
never enabled IMAP4rev2 exactly as an IMAP4rev1 server would (RFC 9051 Appendix A), so
every difference hangs on one session flag, ``session.imap4rev2``, and is decided here
or next to a test of that flag. What changes after ENABLE IMAP4rev2:

- **Mailbox names are UTF-8** (RFC 9051 §5.1), not modified UTF-7 (Appendix A.1):
  names the client sends are taken as UTF-8 in Unicode Normalization Form C (a
  denormalized name is accepted and normalized, in every command), names we send are
  UTF-8 quoted strings (:func:`mailbox_arg`, :func:`mailbox_wire`). Until then we never
  send a UTF-8 quoted string (Appendix A).
- **No \\Recent** (Appendix E): no ``\\Recent`` in FETCH FLAGS, no ``* n RECENT``, no
  ``RECENT`` STATUS item and no ``RECENT``/``NEW``/``OLD`` search keys (those are not in
  RFC 9051's grammar: BAD), and no ``UNSEEN`` response code at SELECT.
- **SEARCH answers ESEARCH** (§6.4.4): ``* ESEARCH (TAG "t") [UID] ALL ...``, as if
  ``RETURN ()`` had been given.
- **SELECT/EXAMINE send a LIST response** for the mailbox (§6.3.2), with ``OLDNAME``
  when the name given was normalized (§6.3.9.7); CREATE, DELETE and RENAME send one
  too when they normalized a name, and ``OK [CLOSED]`` precedes a reselect (§7.1).

What holds whatever the revision (and so is not here): STATUS DELETED and SIZE,
ESEARCH's RETURN options, LIST-EXTENDED and LIST-STATUS, UIDPLUS, MOVE, UNSELECT,
NAMESPACE, SPECIAL-USE, LITERAL+ (a superset of LITERAL-), IDLE, ENABLE, SASL-IR.

The capability is offered only with BINARY (RFC 3516) and SEARCHRES (RFC 5182), which
RFC 9051 folds in: :data:`OFFER_IMAP4REV2` is the one switch.
"""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING, Any

from agentpost.imap.parser import ParseError, astring, decode_mailbox, encode_mailbox
from agentpost.mail import imapformat
from agentpost.model import errors

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol

__all__ = [
    "IMAP4REV2",
    "OFFER_IMAP4REV2",
    "enable",
    "mailbox_arg",
    "mailbox_text",
    "mailbox_wire",
    "offered",
    "refuse_removed_search_keys",
    "refuse_removed_status_items",
    "send_mailbox_list",
]

IMAP4REV2 = "IMAP4rev2"
#: The switch: advertise IMAP4rev2 and accept ``ENABLE IMAP4rev2``. RFC 9051 requires
#: BINARY and SEARCHRES as well; IMAP4rev2 is offered only when the server offers both.
OFFER_IMAP4REV2 = True
#: What RFC 9051 requires beside what this module implements.
REQUIRED_CAPABILITIES = ("BINARY", "SEARCHRES")

#: STATUS items RFC 9051 removed.
_REMOVED_STATUS_ITEMS = frozenset({"RECENT"})


def offered(capabilities: list[str]) -> bool:
    """Whether to advertise IMAP4rev2 beside ``capabilities``: the switch is on and the
    extensions RFC 9051 folds in are all there."""
    return OFFER_IMAP4REV2 and all(c in capabilities for c in REQUIRED_CAPABILITIES)


def enable(session: IMAP4ServerProtocol) -> bool:
    """``ENABLE IMAP4rev2``: True when the session now speaks IMAP4rev2 (False when the
    server does not offer it: RFC 5161 §3.1, unknown capabilities are ignored)."""
    if not offered(session.capabilities()):
        return False
    session.imap4rev2 = True
    if session.selected is not None:  # ENABLE belongs before SELECT; be kind anyway
        session.selected.show_recent = False
    return True


# ---------------------------------------------------------------------- mailbox names

def _inbox_case(name: str) -> str:
    """INBOX is case-insensitive, also as the first level of a hierarchy."""
    if name.upper() == "INBOX":
        return "INBOX"
    if name.upper().startswith("INBOX/"):
        return "INBOX" + name[5:]
    return name


def mailbox_text(session: IMAP4ServerProtocol, text: str) -> str:
    """A mailbox name (or LIST pattern) as the client wrote it, as text: modified UTF-7
    for an IMAP4rev1 client, UTF-8 after ENABLE IMAP4rev2 (RFC 9051 §5.1), where a
    denormalized name is normalized to NFC (so every command finds the mailbox CREATE
    made) and a name that was not valid UTF-8 (decoded to U+FFFD) is refused."""
    if not session.imap4rev2:
        return decode_mailbox(text)
    if "\ufffd" in text:  # the tokenizer's replacement for bytes that are not UTF-8
        raise errors.InvalidRequest("Mailbox name is not valid UTF-8")
    return _inbox_case(unicodedata.normalize("NFC", text))


def mailbox_arg(session: IMAP4ServerProtocol, token: Any) -> str:
    """A mailbox argument (astring) as text, per :func:`mailbox_text`."""
    return mailbox_text(session, astring(token, "mailbox"))


def normalized(session: IMAP4ServerProtocol, token: Any) -> str | None:
    """The name the client sent when IMAP4rev2 normalization changed it (what OLDNAME
    reports, RFC 9051 §6.3.9.7), else None."""
    if not session.imap4rev2:
        return None
    text = astring(token, "mailbox")
    if _inbox_case(text) == _inbox_case(unicodedata.normalize("NFC", text)):
        return None
    return text


def quote_utf8(text: str) -> str:
    """A quoted string with UTF-8 in it (RFC 9051 QUOTED-CHAR), or a literal for text
    with control characters."""
    if all(ch >= " " and ch != "\x7f" and not "\x80" <= ch <= "\x9f" for ch in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return imapformat.quote(text)


def mailbox_wire(session: IMAP4ServerProtocol, name: str) -> str:
    """A mailbox name for a response: modified UTF-7 (RFC 3501 §5.1.3) for an IMAP4rev1
    client, a UTF-8 quoted string after ENABLE IMAP4rev2."""
    if session.imap4rev2:
        return quote_utf8(name)
    return imapformat.quote(encode_mailbox(name))


async def send_mailbox_list(session: IMAP4ServerProtocol, name: str,
                            oldname: str | None = None, *, exists: bool = True) -> None:
    """``* LIST (attributes) "/" name ["OLDNAME" (old)]`` for one mailbox: what SELECT
    owes an IMAP4rev2 client (RFC 9051 §6.3.2; the attributes must be accurate), and
    what CREATE, DELETE (``\\NonExistent``) and RENAME send when they normalized a name
    (§6.3.9.7)."""
    attrs: list[str] = []
    if exists:
        assert session.account is not None
        info = next((f for f in await session.account.list_folders() if f.name == name),
                    None)
        if info is None:
            return  # gone meanwhile
        attrs.append("\\HasChildren" if info.has_children else "\\HasNoChildren")
        if info.special_use:
            attrs.append(info.special_use)
    else:
        attrs.append("\\NonExistent")
    extra = f' ("OLDNAME" ({mailbox_wire(session, oldname)}))' if oldname is not None else ""
    session.send(f'* LIST ({" ".join(attrs)}) "/" {mailbox_wire(session, name)}{extra}')


# ---------------------------------------------------------------------- removed items

def refuse_removed_status_items(session: IMAP4ServerProtocol, keys: list[str]) -> None:
    """BAD for STATUS items RFC 9051 removed (RECENT), after ENABLE IMAP4rev2."""
    if session.imap4rev2:
        for key in keys:
            if key in _REMOVED_STATUS_ITEMS:
                raise ParseError(f"{key} is not an IMAP4rev2 STATUS item")


def _uses_recent(key: tuple[Any, ...]) -> bool:
    kind = key[0]
    if kind == "recent":
        return True
    if kind == "and":
        return any(_uses_recent(k) for k in key[1])
    if kind == "or":
        return _uses_recent(key[1]) or _uses_recent(key[2])
    if kind == "not":
        return _uses_recent(key[1])
    return False


def refuse_removed_search_keys(session: IMAP4ServerProtocol, key: tuple[Any, ...]) -> None:
    """BAD for the search keys RFC 9051 removed (RECENT, NEW, OLD: there is no \\Recent),
    after ENABLE IMAP4rev2. The parsed tree is bounded in depth by the parser."""
    if session.imap4rev2 and _uses_recent(key):
        raise ParseError("RECENT, NEW and OLD are not IMAP4rev2 search keys")
