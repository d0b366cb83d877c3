"""A test-owned stand-in for Amazon SNS's side of an HTTPS subscription.

moto cannot test inbound verification (its certificate URL is on AWS, its Subject
signatures are wrong, it never sends a SubscriptionConfirmation; see
../shared/notes/aws-local-testing.md §5.4), so the tests bring their own:

* :class:`TestPKI` -- a per-session test CA; a TLS certificate for 127.0.0.1 and
  localhost issued by it; an SNS *signing* certificate (CN sns.amazonaws.com) issued by
  it; a rogue self-signed one and an expired one for negative cases;
* :class:`CertHost` -- an HTTPS server in the test's reactor on 127.0.0.1:0 serving the
  PEMs at ``/SimpleNotificationService-<hex>.pem`` and a SubscribeURL, recording every
  hit (so a test can see the certificate cache work and a subscription confirmed);
* :class:`SNSSigner` -- builds Notification / SubscriptionConfirmation /
  UnsubscribeConfirmation messages and signs them as SNS does (PKCS#1 v1.5 with SHA1
  for SignatureVersion "1", SHA256 for "2", over the canonical string);
* :func:`post` -- POSTs a message like SNS: ``text/plain`` and the x-amz-sns-* headers.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.web import resource, server

TOPIC = "arn:aws:sns:us-east-1:123456789012:agentpost-ses-feedback"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject_cn: str, key: rsa.RSAPrivateKey, issuer: x509.Certificate | None,
          issuer_key: rsa.RSAPrivateKey, *, ca: bool = False, sans: list[Any] | None = None,
          days: tuple[int, int] = (-1, 365)) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer.subject if issuer is not None else name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now + dt.timedelta(days=days[0]))
               .not_valid_after(now + dt.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class TestPKI:
    """Every key and certificate the SNS tests need (made once per session)."""

    __test__ = False  # not a test class, whatever its name says

    folder: Path
    ca_key: rsa.RSAPrivateKey = field(default_factory=_key)
    signing_key: rsa.RSAPrivateKey = field(default_factory=_key)
    rogue_key: rsa.RSAPrivateKey = field(default_factory=_key)
    tls_key: rsa.RSAPrivateKey = field(default_factory=_key)

    def __post_init__(self) -> None:
        self.ca = _cert("AgentPost Test SNS CA", self.ca_key, None, self.ca_key, ca=True)
        self.tls = _cert("localhost", self.tls_key, self.ca, self.ca_key, sans=[
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        self.signing = _cert("sns.amazonaws.com", self.signing_key, self.ca, self.ca_key)
        self.rogue = _cert("sns.amazonaws.com", self.rogue_key, None, self.rogue_key)
        # A TLS certificate for 127.0.0.1 that no configured CA vouches for.
        self.rogue_tls = _cert("localhost", self.rogue_key, None, self.rogue_key, sans=[
            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        self.expired = _cert("sns.amazonaws.com", self.signing_key, self.ca, self.ca_key,
                             days=(-30, -1))
        self.ca_file = self.folder / "sns-test-ca.pem"
        self.ca_file.write_bytes(_pem(self.ca))


class _Files(resource.Resource):
    isLeaf = True

    def __init__(self, host: CertHost) -> None:
        super().__init__()
        self._host = host

    def render_GET(self, request: Any) -> bytes:
        path = request.path.decode("ascii", "replace")
        self._host.hits.append(path)
        status, body, headers = self._host.files.get(path, (404, b"not found", {}))
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


class CertHost:
    """An HTTPS server (TLS certificate from the test CA) on 127.0.0.1:0."""

    def __init__(self, pki: TestPKI, reactor: Any, *, untrusted_tls: bool = False) -> None:
        self.pki = pki
        self.files: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self.hits: list[str] = []
        cert, key = (pki.rogue_tls, pki.rogue_key) if untrusted_tls else (pki.tls, pki.tls_key)
        options = ssl.PrivateCertificate.loadPEM(_pem(cert) + _key_pem(key)).options()
        self.port = reactor.listenSSL(0, server.Site(_Files(self)), options,
                                      interface="127.0.0.1")
        self.origin = f"https://127.0.0.1:{self.port.getHost().port}"

    def serve(self, path: str, body: bytes, status: int = 200,
              headers: dict[str, str] | None = None) -> str:
        """Serve ``body`` at ``path``; returns its https URL."""
        self.files[path] = (status, body, headers or {})
        return self.origin + path

    def serve_cert(self, cert: x509.Certificate) -> str:
        """A certificate at a fresh SNS-style path."""
        return self.serve(f"/SimpleNotificationService-{secrets.token_hex(16)}.pem", _pem(cert))

    def hits_of(self, url_or_path: str) -> int:
        path = url_or_path.removeprefix(self.origin).split("?", 1)[0]
        return self.hits.count(path)

    async def stop(self) -> None:
        await self.port.stopListening()


def string_to_sign(message: dict[str, Any]) -> bytes:
    """AWS's canonical string, written independently of the app's code."""
    if message["Type"] == "Notification":
        names = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        names = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn",
                 "Type"]
    return "".join(f"{n}\n{message[n]}\n" for n in names if n in message).encode("utf-8")


def sns_time(when: dt.datetime | None = None) -> str:
    when = when or dt.datetime.now(dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


class SNSSigner:
    """Builds and signs SNS messages with the test signing key."""

    def __init__(self, pki: TestPKI, cert_url: str, topic: str = TOPIC) -> None:
        self.pki = pki
        self.cert_url = cert_url
        self.topic = topic

    def sign(self, message: dict[str, Any], version: str = "2",
             key: rsa.RSAPrivateKey | None = None) -> dict[str, Any]:
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()  # noqa: S303 - SNS v1
        signature = (key or self.pki.signing_key).sign(string_to_sign(message),
                                                        padding.PKCS1v15(), algorithm)
        message["SignatureVersion"] = version
        message["Signature"] = base64.b64encode(signature).decode("ascii")
        return message

    def notification(self, body: Any, *, subject: str | None = None, version: str = "2",
                     timestamp: str | None = None, topic: str | None = None,
                     cert_url: str | None = None, message_id: str | None = None,
                     key: rsa.RSAPrivateKey | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {
            "Type": "Notification", "MessageId": message_id or str(uuid.uuid4()),
            "TopicArn": topic or self.topic,
            "Message": body if isinstance(body, str) else json.dumps(body),
            "Timestamp": timestamp or sns_time(),
            "SigningCertURL": cert_url or self.cert_url,
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe"}
        if subject is not None:
            message["Subject"] = subject
        return self.sign(message, version, key)

    def confirmation(self, subscribe_url: str, *, kind: str = "SubscriptionConfirmation",
                     version: str = "2", topic: str | None = None) -> dict[str, Any]:
        message = {
            "Type": kind, "MessageId": str(uuid.uuid4()), "Token": secrets.token_hex(32),
            "TopicArn": topic or self.topic,
            "Message": f"You have chosen to subscribe to the topic {topic or self.topic}.\n"
                       "To confirm the subscription, visit the SubscribeURL included in "
                       "this message.",
            "SubscribeURL": subscribe_url, "Timestamp": sns_time(),
            "SigningCertURL": self.cert_url}
        return self.sign(message, version)


async def post(url: str, message: dict[str, Any], *, raw: bytes | None = None,
               header_type: str | None = None) -> tuple[int, Any]:
    """POST like SNS; returns (status, parsed JSON body)."""
    headers = {"Content-Type": ["text/plain; charset=UTF-8"],
               "x-amz-sns-message-type": [header_type or str(message.get("Type", ""))],
               "x-amz-sns-message-id": [str(message.get("MessageId", ""))],
               "x-amz-sns-topic-arn": [str(message.get("TopicArn", ""))],
               "User-Agent": ["Amazon Simple Notification Service Agent"]}
    data = raw if raw is not None else json.dumps(message).encode("utf-8")
    response = await treq.post(url, data=data, headers=headers)
    body = await response.content()
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = body
    return response.code, parsed


def ses_event(kind: str, ses_message_id: str, recipients: list[str], *,
              bounce_type: str = "Permanent", form: str = "eventType",
              status: str = "5.1.1") -> dict[str, Any]:
    """A SES event as configuration-set publishing (``eventType``) or identity
    notifications (``notificationType``) send it."""
    now = sns_time()
    mail = {"timestamp": now, "source": "sender@agents.test", "messageId": ses_message_id,
            "destination": recipients, "headersTruncated": False,
            "headers": [{"name": "Subject", "value": "private subject"}],
            "commonHeaders": {"subject": "private subject"}}
    event: dict[str, Any] = {form: kind, "mail": mail}
    if kind == "Bounce":
        event["bounce"] = {
            "bounceType": bounce_type,
            "bounceSubType": "General" if bounce_type == "Permanent" else "MailboxFull",
            "bouncedRecipients": [{"emailAddress": r, "action": "failed", "status": status,
                                   "diagnosticCode": f"smtp; 550 {status} user unknown"}
                                  for r in recipients],
            "timestamp": now, "feedbackId": "fb-" + secrets.token_hex(8),
            "reportingMTA": "dsn; a1-2.smtp-out.amazonses.com"}
    elif kind == "Complaint":
        event["complaint"] = {"complainedRecipients": [{"emailAddress": r}
                                                       for r in recipients],
                              "timestamp": now, "feedbackId": "fb-" + secrets.token_hex(8),
                              "complaintFeedbackType": "abuse"}
    elif kind == "Delivery":
        event["delivery"] = {"timestamp": now, "processingTimeMillis": 546,
                             "recipients": recipients,
                             "smtpResponse": "250 2.6.0 Message received",
                             "reportingMTA": "a8-70.smtp-out.amazonses.com"}
    elif kind == "Reject":
        event["reject"] = {"reason": "Bad content"}
    elif kind == "DeliveryDelay":
        event["deliveryDelay"] = {"timestamp": now, "delayType": "TransientCommunicationFailure",
                                  "expirationTime": now,
                                  "delayedRecipients": [{"emailAddress": r, "status": "4.4.1",
                                                         "diagnosticCode": "smtp; 421 4.4.1 "
                                                         "try later"} for r in recipients]}
    elif kind == "Send":
        event["send"] = {}
    return event
