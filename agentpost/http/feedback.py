"""``POST /api/v1/webhooks/ses`` (the path is ``[outbound] sns_path``): SES feedback
delivered by Amazon SNS.

Not behind an API key -- SNS cannot send one -- and not a framework Route: SNS posts
``text/plain`` JSON, and the message's own signature (agentpost.outbound.sns) is the
credential. Answers: 200 ``{"status": …}`` when handled (also for duplicates and for
mail we do not know, so SNS stops retrying), 400 for a malformed message, 403 for one
that is not trusted (signature, topic, age, certificate URL), 503 when a dependency
failed and a retry may succeed; errors in the API's one JSON error shape, never a
traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from klein import Klein
from twisted.internet import defer
from twisted.web.iweb import IRequest

from agentpost.http import errors as http_errors
from agentpost.http.framework import render
from agentpost.http.validation import json_too_deep
from agentpost.model.errors import AgentPostError, TemporaryFailure
from agentpost.outbound.feedback import FeedbackReceiver
from agentpost.outbound.sns import SNSRejected

log = logging.getLogger(__name__)

#: SNS messages are at most 256 KiB; JSON escaping can grow that.
MAX_SNS_BODY_BYTES = 1024 * 1024
_HEADER_TYPE = b"x-amz-sns-message-type"


def _parse(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_SNS_BODY_BYTES:
        raise SNSRejected(413, "payload_too_large", "The body is too large.")
    if json_too_deep(raw):
        raise SNSRejected(400, "invalid_sns_message", "The body nests too deep.")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise SNSRejected(400, "invalid_sns_message", "The body is not JSON.") from None
    if not isinstance(value, dict):
        raise SNSRejected(400, "invalid_sns_message", "The body is not a JSON object.")
    return value


async def handle_sns(request: IRequest, receiver: FeedbackReceiver) -> bytes:
    """One SNS delivery, answered as the module doc says."""
    request_id = getattr(request, "request_id", "req_unknown")
    try:
        raw = request.content.read(MAX_SNS_BODY_BYTES + 1) if request.content else b""
        message = _parse(raw)
        declared = request.getHeader(_HEADER_TYPE)
        if declared is not None and declared.decode("latin-1") != message.get("Type"):
            raise SNSRejected(400, "invalid_sns_message",
                              "x-amz-sns-message-type does not match Type.")
        outcome = await receiver.receive(message)
    except SNSRejected as exc:
        log.info("SNS message refused (%s, %s): %s", exc.status, exc.type, exc.message)
        return render(request, exc.status,
                      http_errors.error_body(exc.type, exc.message, request_id))
    except TemporaryFailure:
        log.warning("SNS message %s: storage unavailable", request_id)
        request.setHeader(b"retry-after", b"5")
        return render(request, 503, http_errors.error_body(
            TemporaryFailure.type, TemporaryFailure.default_message, request_id))
    except AgentPostError as exc:  # e.g. a value PostgreSQL cannot store
        status = http_errors.status_for(exc)
        text = exc.message if status != 500 else AgentPostError.default_message
        return render(request, status, http_errors.error_body(exc.type, text, request_id))
    except Exception:
        log.exception("SNS message %s failed", request_id)
        return render(request, 500, http_errors.error_body(
            "internal_error", "An internal error occurred.", request_id))
    return render(request, 200, {"status": outcome})


def mount_sns_webhook(app: Klein, path: str, receiver: FeedbackReceiver) -> None:
    """Serve ``path`` (absolute, e.g. /api/v1/webhooks/ses) on ``app``."""

    @app.route(path, methods=["POST"], strict_slashes=False, endpoint="sns_feedback")
    def sns_feedback(request: IRequest) -> defer.Deferred[bytes]:
        return defer.Deferred.fromCoroutine(handle_sns(request, receiver))
