-- 0023: IMAP subscriptions as state of their own (issue 10; RFC 3501 6.3.6, RFC 5258).
-- A subscription was a flag on the folder row, so it could not outlive its folder:
-- DELETE dropped it (RFC 3501 6.3.9: the server MUST NOT remove a name from the
-- subscription list because the mailbox is gone), SUBSCRIBE to a name that does not
-- exist (yet) was refused, and LIST (SUBSCRIBED) could never answer \NonExistent.
-- Now a subscription is a name per inbox, as the client spelled it (INBOX in any case
-- is stored as INBOX; every other name is exact, like folder names), whether or not a
-- folder of that name exists. RENAME moves the subscriptions of the folder and of its
-- children with it (storage.subscriptions.rename); DELETE leaves them.
CREATE TABLE mailbox_subscriptions (
    org_id      text NOT NULL,
    inbox_id    text NOT NULL,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (org_id, inbox_id, name),
    FOREIGN KEY (org_id, inbox_id) REFERENCES inboxes (org_id, id) ON DELETE CASCADE,
    CHECK (octet_length(name) BETWEEN 1 AND 1000)
);

-- Existing clients see no change: every folder that was subscribed still is.
INSERT INTO mailbox_subscriptions (org_id, inbox_id, name, created_at)
SELECT org_id, inbox_id, name, now() FROM folders WHERE subscribed
ON CONFLICT DO NOTHING;

-- A new inbox's system folders (INBOX, Sent, Drafts, Trash, Junk) start subscribed, as
-- they did (the column default was true), whichever code path creates them (the API,
-- ingest's auto-created inboxes): a folder a client CREATEs is not subscribed
-- (RFC 3501 6.3.3 ties no subscription to CREATE; Dovecot does the same).
CREATE FUNCTION subscribe_system_folder() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO mailbox_subscriptions (org_id, inbox_id, name, created_at)
    VALUES (NEW.org_id, NEW.inbox_id, NEW.name, NEW.created_at)
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;
CREATE TRIGGER folders_subscribe_system AFTER INSERT ON folders
    FOR EACH ROW WHEN (NEW.special_use IS NOT NULL)
    EXECUTE FUNCTION subscribe_system_folder();

-- One place holds subscriptions from now on.
ALTER TABLE folders DROP COLUMN subscribed;
