-- 0018: the send API. Idempotency keys (a retried POST answers what the first one
-- answered, without sending twice), uploaded attachments, and the server secret that
-- signs upload URLs (one row, shared by every process of a deployment).

-- One row per (organization, credential, key). 'pending' while the first request
-- runs; 'done' with the answer, written in the transaction that sent the message.
-- Rows are swept by the retention job once expires_at has passed.
CREATE TABLE idempotency_keys (
    org_id         text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    credential_id  text NOT NULL,
    key            text NOT NULL,
    fingerprint    text NOT NULL,              -- sha256 of method, path and body
    state          text NOT NULL CHECK (state IN ('pending', 'done')),
    claim          text NOT NULL,              -- who holds a pending row
    status         integer,
    response       jsonb,
    created_at     timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,
    PRIMARY KEY (org_id, credential_id, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- An attachment uploaded ahead of a send (POST /attachments, then PUT to the signed
-- URL). The row holds a counted reference on its blob (blobs.refcount) once the
-- content has arrived; the sweep releases it after expires_at.
CREATE TABLE uploads (
    org_id          text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    environment_id  text,
    key             text PRIMARY KEY,          -- upl_..., unguessable
    filename        text NOT NULL,
    mime_type       text NOT NULL,
    declared_size   bigint NOT NULL CHECK (declared_size >= 0),
    size            bigint,
    sha256          text,
    blob_key        text,                      -- set once the content arrived
    created_by      text NOT NULL,             -- the credential that asked for the URL
    created_at      timestamptz NOT NULL,
    url_expires_at  timestamptz NOT NULL,      -- the PUT URL's lifetime
    expires_at      timestamptz NOT NULL,      -- when the upload is swept
    used_at         timestamptz,
    UNIQUE (org_id, key)
);
CREATE INDEX uploads_expiry ON uploads (expires_at);

-- Secrets the server keeps for itself (the upload URL signing key): generated once by
-- whichever process needs it first, read by all.
CREATE TABLE server_secrets (
    name        text PRIMARY KEY,
    value       bytea NOT NULL,
    created_at  timestamptz NOT NULL
);
