-- 0035: small messages' bytes live in PostgreSQL, with their records.
--
-- A message up to storage.inline_message_max is not written to the blob store: its
-- bytes go into its blob row (key 'db/sha256/..'), in the delivering transaction. One
-- COMMIT makes it durable, instead of a file (or S3 object) write and its fsync before
-- the transaction; the row goes when its last reference does, as the objects of other
-- blobs do. Larger messages and every attachment stay in the blob store (data NULL).
ALTER TABLE blobs ADD COLUMN data bytea;
