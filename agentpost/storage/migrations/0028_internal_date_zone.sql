-- 0028: the zone of a message's INTERNALDATE (issue 10). An IMAP APPEND may give its
-- date-time with a zone ("03-Dec-2026 09:49:31 +0200"); received_at keeps the instant
-- (UTC) and this column the offset in minutes, so FETCH INTERNALDATE answers in the
-- same zone and SEARCH BEFORE/ON/SINCE compare the date as that zone shows it
-- (RFC 3501 6.4.4). NULL means +0000 (mail from SMTP or the API has no given zone).
-- Nullable with no default: adding it rewrites nothing and takes no time.
ALTER TABLE messages ADD COLUMN internal_date_zone smallint;
