-- IMAP \Recent (RFC 3501 §2.3.2): the highest UID some session has already been told
-- about. A session that SELECTs (or sees a new arrival) claims the UIDs above it; only the
-- first session to do so reports them as \Recent. Messages stored before this migration
-- count as seen.
ALTER TABLE folders ADD COLUMN recent_uid bigint NOT NULL DEFAULT 0;
UPDATE folders SET recent_uid = uidnext - 1;
