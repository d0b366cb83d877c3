"""SES v2 identity calls for the domain flow: create a domain identity (Easy DKIM
tokens), set its custom MAIL FROM, read its verification state, delete it.

The boto3 client is the ses transport's own (same endpoint rules, credentials,
timeouts and ``total_max_attempts=1``: a domain check that fails is simply tried again
on the next round). boto3 blocks, so every call runs in a small thread pool this object
owns, never on the reactor thread.

IAM: ``ses:CreateEmailIdentity``, ``ses:GetEmailIdentity``, ``ses:DeleteEmailIdentity``
and ``ses:PutEmailIdentityMailFromAttributes`` (docs/operations.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from agentpost.model.errors import InvalidRequest, TemporaryFailure

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors that mean the request itself is wrong (a name SES will not take).
_BAD_INPUT = frozenset({"BadRequestException", "InvalidParameterValue"})


@dataclass(frozen=True)
class IdentityState:
    """What SES says about a domain identity."""

    exists: bool
    verified: bool
    dkim_status: str = "NOT_STARTED"
    mail_from_status: str | None = None
    tokens: list[str] = field(default_factory=list)


def state_from(answer: dict[str, Any]) -> IdentityState:
    """Read GetEmailIdentity/CreateEmailIdentity's answer.

    Verified when SES says the identity may send (``VerifiedForSendingStatus``), or its
    Easy DKIM records were found (``DkimAttributes.Status`` SUCCESS), or the identity's
    ``VerificationStatus`` is SUCCESS. The last one matters for moto, which reports
    ``VerifiedForSendingStatus: false`` and DKIM ``NOT_STARTED`` on an identity that can
    already send (see ../shared/notes/aws-local-testing.md)."""
    dkim = answer.get("DkimAttributes") or {}
    dkim_status = str(dkim.get("Status") or "NOT_STARTED")
    verified = (bool(answer.get("VerifiedForSendingStatus")) or dkim_status == "SUCCESS"
                or answer.get("VerificationStatus") == "SUCCESS")
    mail_from = answer.get("MailFromAttributes") or {}
    return IdentityState(True, verified, dkim_status,
                         mail_from.get("MailFromDomainStatus"),
                         [str(t) for t in dkim.get("Tokens") or []])


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class SESIdentities:
    """Domain identities in the SES account the ses transport sends through."""

    def __init__(self, client_factory: Callable[[], Any], reactor: Any,
                 max_threads: int = 2) -> None:
        """``client_factory`` builds the boto3 SESv2 client (called once, in a pool
        thread): the transport's, so both use one configuration."""
        self._client_factory = client_factory
        self._client_obj: Any = None
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name="ses-identity")

    @classmethod
    def for_transport(cls, transport: Any, reactor: Any) -> SESIdentities:
        """Share the ses transport's client (agentpost.outbound.ses.SESTransport)."""
        return cls(transport._client, reactor)  # same configuration, same client

    def start(self) -> None:
        """Start the thread pool."""
        if not self._pool.started:
            self._pool.start()

    def stop(self) -> None:
        """Stop the thread pool (waits for calls in flight)."""
        if self._pool.started:
            self._pool.stop()

    def _client(self) -> Any:
        if self._client_obj is None:
            self._client_obj = self._client_factory()
        return self._client_obj

    async def _call(self, name: str, **kwargs: Any) -> dict[str, Any]:
        self.start()

        def call() -> dict[str, Any]:
            answer: dict[str, Any] = getattr(self._client(), name)(**kwargs)
            return answer

        d: defer.Deferred[dict[str, Any]] = deferToThreadPool(self._reactor, self._pool, call)
        return await d

    @staticmethod
    def _fail(exc: Exception, what: str) -> Exception:
        code = _code(exc)
        log.warning("SES %s failed: %s", what, exc)
        if code in _BAD_INPUT:
            return InvalidRequest(f"SES refused the domain: {code}.", field="name")
        return TemporaryFailure(f"SES could not {what}; try again shortly.")

    async def create(self, domain: str) -> IdentityState:
        """Create the domain identity (Easy DKIM); an identity that exists already is
        read back instead, so a retried create gets the same tokens."""
        try:
            return state_from(await self._call("create_email_identity", EmailIdentity=domain))
        except Exception as exc:
            if _code(exc) != "AlreadyExistsException":
                raise self._fail(exc, "create the domain identity") from exc
        return await self.state(domain)

    async def set_mail_from(self, domain: str, mail_from_domain: str) -> None:
        """Use ``mail_from_domain`` as the envelope sender's domain (SES falls back to
        amazonses.com while its MX record is missing)."""
        try:
            await self._call("put_email_identity_mail_from_attributes", EmailIdentity=domain,
                             MailFromDomain=mail_from_domain,
                             BehaviorOnMxFailure="USE_DEFAULT_VALUE")
        except Exception as exc:
            raise self._fail(exc, "set the MAIL FROM domain") from exc

    async def state(self, domain: str) -> IdentityState:
        """The identity's verification state (``exists=False`` when SES has none)."""
        try:
            return state_from(await self._call("get_email_identity", EmailIdentity=domain))
        except Exception as exc:
            if _code(exc) == "NotFoundException":
                return IdentityState(False, False)
            raise self._fail(exc, "read the domain identity") from exc

    async def delete(self, domain: str) -> None:
        """Remove the identity (gone already is fine)."""
        try:
            await self._call("delete_email_identity", EmailIdentity=domain)
        except Exception as exc:
            if _code(exc) != "NotFoundException":
                raise self._fail(exc, "delete the domain identity") from exc
