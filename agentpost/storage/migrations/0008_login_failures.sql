-- Failed-login allowances (token buckets), shared by every AgentPost process: a client
-- that spreads its guesses over several workers or nodes gets the allowance once, not
-- once per process. Keys are SHA-256 of "kind:value" (no addresses stored in clear).
-- Only failures write; the retention sweep removes rows idle for a day.
CREATE TABLE login_failures (
    key         text PRIMARY KEY,
    tokens      double precision NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX login_failures_updated ON login_failures (updated_at);
