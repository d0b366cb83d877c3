"""Sending a message as an inbox: the business rules of SMTP submission.

The SMTP adapter (agentpost.smtp.submission) holds the session; everything it decides
about a message is here:

- the envelope sender must be the authenticated inbox (``SenderNotAllowed``: 553 5.7.1)
  and so must the ``From:`` header (``FromHeaderNotAllowed``: 550 5.7.1, nothing stored);
- per recipient: the inbox's ``send_paused`` (``SendingPaused``: 550 5.7.1 -- a policy
  refusal the client must show its user, not retry) and the send-direction filter
  rules (``RecipientBlocked``: 550 5.7.1), evaluated exactly like receive rules
  (agentpost.mail.filters.decide: the most specific rule wins, block on a tie);
- the message gets ``Message-ID:`` and ``Date:`` when missing; a ``Bcc:`` header is
  kept in the Sent copy, which is also what the queue row names: the queue worker strips
  ``Bcc:`` from every hand-off (agentpost.outbound.worker.without_bcc), so it never
  leaves, whichever door queued the message;
- the queue rows' envelope sender is the inbox's address, or, when the inbox's verified
  domain has a custom MAIL FROM and the transport is not ses (RetryPolicy
  .custom_mail_from), the same local part at it: ``alice@bounce.example.com`` (SPF
  aligns with that domain, and its bounces come back through the MX: core.routing).
  The checks' read decides it (:meth:`Submission.check_recipients` returns it), the
  door passes it to :meth:`Submission.submit`; the Sent copy keeps the inbox's;
- the Sent copy (folder Sent, ``\\Seen``, direction ``outbound``, event ``message.sent``)
  is stored through the one ingest path, and the queue rows for every recipient are
  written inside that same transaction, so the door acknowledges only after one
  COMMIT covering both.

Recipients hosted here are queued like any other: the queue worker's local path
(agentpost.outbound.local) delivers them through the Router and ingest, so a retry
after a failure is the queue's, with the usual ``message.received`` event.
"""

from __future__ import annotations

import email.utils
import io
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from twisted.internet import threads

from agentpost.core.context import RequestContext
from agentpost.core.ingest import Ingest, Stored, Target
from agentpost.core.send_limits import SendLimits
from agentpost.core.suppressions import normalize_address
from agentpost.mail import filters
from agentpost.mail.header_fields import without_fields
from agentpost.model.errors import (
    DomainNotVerified,
    FromHeaderNotAllowed,
    MalformedMessage,
    MessageTooLarge,
    RecipientBlocked,
    SenderNotAllowed,
    SendingPaused,
    SuppressedRecipient,
    Unauthenticated,
)
from agentpost.model.ids import new_id
from agentpost.model.principal import Principal
from agentpost.outbound.queue import RetryPolicy, domain_of, unique_recipients
from agentpost.storage import outbound as outbound_store
from agentpost.storage.database import Database, Txn

#: Header block bound for the header checks (a larger one is refused, not parsed).
MAX_HEADER_BYTES = 1024 * 1024
#: An originator field (From:, Sender:, ...) naming one inbox never needs more; a longer
#: one is refused unparsed: the address parser takes ~2 us a byte, holding the GIL.
MAX_ORIGINATOR_BYTES = 8 * 1024
#: A header section up to this size is checked on the reactor thread (microseconds).
INLINE_HEADER_BYTES = 16 * 1024


@dataclass(frozen=True)
class Sender:
    """An authenticated inbox that sends: the key's principal and the inbox."""

    principal: Principal
    org_id: str
    environment_id: str
    inbox_id: str
    address: str

    @classmethod
    def of(cls, principal: Principal, inbox: dict[str, Any]) -> Sender:
        """From a login's principal and inbox row."""
        return cls(principal, inbox["org_id"], inbox["environment_id"], inbox["id"],
                   inbox["email"])


@dataclass(frozen=True)
class Submitted:
    """A committed submission: the Sent copy's id and the queue rows."""

    message_id: str
    queue_ids: list[str]


def _same(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


#: Fields that name who wrote or sent the message: each must be the inbox alone.
_ORIGINATORS = frozenset({"from", "sender", "resent-from", "resent-sender"})
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def _check_originators(head: bytes, address: str) -> set[str]:
    """Every header line is a field or a continuation (a line a lenient reader would
    take for a second From: cannot hide from a strict one), there is exactly one From:,
    and every originator field names the inbox and nothing else. Returns the field
    names present (lower case)."""
    if b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
        raise MalformedMessage("Header lines must end with CRLF.")
    fields: list[tuple[str, list[bytes]]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
            continue
        m = _FIELD_NAME.match(line)
        if m is None:
            raise MalformedMessage("The header section holds a line that is not a field.")
        fields.append((m.group(1).decode("ascii").lower(), [line[m.end():]]))
    if sum(1 for name, _ in fields if name == "from") != 1:
        raise FromHeaderNotAllowed()
    for name, parts in fields:
        if name in _ORIGINATORS:
            if sum(len(part) for part in parts) > MAX_ORIGINATOR_BYTES:
                raise FromHeaderNotAllowed()  # (parsing costs ~2 us a byte, GIL held)
            value = b" ".join(parts).decode("utf-8", "replace")
            try:
                found = email.utils.getaddresses([value])
            except (RecursionError, ValueError):  # comments or groups nested past the
                raise FromHeaderNotAllowed() from None  # parser's depth: no address
            if not found or any(not _same(addr, address) for _, addr in found):
                raise FromHeaderNotAllowed()
    return {name for name, _ in fields}


def _without_return_path(head: bytes) -> bytes:
    """The header section without ``Return-Path:`` fields (and their continuations).

    Why: the final delivery adds the true one (RFC 5321 §4.4, which also says an
    originating system SHOULD NOT send one); a client's own went out to every remote
    recipient, and sat under the true one in every hosted copy (the queue's local path
    drops only leading ones: ours come first)."""
    return without_fields(head, lambda name: name == b"return-path")


def prepare(raw: bytes, *, address: str, hostname: str, now: datetime) -> bytes:
    """Check the From: header, drop any Return-Path: and add Message-ID:/Date: if
    missing (pure; runs in a thread). ``raw`` has CRLF line endings."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:  # headers only, or no body separator
        head, body = raw.rstrip(b"\r\n"), b""
    else:
        head, body = raw[:end], raw[end + 4:]
    if len(head) > MAX_HEADER_BYTES:
        raise MessageTooLarge("The header section is too large.")
    # Every line is a field or a continuation (checked), so the names are the fields:
    # no second parse of the header section to learn whether two of them are present.
    names = _check_originators(head, address)
    stripped = "return-path" in names
    if stripped:
        head = _without_return_path(head)
    added: list[bytes] = []
    if "message-id" not in names:
        domain = address.rpartition("@")[2] or hostname
        token = secrets.token_hex(12)
        added.append(f"Message-ID: <{token}@{domain}>".encode("ascii", "replace"))
    if "date" not in names:
        added.append(f"Date: {email.utils.format_datetime(now)}".encode("ascii"))
    if not added and not stripped:
        return raw
    return b"\r\n".join([head, *added]) + b"\r\n\r\n" + body


def queue_sql(txn: Txn, copy: Stored, sender: Sender, mail_from: str,
              recipients: list[str], policy: RetryPolicy) -> tuple[list[str], str, list[Any]]:
    """The queue rows of a Sent copy (one per recipient domain, as outbound.queue.enqueue
    writes them) as statements to send with the copy's insert: ingest has already
    referenced the raw blob in this transaction, under the blob's lock. Returns the
    queue ids and (sql, params)."""
    by_domain: dict[str, list[str]] = {}
    for rcpt in unique_recipients(recipients):
        by_domain.setdefault(domain_of(rcpt), []).append(rcpt)
    domains = sorted(by_domain)
    expires = txn.now + timedelta(seconds=policy.lifetime_s)
    rows: list[dict[str, Any]] = [{
        "org_id": sender.org_id, "id": new_id("obq"),
        "environment_id": sender.environment_id, "inbox_id": sender.inbox_id,
        "message_id": copy.message_id, "raw_blob_key": copy.raw_blob_key,
        "size": copy.size, "mail_from": mail_from, "domain": domain,
        "status": "queued", "next_attempt_at": txn.now, "expires_at": expires,
        "created_at": txn.now, "updated_at": txn.now,
    } for domain in domains]
    if not rows:
        return [], "", []
    sql, params = outbound_store.insert_batch_sql(
        txn.now, rows, [by_domain[d] for d in domains], blob_locked=True)
    return [row["id"] for row in rows], sql, params


def envelope_sender(address: str, mail_from_domain: str | None, custom: bool) -> str:
    """The queue rows' envelope sender for an inbox at ``address``: ``local@`` its
    verified domain's custom MAIL FROM when ``custom`` (transport not ses) and the domain
    has one; else ``address`` (also the null reverse path, which stays empty)."""
    local, at, _ = address.rpartition("@")
    if not custom or not mail_from_domain or not at:
        return address
    return f"{local}@{mail_from_domain}"


def _comparable(recipients: list[str]) -> dict[str, str]:
    """Each recipient's normalised address, for the suppression list (one that is not
    comparable is left out: the door's own address checks refuse it)."""
    emails: dict[str, str] = {}
    for recipient in recipients:
        try:
            emails[recipient] = normalize_address(recipient)
        except ValueError:
            pass
    return emails


class Submission:
    """The core operation behind SMTP submission and the send API (core.sending)."""

    def __init__(self, db: Database, ingest: Ingest, reactor: Any,
                 policy: RetryPolicy, hostname: str, limits: SendLimits | None = None) -> None:
        self._db = db
        self._limits = limits  # send rate limits and daily quotas (core.send_limits)
        self._ingest = ingest
        self._reactor = reactor
        self._policy = policy
        self._hostname = hostname

    async def _prepare(self, raw: bytes, address: str, now: datetime) -> bytes:
        """:func:`prepare`; in a thread only when the header section is large (a usual
        one is checked faster than a thread hop takes)."""
        end = raw.find(b"\r\n\r\n", 0, INLINE_HEADER_BYTES)
        if end >= 0:
            return prepare(raw, address=address, hostname=self._hostname, now=now)
        return await threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), lambda: prepare(
                raw, address=address, hostname=self._hostname, now=now))

    def check_sender(self, sender: Sender, mail_from: str) -> None:
        """MAIL FROM must be the inbox's own address (the null sender is refused too)."""
        if not _same(mail_from, sender.address):
            raise SenderNotAllowed()

    async def check_recipients(self, sender: Sender, recipients: list[str]) -> str:
        """SendingPaused / DomainNotVerified (the inbox's own domain is not verified) /
        RecipientBlocked (send filter rules) / SuppressedRecipient / SendRateLimited
        (the send limits are already used up) for the first recipient refused, in their
        order, in one read of the inbox's policy, the suppression list and
        (when they are on) the send limits' buckets, however many recipients there are.
        Returns the queue rows' envelope sender (:func:`envelope_sender`, decided on the
        same read): pass it to :meth:`submit`."""
        emails = _comparable(recipients)
        row = await self._db.run_read(
            "submission.policy", outbound_store.sending_checks, sender.org_id,
            sender.environment_id, sender.inbox_id, sorted(set(emails.values())),
            buckets=self._limited)
        if row is None:
            raise Unauthenticated("The inbox no longer exists.")
        self._judge(row, recipients, emails)
        return envelope_sender(sender.address, row["mail_from_domain"],
                               self._policy.custom_mail_from)

    async def inbox_checks(self, org_id: str, env_ids: frozenset[str] | None,
                           inbox_id: str, recipients: list[str]) -> dict[str, Any] | None:
        """The send API's inbox (``id``, ``org_id``, ``environment_id``, ``email``,
        ``display_name``) found by id in the organization's allowed environments, with
        what :meth:`check_recipients` reads: one read for both. Pass the row to
        :meth:`judge`. None: no such inbox here."""
        return await self._db.run_read(
            "submission.inbox_policy", outbound_store.inbox_and_sending_checks, org_id,
            env_ids, inbox_id, sorted(set(_comparable(recipients).values())),
            buckets=self._limited)

    def judge(self, row: dict[str, Any], recipients: list[str]) -> str:
        """:meth:`check_recipients`' refusals on a row of :meth:`inbox_checks`, and
        its answer: the queue rows' envelope sender."""
        self._judge(row, recipients, _comparable(recipients))
        return envelope_sender(row["email"], row["mail_from_domain"],
                               self._policy.custom_mail_from)

    @property
    def _limited(self) -> bool:
        return self._limits is not None and self._limits.active

    def _judge(self, row: dict[str, Any], recipients: list[str],
               emails: dict[str, str]) -> None:
        """The refusals of :meth:`check_recipients`, on the row the checks read."""
        if row["send_paused"]:
            raise SendingPaused()
        if not row["domain_verified"]:
            raise DomainNotVerified()
        suppressed = set(row["suppressed"] or ())
        for recipient in recipients:
            if row["rules"] and filters.decide(row["rules"], recipient) == "block":
                raise RecipientBlocked()
            if recipient in emails and emails[recipient] in suppressed:
                raise SuppressedRecipient()
        if self._limits is not None and self._limited:  # refuse early (451 4.7.0)
            self._limits.check_row(row)  # when a bucket is already empty

    async def submit(self, sender: Sender, mail_from: str, recipients: list[str],
                     message: IO[bytes], origin: RequestContext, *,
                     labels: tuple[str, ...] = (),
                     also: Callable[[Txn, Submitted], Awaitable[None]] | None = None,
                     envelope_from: str | None = None) -> Submitted:
        """Store the Sent copy and queue it for ``recipients``: one COMMIT for both.

        ``labels`` go on the Sent copy; ``also`` (the send API: its answer and the
        idempotency record) runs inside that same transaction, after the queue rows.
        ``envelope_from``: the queue rows' envelope sender, as :meth:`check_recipients`
        answered (None: ``mail_from``); the Sent copy's Return-Path stays ``mail_from``."""
        self.check_sender(sender, mail_from)
        queue_from = mail_from if envelope_from is None else envelope_from
        raw = message.read()
        now = datetime.fromtimestamp(self._reactor.seconds(), UTC)
        sent = await self._prepare(raw, sender.address, now)
        queue_ids: list[str] = []

        def queue_rows(txn: Txn, copy: Stored) -> tuple[str, list[Any]]:
            """The queue rows go in the round trip of the Sent copy's own insert."""
            ids, sql, params = queue_sql(txn, copy, sender, queue_from, recipients,
                                         self._policy)
            # Assigned, not extended: a retried transaction must not list rows twice.
            queue_ids[:] = ids
            return sql, params

        async def queue_it(txn: Txn, stored: list[Stored]) -> None:
            if also is not None:
                await also(txn, Submitted(stored[0].message_id, list(queue_ids)))

        origin.principal = sender.principal
        origin.environment_id = sender.environment_id
        target = Target(sender.org_id, sender.environment_id, sender.inbox_id, sender.address)
        # The send limits first, in a statement of their own (core.send_limits: the
        # organization's row is not held locked until this send commits).
        reservation = None if self._limits is None else await self._limits.reserve(
            sender.org_id, sender.inbox_id, len(recipients))
        try:
            stored = await self._ingest.store(
                [target], io.BytesIO(sent), envelope_from=mail_from,
                direction="outbound", folder="Sent", flags=frozenset({"\\Seen"}),
                labels=labels, origin=origin, before_insert=queue_rows,
                within=queue_it if also is not None else None,
                # Without ``also`` it may share a group commit with other sends and MX
                # deliveries: one COMMIT (and fsync) for the batch, the queue rows
                # still in the same transaction as their Sent copy.
                group=also is None)
        except Exception:  # not a cancellation: whether that committed is unknown
            if reservation is not None:
                await reservation.give_back()
            raise
        return Submitted(stored[0].message_id, queue_ids)
