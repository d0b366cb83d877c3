"""SES delivery feedback: verified SNS messages turned into recipient state, events,
delivery_events rows and suppression entries.

SES publishes one JSON event per message and event type, either as configuration-set
event publishing (``eventType``) or as identity notifications (``notificationType``);
both spellings are read. ``mail.messageId`` is the SES MessageId our SES transport
stored as each recipient's ``transport_id``.

| SES event       | delivery_status | event               | suppression              |
|-----------------|-----------------|---------------------|--------------------------|
| Send            | (unchanged)     | --                  | --                       |
| Delivery        | delivered       | message.delivered   | --                       |
| DeliveryDelay   | delayed         | message.delayed     | --                       |
| Reject          | rejected        | message.rejected    | --                       |
| Bounce          | bounced         | message.bounced     | when bounceType=Permanent |
| Complaint       | complained      | message.complained  | always                   |

A recipient's ``delivery_status`` only moves up this order: delayed, delivered,
rejected, bounced, complained (a late DeliveryDelay does not undo a Delivery; a bounce
after a Delivery -- an asynchronous bounce -- does).

Everything one notification changes is written in one transaction together with its
SNS MessageId, so a redelivered notification changes nothing the second time. A SES
MessageId we do not know (mail of another installation on the same topic, or rows
already gone) is answered 200 and logged.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from twisted.internet.interfaces import IReactorTime

from agentpost.config.sections import OutboundSection
from agentpost.core.suppressions import suppress_in
from agentpost.model.ids import new_id
from agentpost.outbound.sns import (
    MAX_CONFIRM_BYTES,
    NOTIFICATION,
    SUBSCRIPTION_CONFIRMATION,
    CertificateCache,
    GuardedFetcher,
    SNSPolicy,
    SNSRejected,
    SNSVerifier,
    load_trust_root,
)
from agentpost.storage import delivery_events as store
from agentpost.storage import mail as mail_store
from agentpost.storage.database import Database, Txn

log = logging.getLogger(__name__)

#: SES event type -> (our kind, delivery_status, event type).
KINDS: dict[str, tuple[str, str | None, str | None]] = {
    "send": ("send", None, None),
    "delivery": ("delivery", "delivered", "message.delivered"),
    "deliverydelay": ("delivery_delay", "delayed", "message.delayed"),
    "reject": ("reject", "rejected", "message.rejected"),
    "bounce": ("bounce", "bounced", "message.bounced"),
    "complaint": ("complaint", "complained", "message.complained"),
}
RANK = {None: 0, "delayed": 1, "delivered": 2, "rejected": 3, "bounced": 4, "complained": 5}

_SMTP_REPLY = re.compile(r"(?:^|[;\s])([245]\d\d)(?:[\s-]+([245]\.\d{1,3}\.\d{1,3}))?")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
MAX_TEXT = 1000


@dataclass
class RecipientFeedback:
    """What SES says about one recipient."""

    address: str
    smtp_code: int | None = None
    status_code: str | None = None
    diagnostic: str | None = None


@dataclass
class SESEvent:
    """One SES event, reduced to what we store."""

    kind: str
    transport_id: str
    recipients: list[RecipientFeedback]
    occurred_at: datetime | None = None
    bounce_type: str | None = None
    bounce_subtype: str | None = None
    feedback: dict[str, Any] = field(default_factory=dict)

    @property
    def delivery_status(self) -> str | None:
        return KINDS[self.kind.replace("_", "")][1]

    @property
    def event_type(self) -> str | None:
        return KINDS[self.kind.replace("_", "")][2]

    @property
    def suppresses(self) -> str | None:
        """The suppression reason this event gives its recipients, if any."""
        if self.kind == "complaint":
            return "complaint"
        if self.kind == "bounce" and self.bounce_type == "Permanent":
            return "bounce"
        return None


def _text(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value.replace("\x00", "")[:MAX_TEXT]


def _codes(text: str | None, status: Any = None) -> tuple[int | None, str | None]:
    """The SMTP code and enhanced status code in a reply or a diagnostic text."""
    smtp_code, enhanced = None, None
    if text:
        m = _SMTP_REPLY.search(text)
        if m:
            smtp_code, enhanced = int(m.group(1)), m.group(2)
    if isinstance(status, str) and _STATUS.fullmatch(status.strip()):
        enhanced = status.strip()
    return smtp_code, enhanced


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def _entries(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _recipients(kind: str, detail: Mapping[str, Any],
                mail: Mapping[str, Any]) -> list[RecipientFeedback]:
    """Per-recipient facts of each event kind."""
    out: list[RecipientFeedback] = []
    if kind == "bounce":
        for r in _entries(detail.get("bouncedRecipients")):
            diag = _text(r.get("diagnosticCode"))
            code, status = _codes(diag, r.get("status"))
            out.append(RecipientFeedback(str(r.get("emailAddress", "")), code, status, diag))
    elif kind == "complaint":
        kind_text = _text(detail.get("complaintFeedbackType"))
        for r in _entries(detail.get("complainedRecipients")):
            out.append(RecipientFeedback(str(r.get("emailAddress", "")), diagnostic=kind_text))
    elif kind == "delivery_delay":
        for r in _entries(detail.get("delayedRecipients")):
            diag = _text(r.get("diagnosticCode"))
            code, status = _codes(diag, r.get("status"))
            out.append(RecipientFeedback(str(r.get("emailAddress", "")), code, status, diag))
    else:
        reply = _text(detail.get("smtpResponse")) if kind == "delivery" else \
            _text(detail.get("reason"))
        code, status = _codes(reply) if kind == "delivery" else (None, None)
        names = detail.get("recipients") if kind == "delivery" else mail.get("destination")
        for address in names if isinstance(names, list) else []:
            if isinstance(address, str):
                out.append(RecipientFeedback(address, code, status, reply))
    return [r for r in out if "@" in r.address and len(r.address) <= 320]


_DETAIL_KEYS = {"send": "send", "delivery": "delivery", "delivery_delay": "deliveryDelay",
                "reject": "reject", "bounce": "bounce", "complaint": "complaint"}


def parse_ses_event(text: str) -> SESEvent | None:
    """The SES event an SNS Notification carries; None when it is not one we handle."""
    if "\x00" in text or "\\u0000" in text:
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, Mapping):
        return None
    name = body.get("eventType") or body.get("notificationType")
    entry = KINDS.get(str(name).lower()) if isinstance(name, str) else None
    mail = body.get("mail")
    if entry is None or not isinstance(mail, Mapping):
        return None
    transport_id = mail.get("messageId")
    if not isinstance(transport_id, str) or not transport_id or len(transport_id) > 200:
        return None
    kind = entry[0]
    detail = body.get(_DETAIL_KEYS[kind])
    detail = detail if isinstance(detail, Mapping) else {}
    # What we keep: SES's own part of the event, never the message's headers.
    feedback = {"eventType": name, _DETAIL_KEYS[kind]: detail,
                "mail": {k: mail[k] for k in ("messageId", "timestamp", "source")
                         if k in mail}}
    event = SESEvent(kind, transport_id, _recipients(kind, detail, mail),
                     _time(detail.get("timestamp")) or _time(mail.get("timestamp")),
                     feedback=feedback)
    if kind == "bounce":
        event.bounce_type = _text(detail.get("bounceType"))
        event.bounce_subtype = _text(detail.get("bounceSubType"))
    return event


async def apply_event(txn: Txn, sns_message_id: str, event: SESEvent) -> str:
    """Write everything ``event`` changes (see the module doc); the outcome word."""
    rows = await store.recipients_by_transport_id(txn, event.transport_id)
    if not rows:
        log.info("SES feedback %s for unknown MessageId %s ignored", event.kind,
                 event.transport_id)
        return "unknown_message"
    by_address = {r["address"].lower(): r for r in rows}
    matched: list[tuple[dict[str, Any], RecipientFeedback]] = []
    for rcpt in event.recipients:
        row = by_address.get(rcpt.address.strip().lower())
        if row is not None and all(row is not m[0] for m in matched):
            matched.append((row, rcpt))
    if not matched:
        log.info("SES feedback %s for %s names none of its recipients", event.kind,
                 event.transport_id)
        return "no_recipient"
    await store.insert_events(txn, [_event_row(row, rcpt, event, sns_message_id)
                                    for row, rcpt in matched])
    status = event.delivery_status
    for row, rcpt in matched:
        if status is not None and RANK[status] >= RANK.get(row["delivery_status"], 0):
            await store.set_delivery_status(txn, row["org_id"], row["queue_id"],
                                            row["address"], status)
        reason = event.suppresses
        if reason is not None:
            await suppress_in(txn, org_id=row["org_id"], email=row["address"], reason=reason,
                              environment_id=row["environment_id"],
                              source_message_id=row["message_id"],
                              diagnostic=rcpt.diagnostic)
    if event.event_type is not None:
        await _emit(txn, event, matched)
    return "processed"


def _event_row(row: Mapping[str, Any], rcpt: RecipientFeedback, event: SESEvent,
               sns_message_id: str) -> dict[str, Any]:
    return {"org_id": row["org_id"], "id": new_id("dlv"),
            "environment_id": row["environment_id"], "queue_id": row["queue_id"],
            "message_id": row["message_id"], "recipient": row["address"],
            "type": event.kind, "bounce_type": event.bounce_type,
            "bounce_subtype": event.bounce_subtype, "smtp_code": rcpt.smtp_code,
            "status_code": rcpt.status_code, "diagnostic": rcpt.diagnostic,
            "transport_id": event.transport_id, "sns_message_id": sns_message_id,
            "feedback": event.feedback, "occurred_at": event.occurred_at}


async def _emit(txn: Txn, event: SESEvent,
                matched: list[tuple[dict[str, Any], RecipientFeedback]]) -> None:
    """One event per sent message the notification is about (normally exactly one)."""
    groups: dict[tuple[str, str], list[tuple[dict[str, Any], RecipientFeedback]]] = {}
    for row, rcpt in matched:
        groups.setdefault((row["org_id"], row["message_id"]), []).append((row, rcpt))
    assert event.event_type is not None
    for (org_id, message_id), items in groups.items():
        first = items[0][0]
        data: dict[str, Any] = {
            "message_id": message_id, "inbox_id": first["inbox_id"],
            "transport_id": event.transport_id,
            "recipients": [{"address": row["address"], "smtp_code": r.smtp_code,
                            "status_code": r.status_code, "diagnostic": r.diagnostic}
                           for row, r in items]}
        if event.kind == "bounce":
            data.update(bounce_type=event.bounce_type, bounce_subtype=event.bounce_subtype,
                        suppressed=event.suppresses is not None)
        if event.kind == "complaint":
            data["suppressed"] = True
        await mail_store.insert_event(
            txn, org_id=org_id, event_id=new_id("evt"),
            environment_id=first["environment_id"], inbox_id=first["inbox_id"],
            type_=event.event_type, data=data)


class FeedbackReceiver:
    """The SNS endpoint's core: verify, then confirm a subscription or apply feedback."""

    def __init__(self, db: Database, verifier: SNSVerifier, fetcher: GuardedFetcher) -> None:
        self._db = db
        self.verifier = verifier
        self._fetcher = fetcher

    @classmethod
    def from_config(cls, out: OutboundSection, db: Database, *, reactor: Any,
                    clock: IReactorTime) -> FeedbackReceiver:
        """The receiver ``[outbound]``'s sns_* settings describe (the loader vetted them;
        the CA file is read here, once)."""
        fetcher = GuardedFetcher(reactor, trust_root=load_trust_root(out.sns_ca_file),
                                 allow_private=out.sns_allow_private_addresses,
                                 timeout_s=out.sns_fetch_timeout)
        policy = SNSPolicy(frozenset(out.sns_topic_arns),
                           re.compile(out.sns_cert_host_pattern), out.sns_max_age)
        return cls(db, SNSVerifier(policy, CertificateCache(fetcher), clock), fetcher)

    async def receive(self, message: Mapping[str, Any]) -> str:
        """Handle one parsed SNS message; the outcome word, or SNSRejected."""
        await self.verifier.verify(message)
        kind = message["Type"]
        if kind == SUBSCRIPTION_CONFIRMATION:
            return await self._confirm(message)
        if kind != NOTIFICATION:
            log.info("SNS %s for topic %s", kind, message["TopicArn"])
            return "acknowledged"
        sns_id = str(message["MessageId"])[:200]
        event = parse_ses_event(str(message["Message"]))

        async def txn_fn(txn: Txn) -> str:
            if not await store.record_receipt(txn, sns_id, str(message["TopicArn"])):
                return "duplicate"
            if event is None:
                log.info("SNS notification %s is not a SES event we handle", sns_id)
                return "ignored"
            return await apply_event(txn, sns_id, event)

        return await self._db.run_interaction("sns.feedback", txn_fn)

    async def _confirm(self, message: Mapping[str, Any]) -> str:
        """Visit the (verified, allowed) SubscribeURL: that confirms the subscription."""
        url = str(message["SubscribeURL"])
        try:
            await self._fetcher.get(url, MAX_CONFIRM_BYTES)
        except Exception as exc:
            log.warning("SNS subscription to %s not confirmed: %s", message["TopicArn"], exc)
            raise SNSRejected(503, "sns_confirmation_failed",
                              "The subscription could not be confirmed; try later.") from None
        log.info("SNS subscription to %s confirmed", message["TopicArn"])
        return "confirmed"
