-- 0025: the replayable event log's cursor order, webhook endpoints and their delivery
-- queue (issue 13).

-- Cursor order for GET /events, WebSocket resume and anything else that pages the log.
-- An event's ULID (and a plain sequence) is taken *before* its transaction commits, so
-- two writers can commit out of id order and a reader paging by id could step over a
-- row that commits a moment later. Rows are therefore ordered by (txid, seq): the id
-- of the writing transaction, then the insert order within it, and readers only return
-- rows whose txid is below the oldest transaction still running
-- (pg_snapshot_xmin(pg_current_snapshot())). Every transaction that could still add a
-- row has a txid at or above that bound, so nothing can appear behind a cursor later.
-- The price: a long *writing* transaction delays the log (not the live notifications)
-- until it ends. See docs/events.md.
ALTER TABLE events ADD COLUMN seq bigserial;
ALTER TABLE events ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX events_org_order ON events (org_id, txid, seq);

-- Webhook endpoints. The signing secret is sealed (auth/sealing.py); after a rotation
-- the previous one keeps signing next to the new one until previous_expires_at.
CREATE TABLE webhooks (
    org_id                text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    id                    text PRIMARY KEY,
    url                   text NOT NULL,
    description           text,
    event_types           text[] NOT NULL DEFAULT '{}',  -- empty: every type
    inbox_id              text,                         -- NULL: every inbox
    environment_ids       text[],                       -- NULL: every environment
    enabled               boolean NOT NULL DEFAULT true,
    secret_sealed         bytea NOT NULL,
    previous_secret_sealed bytea,
    previous_expires_at   timestamptz,
    consecutive_failures  integer NOT NULL DEFAULT 0,
    disabled_reason       text,
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL,
    UNIQUE (org_id, id)
);
CREATE INDEX webhooks_org_enabled ON webhooks (org_id) WHERE enabled;

-- The delivery queue: one row per (endpoint, event), claimed by any process with
-- FOR UPDATE SKIP LOCKED and a lease (webhooks/worker.py). event_id NULL: a test ping,
-- whose body is kept in payload. No foreign key to events: the log's retention sweep
-- must not take the delivery history with it.
CREATE TABLE webhook_deliveries (
    org_id           text NOT NULL,
    id               text PRIMARY KEY,
    webhook_id       text NOT NULL,
    event_id         text,
    event_type       text NOT NULL,
    payload          jsonb,
    status           text NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempt          integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    lease_until      timestamptz,
    status_code      integer,
    latency_ms       integer,
    error            text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    UNIQUE (webhook_id, event_id),
    FOREIGN KEY (org_id, webhook_id) REFERENCES webhooks (org_id, id) ON DELETE CASCADE
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (org_id, webhook_id, id DESC);
CREATE INDEX webhook_deliveries_created ON webhook_deliveries (created_at);

-- Crockford base32 characters from a random UUID's bytes (volatile: a fresh value per
-- row), so a delivery id is 'whd_' + the event's time + randomness, ULID-shaped.
CREATE FUNCTION webhook_random_chars(n integer) RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT string_agg(substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ',
                             1 + get_byte(r.b, i) % 32, 1), '' ORDER BY i)
    FROM (SELECT uuid_send(gen_random_uuid()) AS b) r, generate_series(0, n - 1) AS i
$$;

-- Fan-out in the event's own transaction: an event and its deliveries commit (or roll
-- back) together, so no process can lose or double one, whichever process wrote it.
CREATE FUNCTION webhook_fanout() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (org_id, id, webhook_id, event_id, event_type,
                                    next_attempt_at, created_at, updated_at)
    SELECT w.org_id,
           'whd_' || substr(NEW.id, 5, 10) || webhook_random_chars(16),
           w.id, NEW.id, NEW.type, NEW.created_at, NEW.created_at, NEW.created_at
    FROM webhooks w
    WHERE w.org_id = NEW.org_id AND w.enabled
      AND (cardinality(w.event_types) = 0 OR NEW.type = ANY (w.event_types))
      AND (w.inbox_id IS NULL OR w.inbox_id = NEW.inbox_id)
      AND (w.environment_ids IS NULL OR NEW.environment_id = ANY (w.environment_ids))
    ON CONFLICT (webhook_id, event_id) DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER events_webhook_fanout AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION webhook_fanout();
