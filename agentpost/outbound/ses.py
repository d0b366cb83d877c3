"""The ``ses`` transport: Amazon SES v2 ``SendEmail`` with ``Content.Raw``, through boto3.

How it behaves:

* **Never on the reactor thread.** boto3 blocks, so every call (and building the client,
  which reads botocore's models and may walk the credential chain) runs in a thread pool
  the transport owns; :meth:`SESTransport.start` / :meth:`~SESTransport.stop` bracket
  it (OutboundService calls them).
* **One SES call per attempt.** botocore's own retries are off (``standard`` mode,
  ``total_max_attempts=1``; beware: ``max_attempts`` in a client Config counts
  *retries*, so 1 there means two calls). The queue owns retries, so a message waits in
  PostgreSQL where every process sees it, never in a client library's backoff loop.
* **SES's maximum send rate** is honoured per process with a token bucket on the
  injected clock (recipients per second, as SES counts them); a hand-off waits for
  tokens, it never fails for want of them. With N processes, give each 1/N of the
  account's rate.
* **At most 50 recipients per call** (SES's limit); a larger hand-off is split.
* The raw message goes out as stored, except: a leading ``Return-Path:`` is dropped
  (RFC 5321 §4.4), and a message with 8-bit bytes that are not UTF-8 has those parts
  transfer-encoded first (:mod:`agentpost.outbound.eightbit`); 7-bit and UTF-8
  messages are sent byte for byte.
* The endpoint is AWS's for the region unless configured; environment variables such
  as ``AWS_ENDPOINT_URL_SESV2`` are ignored, so only the (validated) configuration can
  point the transport elsewhere. Certificates are always verified.

Errors are classified by :func:`classify` (the table is :data:`CLIENT_ERRORS` plus the
transport-level cases there); each recipient's ``transport_id`` is the SES MessageId.
A read timeout after SES accepted the message is the one way to send it twice: the
attempt is deferred and repeated (the duplicate window of any relay).

IAM: ``ses:SendEmail`` and ``ses:SendRawEmail`` on the sending identities (and on the
configuration set, if one is configured); see docs/operations.md.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from agentpost.config.sections import OutboundSection
from agentpost.outbound.eightbit import encode_8bit_parts, strip_return_path
from agentpost.outbound.transports import DEFERRED, FAILED, SENT, Envelope, HandOff, Outcome

log = logging.getLogger(__name__)

T = TypeVar("T")

#: SES v2 accepts at most 50 recipients per SendEmail.
MAX_DESTINATIONS = 50
#: SES v2's largest message, measured after base64 (https://docs.aws.amazon.com/ses/latest/dg/quotas.html).
MAX_MESSAGE_BYTES_BASE64 = 40 * 1024 * 1024
#: SES's default maximum send rate is 1/s in the sandbox and 14/s for a new production
#: account; the configuration should say what the account's quota page says.
DEFAULT_MAX_SEND_RATE = 14.0

#: Waits asked of the queue (it waits at least its own schedule's step anyway).
THROTTLE_RETRY_AFTER_S = 60.0
DAILY_QUOTA_RETRY_AFTER_S = 3600.0
OPERATOR_RETRY_AFTER_S = 3600.0
#: How long the send-rate bucket stops issuing tokens after SES throttled us.
THROTTLE_PAUSE_S = 1.0
#: Account-level alarms are logged at ERROR at most this often (WARNING otherwise).
ALARM_INTERVAL_S = 300.0


@dataclass(frozen=True)
class Verdict:
    """How one failed SendEmail call counts for its recipients."""

    status: str  # DEFERRED or FAILED
    smtp_code: int
    status_code: str
    retry_after_s: float | None = None
    operator: bool = False  # the account or its configuration needs a person
    throttled: bool = False


_REJECTED = Verdict(FAILED, 554, "5.7.1")
_MAIL_FROM = Verdict(FAILED, 550, "5.1.8")
_BAD_REQUEST = Verdict(FAILED, 554, "5.6.0")
#: On SendEmail, NotFound almost always means the configured configuration set does not
#: exist: an operator's mistake that would bounce every message, so it waits instead.
_NOT_FOUND = Verdict(DEFERRED, 451, "4.3.5", OPERATOR_RETRY_AFTER_S, operator=True)
_THROTTLED = Verdict(DEFERRED, 451, "4.7.0", THROTTLE_RETRY_AFTER_S, throttled=True)
_PAUSED = Verdict(DEFERRED, 451, "4.3.2", OPERATOR_RETRY_AFTER_S, operator=True)
_UNAUTHORIZED = Verdict(DEFERRED, 451, "4.3.5", OPERATOR_RETRY_AFTER_S, operator=True)
_SERVER = Verdict(DEFERRED, 451, "4.3.0")
_UNKNOWN = Verdict(DEFERRED, 451, "4.0.0")
_NO_ANSWER = Verdict(DEFERRED, 451, "4.4.1")
_BAD_CONNECTION = Verdict(DEFERRED, 451, "4.4.2")

#: Error codes of SendEmail (https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_SendEmail.html),
#: their SES v1 spellings, and the generic AWS ones that can answer any call.
CLIENT_ERRORS: dict[str, Verdict] = {
    # Permanent for this message: bounce it.
    "MessageRejected": _REJECTED,  # content refused, or the sender is not a verified identity
    "MailFromDomainNotVerifiedException": _MAIL_FROM,
    "MailFromDomainNotVerified": _MAIL_FROM,
    "BadRequestException": _BAD_REQUEST,  # malformed input (e.g. an address SES cannot parse)
    "InvalidParameterValue": _BAD_REQUEST,
    # Slow down: later, the queue's schedule (plus a hint).
    "Throttling": _THROTTLED,
    "ThrottlingException": _THROTTLED,
    "TooManyRequestsException": _THROTTLED,
    "LimitExceededException": _THROTTLED,
    # The account cannot send: keep the mail queued, wait long, tell the operator.
    "NotFoundException": _NOT_FOUND,  # e.g. the configuration set does not exist
    "ConfigurationSetDoesNotExist": _NOT_FOUND,
    "AccountSuspendedException": _PAUSED,
    "SendingPausedException": _PAUSED,
    "AccountSendingPausedException": _PAUSED,
    "ConfigurationSetSendingPausedException": _PAUSED,
    "AccessDeniedException": _UNAUTHORIZED,
    "AccessDenied": _UNAUTHORIZED,
    "UnrecognizedClientException": _UNAUTHORIZED,
    "InvalidClientTokenId": _UNAUTHORIZED,
    "InvalidSignatureException": _UNAUTHORIZED,
    "SignatureDoesNotMatch": _UNAUTHORIZED,
    "IncompleteSignature": _UNAUTHORIZED,
    "MissingAuthenticationToken": _UNAUTHORIZED,
    "ExpiredToken": _UNAUTHORIZED,
    "ExpiredTokenException": _UNAUTHORIZED,
    # SES's own trouble.
    "InternalFailure": _SERVER,
    "InternalServerError": _SERVER,
    "ServiceUnavailable": _SERVER,
    "ServiceUnavailableException": _SERVER,
}


def classify_client_error(code: str, http_status: int, message: str) -> Verdict:
    """The verdict for an error answer of SES: by error code, then by HTTP status
    (429 and 5xx are temporary). An unknown 4xx is deferred, not bounced: a guess must
    not lose mail, and the queue bounces it when the message's lifetime is over."""
    verdict = CLIENT_ERRORS.get(code)
    if verdict is None:
        if http_status == 429:
            verdict = _THROTTLED
        elif http_status >= 500:
            verdict = _SERVER
        elif http_status in (401, 403):
            verdict = _UNAUTHORIZED
        else:
            verdict = _UNKNOWN
    if verdict.throttled and "daily message quota" in message.lower():
        # The 24-hour quota also surfaces as Throttling; retrying in a minute is pointless.
        return Verdict(DEFERRED, 451, "4.7.0", DAILY_QUOTA_RETRY_AFTER_S, operator=True,
                       throttled=True)
    return verdict


def classify(exc: BaseException) -> Verdict | None:
    """The verdict for an exception of a SendEmail call; None when it is not one of
    boto3's (a bug: the queue worker logs it and defers the message)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return classify_client_error(str(error.get("Code", "")), status,
                                     str(error.get("Message", "")))
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | NoRegionError):
        return _UNAUTHORIZED
    if isinstance(exc, ConnectionError):  # connect timeout, refused, DNS, proxy
        return _NO_ANSWER
    if isinstance(exc, HTTPClientError):  # read timeout, connection closed mid-answer
        return _BAD_CONNECTION
    if isinstance(exc, BotoCoreError):  # an unparseable answer and the like
        return _SERVER
    if isinstance(exc, OSError):
        return _BAD_CONNECTION
    return None


def _describe(exc: BaseException) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"SES {error.get('Code', '?')}: {error.get('Message', '')}".strip()
    return f"SES unreachable: {type(exc).__name__}: {exc}"


def prepare_raw(raw: bytes) -> bytes:
    """What SES gets: the stored message without a leading Return-Path, with parts
    holding non-UTF-8 8-bit bytes transfer-encoded (7-bit and UTF-8 pass unchanged)."""
    return encode_8bit_parts(strip_return_path(raw))


def base64_size(size: int) -> int:
    """Bytes of ``size`` bytes once base64-encoded (how SES measures a message)."""
    return 4 * math.ceil(size / 3)


class SendRateLimiter:
    """A token bucket of ``rate`` tokens a second holding at most ``burst`` (default:
    one second's worth), on the injected clock. :meth:`take` reserves tokens in arrival
    order and waits until they have accrued; a request for more than the burst runs the
    bucket into debt, so the long-run rate holds whatever the request sizes."""

    def __init__(self, rate: float, clock: IReactorTime, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._clock = clock
        self._capacity = burst if burst is not None else max(1.0, rate)
        self._tokens = self._capacity
        self._stamp = clock.seconds()

    def _refill(self) -> None:
        now = self._clock.seconds()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def reserve(self, count: float) -> float:
        """Take ``count`` tokens now; returns how long the caller must wait for them."""
        self._refill()
        self._tokens -= count
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def pause(self, seconds: float) -> None:
        """Issue nothing for ``seconds`` (SES said we are too fast)."""
        self._refill()
        self._tokens = min(self._tokens, -seconds * self.rate)

    async def take(self, count: float) -> None:
        """Wait (on the clock) until ``count`` tokens are ours."""
        wait = self.reserve(count)
        if wait > 0:
            await task.deferLater(self._clock, wait, lambda: None)


class SESTransport:
    """Hands messages to Amazon SES (see the module doc)."""

    name = "ses"

    def __init__(self, *, region: str, clock: IReactorTime, reactor: Any,
                 endpoint_url: str | None = None, configuration_set: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 max_send_rate: float = DEFAULT_MAX_SEND_RATE,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0,
                 max_threads: int = 8,
                 client_factory: Callable[[], Any] | None = None) -> None:
        """``client_factory`` replaces the boto3 client (tests); it is called once, in a
        pool thread. ``access_key_id``/``secret_access_key``: both, or neither for
        boto3's default credential chain (environment, shared files, instance role)."""
        if bool(access_key_id) != bool(secret_access_key):
            raise ValueError("give both access_key_id and secret_access_key, or neither")
        if endpoint_url and urlsplit(endpoint_url).scheme not in ("https", "http"):
            raise ValueError("endpoint_url must be an http(s) URL")
        self.region = region
        self.endpoint_url = endpoint_url or None
        self.configuration_set = configuration_set or None
        self._credentials = (access_key_id or None, secret_access_key or None)
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._max_threads = max_threads
        self._clock = clock
        self._reactor = reactor
        self._client_factory = client_factory or self._boto3_client
        self._client_obj: Any = None
        self._client_lock = threading.Lock()
        self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name="ses")
        self.limiter = SendRateLimiter(max_send_rate, clock)
        self._last_alarm: float | None = None

    @classmethod
    def from_config(cls, out: OutboundSection, *, clock: IReactorTime,
                    reactor: Any) -> SESTransport:
        """The transport ``[outbound]`` describes (check_config has vetted it)."""
        return cls(region=out.ses_region, clock=clock, reactor=reactor,
                   endpoint_url=out.ses_endpoint or None,
                   configuration_set=out.ses_configuration_set or None,
                   access_key_id=out.ses_access_key_id or None,
                   secret_access_key=out.ses_secret_access_key or None,
                   max_send_rate=out.ses_max_send_rate,
                   connect_timeout_s=out.ses_connect_timeout,
                   read_timeout_s=out.ses_read_timeout, max_threads=out.concurrency)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the thread pool (calls made before this wait for it)."""
        if not self._pool.started:
            self._pool.start()

    def stop(self) -> None:
        """Stop the thread pool; call after the queue worker stopped (it waits for calls
        in flight, which the worker has already awaited)."""
        if self._pool.started:
            self._pool.stop()

    # ------------------------------------------------------------------ plumbing

    def _boto3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        connect_timeout_s, read_timeout_s = self._timeouts
        access_key, secret_key = self._credentials
        session = boto3.session.Session(aws_access_key_id=access_key,
                                        aws_secret_access_key=secret_key,
                                        region_name=self.region)
        config = Config(region_name=self.region,
                        # total_max_attempts, not max_attempts: botocore reads a
                        # client config's max_attempts as *retries* (1 would mean 2 calls).
                        retries={"total_max_attempts": 1, "mode": "standard"},
                        connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
                        max_pool_connections=max(10, self._max_threads),
                        ignore_configured_endpoint_urls=True)
        return session.client("sesv2", endpoint_url=self.endpoint_url, config=config,
                              verify=True)

    def _client(self) -> Any:
        with self._client_lock:
            if self._client_obj is None:
                self._client_obj = self._client_factory()
            return self._client_obj

    def _run(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def _send_sync(self, mail_from: str, recipients: Sequence[str], data: bytes) -> str:
        request: dict[str, Any] = {"Destination": {"ToAddresses": list(recipients)},
                                   "Content": {"Raw": {"Data": data}}}
        if mail_from:
            request["FromEmailAddress"] = mail_from
        if self.configuration_set:
            request["ConfigurationSetName"] = self.configuration_set
        answer = self._client().send_email(**request)
        return str(answer["MessageId"])

    def _alarm(self, envelope: Envelope, verdict: Verdict, text: str) -> None:
        now = self._clock.seconds()
        loud = self._last_alarm is None or now - self._last_alarm >= ALARM_INTERVAL_S
        if loud:
            self._last_alarm = now
        log.log(logging.ERROR if loud else logging.WARNING,
                "outbound %s: SES cannot send for this account (%s): an operator must act; "
                "mail stays queued and is retried in %.0f s", envelope.queue_id, text,
                verdict.retry_after_s or 0.0)

    # ------------------------------------------------------------------ the hand-off

    async def send(self, envelope: Envelope, raw: bytes) -> HandOff:
        """Send ``raw`` to the envelope's recipients, at most 50 per SendEmail call."""
        data = await self._run(prepare_raw, raw)
        if base64_size(len(data)) > MAX_MESSAGE_BYTES_BASE64:
            return HandOff([Outcome(r, FAILED, 552, "5.3.4",
                                    "message too big for SES (40 MB after base64)")
                            for r in envelope.recipients])
        outcomes: list[Outcome] = []
        retry_after: float | None = None
        errors: list[str] = []
        recipients = list(envelope.recipients)
        for start in range(0, len(recipients), MAX_DESTINATIONS):
            chunk = recipients[start:start + MAX_DESTINATIONS]
            if retry_after is not None:  # SES is unwell: don't call it again for now
                outcomes += [Outcome(r, DEFERRED, 451, "4.4.0",
                                     "not attempted: SES deferred an earlier batch")
                             for r in chunk]
                continue
            await self.limiter.take(len(chunk))
            try:
                message_id = await self._run(self._send_sync, envelope.mail_from, chunk, data)
            except Exception as exc:
                verdict = classify(exc)
                if verdict is None:
                    raise
                text = _describe(exc)
                errors.append(text)
                if verdict.throttled:
                    self.limiter.pause(THROTTLE_PAUSE_S)
                if verdict.operator:
                    self._alarm(envelope, verdict, text)
                else:
                    log.info("outbound %s: %s (%s %s)", envelope.queue_id, text,
                             verdict.smtp_code, verdict.status_code)
                if verdict.status == DEFERRED:
                    retry_after = verdict.retry_after_s or 0.0
                outcomes += [Outcome(r, verdict.status, verdict.smtp_code,
                                     verdict.status_code, text) for r in chunk]
                continue
            outcomes += [Outcome(r, SENT, 250, "2.0.0", f"accepted by SES as {message_id}",
                                 message_id) for r in chunk]
        return HandOff(outcomes, retry_after or None, errors)
