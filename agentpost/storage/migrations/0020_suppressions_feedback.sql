-- 0020: delivery feedback (SES events through SNS) and the suppression list (issue 11).
--
-- A recipient's hand-off state (outbound_recipients.status: queued ... sent, bounced)
-- belongs to the queue, which reads it to decide what is left to try. What happened
-- after the hand-off (SES's Delivery, Bounce, Complaint, Reject, DeliveryDelay) is kept
-- apart in delivery_status, so feedback can never make the queue send a message again.
ALTER TABLE outbound_recipients
    ADD COLUMN delivery_status text CHECK (delivery_status IN
        ('delayed', 'delivered', 'rejected', 'bounced', 'complained')),
    ADD COLUMN delivery_updated_at timestamptz;
-- Feedback names the SES MessageId; it is the only way back to the recipient rows.
CREATE INDEX outbound_recipients_transport_id ON outbound_recipients (transport_id)
    WHERE transport_id IS NOT NULL;

-- One row per (feedback notification, recipient). `feedback` holds the SES event's own
-- part (bounce / complaint / delivery ...), never the message's headers. Swept after
-- retention.delivery_events.
CREATE TABLE delivery_events (
    org_id          text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    id              text PRIMARY KEY,
    environment_id  text NOT NULL,
    queue_id        text NOT NULL,
    message_id      text NOT NULL,            -- the Sent copy's id (msg_...)
    recipient       text NOT NULL,
    type            text NOT NULL CHECK (type IN
                        ('send', 'delivery', 'bounce', 'complaint', 'reject',
                         'delivery_delay')),
    bounce_type     text,                     -- Permanent / Transient / Undetermined
    bounce_subtype  text,
    smtp_code       integer,
    status_code     text,                     -- enhanced status code, e.g. 5.1.1
    diagnostic      text,
    transport_id    text,                     -- the SES MessageId
    sns_message_id  text NOT NULL,
    feedback        jsonb NOT NULL,
    occurred_at     timestamptz,              -- when SES says it happened
    created_at      timestamptz NOT NULL
);
CREATE INDEX delivery_events_message ON delivery_events (org_id, message_id, recipient);
CREATE INDEX delivery_events_created ON delivery_events (created_at);

-- SNS delivers at least once: a MessageId seen before is answered 200 and not applied
-- again. Installation-level (a notification is matched to its organization only after
-- this check). Swept with delivery_events.
CREATE TABLE sns_receipts (
    sns_message_id  text PRIMARY KEY,
    topic_arn       text NOT NULL,
    received_at     timestamptz NOT NULL
);
CREATE INDEX sns_receipts_received ON sns_receipts (received_at);

-- The suppression list: one row per (organization, address). Addresses are stored
-- lowercased, local part included (core.suppressions.normalize_address).
CREATE TABLE suppressions (
    org_id             text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    id                 text NOT NULL UNIQUE,
    email              text NOT NULL CHECK (email = lower(email)),
    reason             text NOT NULL CHECK (reason IN
                           ('bounce', 'complaint', 'manual', 'queue_bounce')),
    environment_id     text,                  -- where the failed mail came from (NULL: manual)
    source_message_id  text,
    diagnostic         text,
    created_at         timestamptz NOT NULL,
    PRIMARY KEY (org_id, email)
);
CREATE INDEX suppressions_list ON suppressions (org_id, id);

-- A prefixed ULID made in SQL (same layout as agentpost.model.ids.new_id: 48 bits of
-- milliseconds, then 80 random bits, Crockford base32), for rows a trigger writes.
CREATE FUNCTION agentpost_ulid(prefix text, at timestamptz) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    alphabet constant text := '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    ms bigint := floor(extract(epoch FROM at) * 1000);
    out text := '';
BEGIN
    FOR i IN 1..10 LOOP
        out := substr(alphabet, (ms % 32)::int + 1, 1) || out;
        ms := ms / 32;
    END LOOP;
    FOR i IN 1..16 LOOP
        out := out || substr(alphabet, floor(random() * 32)::int + 1, 1);
    END LOOP;
    RETURN prefix || '_' || out;
END $$;

-- Our own queue's permanent "no such address" answers (5.1.x: bad mailbox, bad domain)
-- suppress the address too, whichever transport or worker recorded them. A trigger,
-- so that every writer of outbound_recipients gets it without knowing.
CREATE FUNCTION suppress_queue_bounce() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'bounced' AND OLD.status IS DISTINCT FROM 'bounced'
       AND NEW.status_code LIKE '5.1.%' THEN
        INSERT INTO suppressions (org_id, id, email, reason, environment_id,
                                  source_message_id, diagnostic, created_at)
        SELECT NEW.org_id, agentpost_ulid('sup', NEW.updated_at), lower(NEW.address),
               'queue_bounce', q.environment_id, q.message_id, left(NEW.diagnostic, 1000),
               NEW.updated_at
          FROM outbound_queue q WHERE q.org_id = NEW.org_id AND q.id = NEW.queue_id
        ON CONFLICT (org_id, email) DO NOTHING;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER outbound_recipients_suppress AFTER UPDATE OF status ON outbound_recipients
    FOR EACH ROW EXECUTE FUNCTION suppress_queue_bounce();
