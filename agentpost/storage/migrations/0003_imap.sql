-- IMAP: pre-rendered ENVELOPE/BODYSTRUCTURE (computed once at ingest, so a FETCH of
-- thousands of envelopes reads one column instead of parsing every message), and
-- indexes for the per-folder views IMAP sessions keep.
ALTER TABLE messages
    ADD COLUMN imap_envelope       text,
    ADD COLUMN imap_bodystructure  text,
    ADD COLUMN imap_body           text;

CREATE INDEX messages_folder_uid ON messages (folder_id, uid);
CREATE INDEX messages_folder_modseq ON messages (folder_id, modseq);
