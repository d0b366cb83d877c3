-- 0019: drafts (issue 11). A draft is the API's view of a message in its inbox's
-- Drafts folder (special use \Drafts): every draft has exactly one current copy
-- there (message_id), composed from the structured fields, so IMAP clients see it;
-- and a message an IMAP client APPENDs to Drafts becomes a draft (a row is adopted
-- for it) the first time the API lists or reads the inbox's drafts.
--
-- The row follows its copy: expunging the copy (IMAP, or an API message delete)
-- deletes the draft by cascade. Editing a draft replaces the copy and re-points the
-- row in the same transaction, so the drf_ id stays stable.
--
-- status: draft (nothing planned), scheduled (send_at set, waiting), sending (claimed
-- by a scheduled-send job until lease_until; a job that died is replaced after the
-- lease), failed (the scheduled send was refused; last_error says why, the draft is
-- kept). scheduled_by is the API key whose power the scheduled send uses, re-checked
-- when it fires.
CREATE TABLE drafts (
    org_id          text NOT NULL,
    id              text PRIMARY KEY,
    environment_id  text NOT NULL,
    inbox_id        text NOT NULL,
    message_id      text NOT NULL,
    fields          jsonb NOT NULL DEFAULT '{}'::jsonb,
    status          text NOT NULL DEFAULT 'draft'
                        CHECK (status IN ('draft', 'scheduled', 'sending', 'failed')),
    send_at         timestamptz,
    scheduled_by    text,
    lease_until     timestamptz,
    leased_by       text,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    UNIQUE (org_id, id),
    UNIQUE (org_id, message_id),
    CHECK (status NOT IN ('scheduled', 'sending') OR send_at IS NOT NULL),
    FOREIGN KEY (org_id, environment_id, inbox_id)
        REFERENCES inboxes (org_id, environment_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, message_id) REFERENCES messages (org_id, id) ON DELETE CASCADE
);
-- Listing newest first with an id cursor.
CREATE INDEX drafts_inbox ON drafts (org_id, inbox_id, id DESC);
-- The scheduled-send job's work list: due drafts and expired leases.
CREATE INDEX drafts_due ON drafts (send_at) WHERE status = 'scheduled';
CREATE INDEX drafts_leased ON drafts (lease_until) WHERE status = 'sending';
