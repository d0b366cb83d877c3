-- 0034: finished queue rows leave after retention.outbound_queue (jobs.retention).
--
-- A row is finished once every recipient is done and no DSN is owed; its blob reference
-- was released then. The sweep finds the oldest of them through this partial index
-- (the queue would otherwise keep every message ever sent, with its recipients).
CREATE INDEX outbound_queue_done ON outbound_queue (updated_at)
    WHERE status = 'done' AND NOT bounce_pending;
