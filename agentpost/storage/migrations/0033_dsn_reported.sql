-- 0033: which failed recipients a DSN has already reported (issue 11, hostile review).
--
-- A queue row whose recipients fail at different attempts (one refused at once, another
-- deferred until the message's lifetime ran out) owes a DSN each time; the second one
-- named every failed recipient of the row again, so the sender was told twice about
-- the first. A recipient is now marked once a stored DSN names it, in the transaction
-- that marks the DSN delivered (storage.outbound.bounce_delivered).
ALTER TABLE outbound_recipients ADD COLUMN reported boolean NOT NULL DEFAULT false;
