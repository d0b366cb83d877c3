-- Foundation: organizations, environments, people, credentials, inboxes, audit.
-- Every tenant table carries org_id NOT NULL, and every reference between tenant
-- tables includes org_id, so the database itself cannot hold a cross-tenant link.

CREATE TABLE organizations (
    id          text PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    tier        text NOT NULL DEFAULT 'free'
                CHECK (tier IN ('free', 'developer', 'startup', 'business', 'enterprise')),
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE environments (
    org_id      text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    id          text NOT NULL,
    name        text NOT NULL,
    slug        text NOT NULL,
    is_default  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (id),
    UNIQUE (org_id, id),
    UNIQUE (org_id, slug)
);
CREATE UNIQUE INDEX environments_one_default ON environments (org_id) WHERE is_default;

CREATE TABLE users (
    id             text PRIMARY KEY,
    email          text NOT NULL,
    display_name   text NOT NULL DEFAULT '',
    password_hash  text,
    created_at     timestamptz NOT NULL
);
CREATE UNIQUE INDEX users_email ON users (lower(email));

CREATE TABLE org_memberships (
    org_id      text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id     text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (org_id, user_id)
);
-- Exactly one owner: at most one here, and the core never removes the last.
CREATE UNIQUE INDEX org_memberships_one_owner ON org_memberships (org_id) WHERE role = 'owner';

CREATE TABLE env_memberships (
    org_id          text NOT NULL,
    environment_id  text NOT NULL,
    user_id         text NOT NULL,
    role            text NOT NULL CHECK (role IN ('admin', 'member')),
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (org_id, environment_id, user_id),
    FOREIGN KEY (org_id, environment_id) REFERENCES environments (org_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, user_id) REFERENCES org_memberships (org_id, user_id) ON DELETE CASCADE
);

CREATE TABLE api_keys (
    org_id           text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    id               text NOT NULL,
    name             text NOT NULL DEFAULT '',
    display_prefix   text NOT NULL,
    secret_sha256    bytea NOT NULL,
    role             text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    scopes           text[] NOT NULL,
    env_restricted   boolean NOT NULL DEFAULT false,
    created_by_type  text NOT NULL,
    created_by_id    text NOT NULL,
    created_at       timestamptz NOT NULL,
    expires_at       timestamptz,
    revoked_at       timestamptz,
    last_used_at     timestamptz,
    PRIMARY KEY (id),
    UNIQUE (org_id, id)
);
CREATE UNIQUE INDEX api_keys_secret ON api_keys (secret_sha256);
CREATE INDEX api_keys_org_id ON api_keys (org_id, id DESC);

CREATE TABLE api_key_environments (
    org_id          text NOT NULL,
    api_key_id      text NOT NULL,
    environment_id  text NOT NULL,
    PRIMARY KEY (org_id, api_key_id, environment_id),
    FOREIGN KEY (org_id, api_key_id) REFERENCES api_keys (org_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, environment_id) REFERENCES environments (org_id, id) ON DELETE CASCADE
);

CREATE TABLE admin_keys (
    id              text PRIMARY KEY,
    name            text NOT NULL DEFAULT '',
    display_prefix  text NOT NULL,
    secret_sha256   bytea NOT NULL,
    created_at      timestamptz NOT NULL,
    revoked_at      timestamptz
);
CREATE UNIQUE INDEX admin_keys_secret ON admin_keys (secret_sha256);

-- Domains offered to every organization (the configured shared domain).
CREATE TABLE shared_domains (
    name        text PRIMARY KEY CHECK (name = lower(name)),
    created_at  timestamptz NOT NULL
);

-- Domains owned by one organization and environment.
CREATE TABLE domains (
    org_id          text NOT NULL,
    id              text NOT NULL,
    environment_id  text NOT NULL,
    name            text NOT NULL CHECK (name = lower(name)),
    verified_at     timestamptz,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (id),
    UNIQUE (org_id, id),
    FOREIGN KEY (org_id, environment_id) REFERENCES environments (org_id, id)
);
CREATE UNIQUE INDEX domains_name ON domains (name);

CREATE TABLE inboxes (
    org_id          text NOT NULL,
    id              text NOT NULL,
    environment_id  text NOT NULL,
    username        text NOT NULL,
    domain          text NOT NULL,
    email           text NOT NULL,
    display_name    text NOT NULL DEFAULT '',
    client_id       text,
    send_paused     boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (id),
    UNIQUE (org_id, id),
    UNIQUE (org_id, environment_id, id),
    FOREIGN KEY (org_id, environment_id) REFERENCES environments (org_id, id)
);
CREATE UNIQUE INDEX inboxes_email ON inboxes (lower(email));
CREATE UNIQUE INDEX inboxes_client_id ON inboxes (org_id, environment_id, client_id)
    WHERE client_id IS NOT NULL;
-- Ids are ULIDs, so ordering by id is ordering by creation: one index serves the
-- newest-first listing and its cursor.
CREATE INDEX inboxes_org_env_id ON inboxes (org_id, environment_id, id DESC);

-- The audit trail. Rows outlive what they describe, so no foreign keys; org_id is
-- NULL only for requests that never reached an organization (bad keys, admin API).
CREATE TABLE audit_log (
    id              text PRIMARY KEY,
    occurred_at     timestamptz NOT NULL,
    org_id          text,
    environment_id  text,
    actor_type      text NOT NULL,
    actor_id        text,
    action          text NOT NULL,
    target_id       text,
    outcome         text NOT NULL CHECK (outcome IN ('allowed', 'denied', 'failed')),
    status          integer,
    remote_addr     text,
    request_id      text,
    details         jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_org_id ON audit_log (org_id, id DESC);
CREATE INDEX audit_log_time ON audit_log (occurred_at);
