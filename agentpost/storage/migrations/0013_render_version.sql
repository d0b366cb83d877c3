-- Which version of the IMAP renderers (ENVELOPE, BODYSTRUCTURE, BODY, section map) and
-- of the SEARCH/SORT key derivation produced a message row's stored copies
-- (agentpost.core.ingest.RENDER_VERSION). Rows stored before this migration are version 0:
-- their ENVELOPE drops source routes and their BODYSTRUCTURE carries decoded parameters
-- (issue 10, items 9 and 11), and their search keys are SQL's approximation (0012).
-- agentpost.jobs.rerender brings them up to date from the stored raw bytes, in the
-- background, in every process (rows claimed with SKIP LOCKED).
ALTER TABLE messages ADD COLUMN render_version smallint NOT NULL DEFAULT 0;

-- The job's work list. A later version bump adds a migration that replaces this index
-- with one on its own predicate.
CREATE INDEX messages_render_stale ON messages (id) WHERE render_version < 1;
