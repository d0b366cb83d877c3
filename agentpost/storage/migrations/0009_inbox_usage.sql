-- Storage used by each inbox (the sizes of its messages, copies included), kept up to
-- date by ingest, COPY and deletion in the same transactions, for the optional per-inbox
-- quota ([mail] inbox_quota) and IMAP QUOTA (RFC 9208).
ALTER TABLE inboxes ADD COLUMN used_bytes bigint NOT NULL DEFAULT 0;
UPDATE inboxes i SET used_bytes = COALESCE(
    (SELECT sum(m.size) FROM messages m WHERE m.org_id = i.org_id AND m.inbox_id = i.id), 0);
