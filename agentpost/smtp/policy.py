"""What differs between the SMTP listeners: ONE place, chosen per listener.

The MX and submission share the parser and the state machine; only this policy, and
the delivery agent behind them, differ:

========================  ======================  ====================================
                          MX (25)                 submission (587 STARTTLS, 465 TLS)
========================  ======================  ====================================
AUTH PLAIN/LOGIN          not offered (503)       offered only once TLS is active;
                                                  before TLS: not in EHLO, 538 5.7.11
TLS for MAIL/RCPT/DATA    optional                required: 530 5.7.0 before STARTTLS
AUTH for MAIL             no                      required: 530 5.7.0
Recipients                hosted inboxes only     anyone (the agent queues them; the
                          (RelayDenied 550 5.7.1)  queue's local path keeps hosted ones)
Received:/Return-Path:    both prepended          Received: (with ESMTPSA) only: the
                                                  final delivery adds Return-Path:
250 after DATA            "OK <session id>"       "Ok: queued as <message id>"
========================  ======================  ====================================
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ListenerPolicy:
    """The protocol-level rules of one SMTP listener."""

    name: str  # "mx" or "submission": logs, audit details, SessionInfo.listener
    offers_auth: bool = False  # AUTH PLAIN and LOGIN, never before TLS
    requires_auth: bool = False  # MAIL needs a successful AUTH (530 5.7.0)
    require_tls: bool = False  # MAIL/RCPT/DATA/BDAT need TLS (530 5.7.0)
    return_path: bool = True  # prepend Return-Path: (only a final delivery may)


MX = ListenerPolicy("mx")
SUBMISSION = ListenerPolicy("submission", offers_auth=True, requires_auth=True,
                            require_tls=True, return_path=False)
