-- RENDER_VERSION 2 (agentpost.core.ingest): from_text .. bcc_text also hold each
-- address's normalised addr-spec (local@domain, comments and folding removed), so that
-- SEARCH FROM user@domain.org finds "<user (c)@ (c) domain.org>". Rows of version 1 are
-- re-derived from their raw bytes by agentpost.jobs.rerender; its work list moves on.
DROP INDEX IF EXISTS messages_render_stale;
CREATE INDEX messages_render_stale ON messages (id) WHERE render_version < 2;
