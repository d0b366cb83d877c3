-- 0015: the outbound queue (issue 11). Every process of every node drains it; rows are
-- claimed with FOR UPDATE SKIP LOCKED and a lease, so a message is handed to a transport
-- by one process at a time, and a process that dies mid-hand-off only delays it until
-- the lease runs out (then it is handed off again: the one window where a recipient may
-- get it twice).
--
-- One queue row per (message, recipient domain): recipients of one domain travel in one
-- hand-off (one SES call, one SMTP transaction). Each recipient keeps its own status.
-- The row holds a reference on the raw message's blob (blobs.refcount) until it is done,
-- so deleting the Sent copy cannot pull the bytes out from under the queue.
CREATE TABLE outbound_queue (
    org_id           text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    id               text PRIMARY KEY,
    environment_id   text NOT NULL,
    inbox_id         text NOT NULL,
    message_id       text NOT NULL,           -- the Sent copy's id (it may be deleted)
    raw_blob_key     text NOT NULL REFERENCES blobs (key),
    size             bigint NOT NULL,
    mail_from        text NOT NULL,           -- the envelope sender ('' for a DSN)
    domain           text NOT NULL,           -- the recipients' domain
    status           text NOT NULL CHECK (status IN
                         ('queued', 'sending', 'deferred', 'done')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    lease_until      timestamptz,
    leased_by        text,
    expires_at       timestamptz NOT NULL,    -- give up (bounce) after this
    bounce_pending   boolean NOT NULL DEFAULT false,  -- a DSN is still to be delivered
    last_error       text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);
-- The work list: due rows and expired leases, oldest first.
CREATE INDEX outbound_queue_due ON outbound_queue (next_attempt_at)
    WHERE status IN ('queued', 'deferred');
CREATE INDEX outbound_queue_leased ON outbound_queue (lease_until) WHERE status = 'sending';
CREATE INDEX outbound_queue_bounce ON outbound_queue (updated_at) WHERE bounce_pending;
CREATE INDEX outbound_queue_message ON outbound_queue (org_id, message_id);

CREATE TABLE outbound_recipients (
    org_id        text NOT NULL,
    queue_id      text NOT NULL REFERENCES outbound_queue (id) ON DELETE CASCADE,
    address       text NOT NULL,
    status        text NOT NULL CHECK (status IN
                      ('queued', 'sending', 'sent', 'deferred', 'bounced', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    smtp_code     integer,
    status_code   text,                       -- enhanced status code, e.g. 5.1.1
    diagnostic    text,
    transport_id  text,                       -- e.g. the SES MessageId
    updated_at    timestamptz NOT NULL,
    PRIMARY KEY (queue_id, address)
);
CREATE INDEX outbound_recipients_org ON outbound_recipients (org_id, queue_id);
