-- The MODSEQ of the last time a message left the folder (expunge, MOVE out, API delete).
-- IMAP sessions compare it with what they have seen, so telling "nothing was expunged"
-- costs one row read instead of checking every UID the session knows.
ALTER TABLE folders ADD COLUMN expunged_modseq bigint NOT NULL DEFAULT 0;
