-- 0011: UIDVALIDITY from a sequence (issue 10, item 10).
-- A folder's UIDVALIDITY was the clock in seconds, so DELETE and CREATE of the same name
-- within one second gave the new folder the old one's UIDVALIDITY while its UIDs started
-- again at 1: a client's cache then claimed the old messages for the new UIDs (RFC 3501
-- 2.3.1.1: the pair mailbox name + UIDVALIDITY must never refer to other messages).
-- Every folder row now takes a fresh value of one global sequence, through the column
-- default, so no insert can forget it. The sequence starts above every value handed out
-- so far and above the clock, so values keep increasing compared with the old ones; its
-- range is that of an IMAP nz-number (1 .. 2^32-1).
CREATE SEQUENCE folder_uidvalidity_seq AS bigint MINVALUE 1 MAXVALUE 4294967295 NO CYCLE;
SELECT setval('folder_uidvalidity_seq',
              greatest((SELECT coalesce(max(uidvalidity), 0) FROM folders),
                       extract(epoch FROM now())::bigint) + 1,
              false);
ALTER SEQUENCE folder_uidvalidity_seq OWNED BY folders.uidvalidity;
ALTER TABLE folders ALTER COLUMN uidvalidity SET DEFAULT nextval('folder_uidvalidity_seq');
