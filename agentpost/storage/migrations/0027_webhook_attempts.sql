-- 0027: one row per webhook delivery attempt (issue 13), so GET .../attempts can show
-- the whole history of a delivery, not only its latest attempt. Written by the worker in
-- the same statement that records the attempt on its delivery (storage/webhooks.py).

-- The attempts' foreign key names the organization too, so an attempt can never hang
-- under another organization's delivery.
ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_org_id_id_key
    UNIQUE (org_id, id);

CREATE TABLE webhook_attempts (
    org_id           text NOT NULL,
    seq              bigserial PRIMARY KEY,          -- order and page cursor
    delivery_id      text NOT NULL,
    webhook_id       text NOT NULL,
    attempt          integer NOT NULL,               -- number within its schedule
    started_at       timestamptz NOT NULL,
    status_code      integer,                        -- NULL: no HTTP answer
    latency_ms       integer NOT NULL,
    error            text CHECK (char_length(error) <= 500),
    response_excerpt text CHECK (char_length(response_excerpt) <= 256),
    next_retry_at    timestamptz,                    -- NULL: this attempt was the last
    FOREIGN KEY (org_id, delivery_id) REFERENCES webhook_deliveries (org_id, id)
        ON DELETE CASCADE
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (org_id, delivery_id, seq DESC);
-- The retention sweep (attempts older than retention.events, even of a delivery that
-- is still kept, e.g. one replayed again and again).
CREATE INDEX webhook_attempts_started ON webhook_attempts (started_at);
