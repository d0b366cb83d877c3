-- IMAP: where each MIME entity's header and body sit inside the raw message (JSON written
-- once at ingest by agentpost.mail.imapformat.section_map). With it, FETCH BODY[section]
-- streams a byte range of the stored blob instead of loading the message. NULL (older
-- rows, or a message the renderer could not map) falls back to reading the raw bytes.
ALTER TABLE messages ADD COLUMN imap_sections text;
