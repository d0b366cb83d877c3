-- 0030: the webhook worker is woken only when an event created webhook deliveries.
--
-- Until now every process's webhook worker listened on the events channel, so each
-- received message (one event) cost every process a claim and a next-due query even
-- when its organization has no webhook at all. The fan-out trigger now says so itself,
-- on its own channel, and only when it inserted a delivery. NOTIFY folds identical
-- notices of one transaction into one, so a batch of deliveries wakes each worker once.

CREATE OR REPLACE FUNCTION webhook_fanout() RETURNS trigger LANGUAGE plpgsql AS $$
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
    IF FOUND THEN
        PERFORM pg_notify('agentpost_webhooks', '');
    END IF;
    RETURN NULL;
END $$;
