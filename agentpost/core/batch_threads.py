"""Threads within a group-commit batch (core.group_commit): a message and its reply that
arrive together must share a thread, as they would one delivery at a time.

The batch's staging finds each copy's thread among the messages already stored, in one
statement, before any copy of the batch is written (storage.message_insert
.prepare_deliveries). A reply whose parent is in the same batch found nothing there and
started a thread of its own: a parent, its reply and a reply to that reply, delivered
within the same few milliseconds (a mailing list, an agent answering itself), became
three threads. This completes the staging's answers with the batch's own earlier
copies, in the order storage.threads.find_thread gives one delivery at a time: a stored
parent, then a parent earlier in the batch, then a stored message that referenced this
one, then one earlier in the batch. Earlier copies count as stored because they are
written first (the batch's order is their delivery order) and their ids are newer than
every stored message's, so a stored match wins each kind, as by id alone.
"""

from __future__ import annotations

from dataclasses import replace

from agentpost.model.ids import new_id
from agentpost.storage.message_insert import DeliveryAnswer, DeliveryProbe

#: (organization, inbox, Message-ID): threads are per inbox.
_Key = tuple[str, str, str]


def link_threads(probes: list[DeliveryProbe],
                 answers: list[DeliveryAnswer]) -> list[DeliveryAnswer]:
    """``answers`` (one per probe, in the batch's order) with the threads copies of the
    same batch give each other. A copy that a later one joins, and that starts a thread,
    gets that thread's id now (``starts_thread``), so both rows name it.

    Linear in the batch: each copy's Message-ID and references go into two maps as it
    is passed (a batch can hold thousands of copies: 16 deliveries of many recipients)."""
    out = list(answers)
    by_id: dict[_Key, int] = {}  # the first copy of each Message-ID
    by_ref: dict[_Key, int] = {}  # the first copy that referred to each Message-ID
    for k, probe in enumerate(probes):
        org, inbox = probe.org_id, probe.inbox_id
        answer = out[k]
        if answer.thread_kind != 0:  # no stored parent
            parent = min((by_id[(org, inbox, ref)] for ref in probe.related
                          if (org, inbox, ref) in by_id), default=None)
            if parent is None and answer.thread_kind is None and probe.message_id:
                parent = by_ref.get((org, inbox, probe.message_id))
            if parent is not None:
                if out[parent].thread_id is None:
                    out[parent] = replace(out[parent], thread_id=new_id("thr"),
                                          starts_thread=True)
                out[k] = replace(answer, thread_id=out[parent].thread_id, thread_kind=None,
                                 starts_thread=False)
        if probe.message_id:
            by_id.setdefault((org, inbox, probe.message_id), k)
        for ref in probe.related:  # as message_refs records it (In-Reply-To too)
            by_ref.setdefault((org, inbox, ref), k)
    return out
