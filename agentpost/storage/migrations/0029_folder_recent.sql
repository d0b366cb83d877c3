-- 0029: the IMAP \Recent mark in a row of its own (issue 10: lock waits under load).
-- folders.recent_uid (0007) shared the folder row with UIDNEXT and HIGHESTMODSEQ, which
-- every write to the folder locks until COMMIT; a session claiming new arrivals as
-- \Recent queued behind those writers, and they behind it. The mark lives here now,
-- one row per folder, created by the first claim (no row: 0); folders.recent_uid is
-- no longer read or written. Removed with its folder (and so with the inbox and org).
CREATE TABLE folder_recent (
    org_id      text   NOT NULL,
    folder_id   bigint NOT NULL,
    recent_uid  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (org_id, folder_id),
    FOREIGN KEY (org_id, folder_id) REFERENCES folders (org_id, id) ON DELETE CASCADE
);

INSERT INTO folder_recent (org_id, folder_id, recent_uid)
SELECT org_id, id, recent_uid FROM folders WHERE recent_uid > 0;
