-- Threading runs two lookups per delivery: "which of these Message-IDs are in the inbox"
-- (parents) and "which messages of the inbox referenced this Message-ID" (children that
-- arrived first). Both must be index probes whatever the planner's statistics say: with
-- stale ones (a young, fast-growing inbox) it walked messages_inbox_id over the whole
-- inbox, because (org_id, inbox_id) looked as selective as anything else.
--
-- Parents: the Message-ID index now leads with the same two columns, so it always
-- matches strictly more of the query than messages_inbox_id does.
DROP INDEX messages_msgid;
CREATE INDEX messages_msgid ON messages (org_id, inbox_id, message_id_header);

-- Children: one row per (message, referenced Message-ID), found by a btree equality on
-- (org_id, inbox_id, ref) instead of array containment over a global GIN index.
CREATE TABLE message_refs (
    org_id      text NOT NULL,
    inbox_id    text NOT NULL,
    ref         text NOT NULL,
    message_id  text NOT NULL,
    FOREIGN KEY (org_id, message_id) REFERENCES messages (org_id, id) ON DELETE CASCADE
);
CREATE INDEX message_refs_lookup ON message_refs (org_id, inbox_id, ref, message_id);
CREATE INDEX message_refs_message ON message_refs (org_id, message_id);
INSERT INTO message_refs (org_id, inbox_id, ref, message_id)
    SELECT DISTINCT org_id, inbox_id, r, id FROM messages, unnest(reference_ids) AS r;
DROP INDEX messages_references;
