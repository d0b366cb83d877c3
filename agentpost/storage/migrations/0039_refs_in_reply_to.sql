-- A message's In-Reply-To is one of the Message-IDs it refers to, as its References
-- are: record it in message_refs too (storage.message_insert.message_refs), so that a
-- parent arriving after a reply that names it only in In-Reply-To finds that reply's
-- thread (storage.threads' children lookup), one delivery at a time and in a batch.
-- Rows written before this migration get theirs here (once: a row already there is
-- not added again).
INSERT INTO message_refs (org_id, inbox_id, ref, message_id)
    SELECT m.org_id, m.inbox_id, m.in_reply_to, m.id FROM messages m
    WHERE m.in_reply_to IS NOT NULL AND NOT (m.in_reply_to = ANY (m.reference_ids))
      AND NOT EXISTS (SELECT 1 FROM message_refs r WHERE r.org_id = m.org_id
                      AND r.message_id = m.id AND r.ref = m.in_reply_to);
