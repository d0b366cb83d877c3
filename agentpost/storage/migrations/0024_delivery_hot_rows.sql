-- 0024: deliveries to one inbox no longer serialise on its row (issue 12).
--
-- Every delivery used to run `UPDATE inboxes SET used_bytes = used_bytes + size`
-- inside its transaction, so concurrent deliveries to one inbox queued on that row
-- until each COMMIT and its fsync. Now a delivery (and an expunge, with a negative
-- amount) appends its change here; agentpost.jobs.usage_fold folds the rows into
-- inboxes.used_bytes on a timer. The exact use of an inbox is always
--     used_bytes + COALESCE(SUM(bytes of its rows here), 0)
-- (agentpost.storage.usage), which the API, IMAP QUOTA and the quota checks read.
CREATE TABLE inbox_usage_deltas (
    org_id      text NOT NULL,
    inbox_id    text NOT NULL,
    id          bigserial NOT NULL,
    bytes       bigint NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY (org_id, inbox_id) REFERENCES inboxes (org_id, id) ON DELETE CASCADE
);
CREATE INDEX inbox_usage_deltas_inbox ON inbox_usage_deltas (org_id, inbox_id);
