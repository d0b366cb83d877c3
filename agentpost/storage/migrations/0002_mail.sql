-- Mail: folders, threads, messages, attachments, blob references, the event outbox
-- and receive/send filter rules. Same rule as 0001: tenant tables carry org_id and
-- every reference includes it.

-- Content-addressed blobs are shared (the same attachment received twice is stored
-- once). refcount counts the message/attachment rows that use a blob; a blob whose
-- count reaches zero is deleted from the store after the deleting transaction commits,
-- under an advisory lock that ingest also takes (see storage/blobrefs.py).
CREATE TABLE blobs (
    key         text PRIMARY KEY,
    size        bigint NOT NULL CHECK (size >= 0),
    refcount    integer NOT NULL CHECK (refcount >= 0),
    created_at  timestamptz NOT NULL
);

-- IMAP folders; every inbox has the five system folders.
CREATE TABLE folders (
    org_id          text NOT NULL,
    id              bigserial PRIMARY KEY,
    environment_id  text NOT NULL,
    inbox_id        text NOT NULL,
    name            text NOT NULL,
    special_use     text CHECK (special_use IN ('\Inbox', '\Sent', '\Drafts', '\Trash', '\Junk')),
    uidvalidity     bigint NOT NULL,
    uidnext         bigint NOT NULL DEFAULT 1,
    highestmodseq   bigint NOT NULL DEFAULT 1,
    subscribed      boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL,
    UNIQUE (org_id, id),
    UNIQUE (inbox_id, name),
    FOREIGN KEY (org_id, environment_id, inbox_id)
        REFERENCES inboxes (org_id, environment_id, id) ON DELETE CASCADE
);

CREATE TABLE threads (
    org_id           text NOT NULL,
    id               text PRIMARY KEY,
    environment_id   text NOT NULL,
    inbox_id         text NOT NULL,
    subject          text NOT NULL DEFAULT '',
    message_count    integer NOT NULL DEFAULT 0,
    last_message_at  timestamptz NOT NULL,
    participants     jsonb NOT NULL DEFAULT '[]'::jsonb,
    labels           text[] NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    UNIQUE (org_id, id),
    FOREIGN KEY (org_id, environment_id, inbox_id)
        REFERENCES inboxes (org_id, environment_id, id) ON DELETE CASCADE
);
CREATE INDEX threads_inbox_activity ON threads (org_id, inbox_id, last_message_at DESC, id DESC);

CREATE TABLE messages (
    org_id             text NOT NULL,
    id                 text PRIMARY KEY,
    environment_id     text NOT NULL,
    inbox_id           text NOT NULL,
    thread_id          text NOT NULL,
    folder_id          bigint NOT NULL,
    uid                bigint NOT NULL,
    modseq             bigint NOT NULL,
    direction          text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    message_id_header  text,
    in_reply_to        text,
    reference_ids      text[] NOT NULL DEFAULT '{}',
    subject            text NOT NULL DEFAULT '',
    from_address       jsonb,
    to_addresses       jsonb NOT NULL DEFAULT '[]'::jsonb,
    cc_addresses       jsonb NOT NULL DEFAULT '[]'::jsonb,
    bcc_addresses      jsonb NOT NULL DEFAULT '[]'::jsonb,
    reply_to           jsonb NOT NULL DEFAULT '[]'::jsonb,
    sent_at            timestamptz,
    received_at        timestamptz NOT NULL,
    headers            jsonb NOT NULL DEFAULT '[]'::jsonb,
    text_body          text,
    html_body          text,
    extracted_text     text,
    preview            text NOT NULL DEFAULT '',
    size               bigint NOT NULL,
    raw_blob_key       text NOT NULL REFERENCES blobs (key),
    has_attachments    boolean NOT NULL DEFAULT false,
    labels             text[] NOT NULL DEFAULT '{}',
    seen               boolean NOT NULL DEFAULT false,
    flagged            boolean NOT NULL DEFAULT false,
    answered           boolean NOT NULL DEFAULT false,
    draft              boolean NOT NULL DEFAULT false,
    deleted            boolean NOT NULL DEFAULT false,
    envelope_from      text,
    envelope_to        text[] NOT NULL DEFAULT '{}',
    created_at         timestamptz NOT NULL,
    UNIQUE (org_id, id),
    UNIQUE (folder_id, uid),
    FOREIGN KEY (org_id, environment_id, inbox_id)
        REFERENCES inboxes (org_id, environment_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, thread_id) REFERENCES threads (org_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, folder_id) REFERENCES folders (org_id, id) ON DELETE CASCADE
);
-- ULID ids sort by arrival, so one index serves newest-first listing and its cursor.
CREATE INDEX messages_inbox_id ON messages (org_id, inbox_id, id DESC);
CREATE INDEX messages_thread ON messages (org_id, thread_id, id DESC);
CREATE INDEX messages_msgid ON messages (inbox_id, message_id_header);
CREATE INDEX messages_references ON messages USING gin (reference_ids);
CREATE INDEX messages_raw_blob ON messages (raw_blob_key);

CREATE TABLE attachments (
    org_id        text NOT NULL,
    id            text PRIMARY KEY,
    message_id    text NOT NULL,
    filename      text NOT NULL DEFAULT '',
    mime_type     text NOT NULL,
    size          bigint NOT NULL,
    content_id    text,
    disposition   text,
    sha256        text NOT NULL,
    blob_key      text NOT NULL REFERENCES blobs (key),
    part_index    integer NOT NULL,
    UNIQUE (org_id, id),
    FOREIGN KEY (org_id, message_id) REFERENCES messages (org_id, id) ON DELETE CASCADE
);
CREATE INDEX attachments_message ON attachments (org_id, message_id, part_index);

-- The outbox: written in the same transaction as the change it describes.
CREATE TABLE events (
    org_id          text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    id              text PRIMARY KEY,
    environment_id  text,
    inbox_id        text,
    type            text NOT NULL,
    data            jsonb NOT NULL,
    created_at      timestamptz NOT NULL
);
CREATE INDEX events_org_id ON events (org_id, id);
CREATE INDEX events_created ON events (created_at);

CREATE TABLE filter_rules (
    org_id          text NOT NULL,
    id              text PRIMARY KEY,
    environment_id  text NOT NULL,
    inbox_id        text,
    direction       text NOT NULL CHECK (direction IN ('send', 'receive')),
    action          text NOT NULL CHECK (action IN ('allow', 'block')),
    match_type      text NOT NULL CHECK (match_type IN ('address', 'domain', 'subdomain_wildcard')),
    value           text NOT NULL CHECK (value = lower(value)),
    created_at      timestamptz NOT NULL,
    UNIQUE (org_id, id),
    FOREIGN KEY (org_id, environment_id) REFERENCES environments (org_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, environment_id, inbox_id)
        REFERENCES inboxes (org_id, environment_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX filter_rules_unique ON filter_rules
    (org_id, environment_id, COALESCE(inbox_id, ''), direction, match_type, value);
CREATE INDEX filter_rules_lookup ON filter_rules (org_id, environment_id, direction);

-- System folders for inboxes that already exist.
INSERT INTO folders (org_id, environment_id, inbox_id, name, special_use, uidvalidity, created_at)
SELECT i.org_id, i.environment_id, i.id, f.name, f.special_use,
       (extract(epoch FROM now())::bigint), now()
FROM inboxes i
CROSS JOIN (VALUES ('INBOX', '\Inbox'), ('Sent', '\Sent'), ('Drafts', '\Drafts'),
                   ('Trash', '\Trash'), ('Junk', '\Junk')) AS f (name, special_use);
