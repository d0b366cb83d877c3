-- 0022: send rate limits and daily quotas (issue 11), shared by every process of every
-- node. One row per organization and one per (organization, inbox) that has sent: a
-- token bucket refilled lazily by the time elapsed since the last charge (computed in
-- the charging UPDATE itself, so there is no timer and no read-modify-write race), and
-- the count of messages of the current UTC day (reset by the first charge of a new
-- day). A row is charged as the last statement of the transaction that stores and
-- queues a message, so a refused or failed send consumes nothing.
--
-- A message counts once per envelope recipient (as SES counts its quota). Rows are
-- tiny and never multiply: the daily counter lives in the bucket's own row.
CREATE TABLE send_limits_org (
    org_id       text PRIMARY KEY REFERENCES organizations (id) ON DELETE CASCADE,
    tokens       double precision NOT NULL,   -- what is left after the last charge
    refilled_at  timestamptz NOT NULL,        -- when tokens was last brought up to date
    day          date NOT NULL,               -- the UTC day day_count counts
    day_count    bigint NOT NULL
);

CREATE TABLE send_limits_inbox (
    org_id       text NOT NULL,
    inbox_id     text NOT NULL,
    tokens       double precision NOT NULL,
    refilled_at  timestamptz NOT NULL,
    day          date NOT NULL,
    day_count    bigint NOT NULL,
    PRIMARY KEY (org_id, inbox_id),
    FOREIGN KEY (org_id, inbox_id) REFERENCES inboxes (org_id, id) ON DELETE CASCADE
);
