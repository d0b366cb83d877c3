-- 0032: plans that stay on an index for IMAP's per-command reads (issue 10).
--
-- EXPUNGE and CLOSE first read the UIDs flagged \Deleted (storage.imap.deleted_uids)
-- and then lock them; both scanned every message of the folder for the few that carry
-- the flag. Only flagged rows enter this index, so it is small and costs a write only
-- when a message is flagged \Deleted (an update that already rewrites every index of
-- the row, since it moves the row's MODSEQ).
CREATE INDEX IF NOT EXISTS messages_folder_deleted ON messages (folder_id, uid) WHERE deleted;

-- Usage deltas are appended by every delivery and deleted by the fold every few
-- seconds (storage.usage): a queue table. Left to the default thresholds, its dead rows
-- waited up to a minute (autovacuum's naptime) and every quota check summing the
-- pending deltas of an inbox read them all. The fold now vacuums it itself
-- (jobs.usage_fold); autovacuum stays as the fallback, told that any churn matters.
ALTER TABLE inbox_usage_deltas SET (autovacuum_vacuum_scale_factor = 0,
                                    autovacuum_vacuum_threshold = 1000);
