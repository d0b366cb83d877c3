-- 0017: a queue row's raw_blob_key is a counted reference (blobs.refcount), not a
-- foreign key. With the key constraint, the last release of a blob (the Sent copy
-- deleted before the queue finished) could not delete the blob row while the finished
-- queue row still named it, and recording the outcome failed. The count already keeps
-- the bytes alive for as long as the row needs them.
ALTER TABLE outbound_queue DROP CONSTRAINT outbound_queue_raw_blob_key_fkey;
