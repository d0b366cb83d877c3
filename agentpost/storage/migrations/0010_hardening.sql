-- 0010: hardening (issue 9). Several independent changes; each section says what it is for.
SELECT 1; -- placeholder so the file is never an empty query

-- ---------------------------------------------------------------------------------------
-- Key holders (issue 9, items 8 and 9): a key's power follows a person's *current* role.
-- api_keys.user_id is the person whose power the key carries. At authentication the key
-- row is joined with org_memberships/env_memberships on (org_id, user_id) and its
-- effective role is the weaker of the minted role and the holder's current role; a key
-- whose holder is no longer a member is refused. Keys minted through the API are held by
-- the minting key's holder; an operator's owner key is held by the organization's owner
-- person. NULL means an "owner seat" key (bootstrap, or an operator key for an
-- organization without an owner person): owner power only while the organization has no
-- owner person, admin at most afterwards.
-- No foreign key on purpose: the key row outlives the membership (history, audit), and
-- ON DELETE SET NULL would turn a departed person's key into a seat key. The join is on
-- (org_id, user_id), so a holder in another organization can never lend it power.
-- Backfill: none, deliberately. Existing keys cannot be attributed to a person (ownership
-- may already have been transferred), so they all become seat keys: unchanged in
-- organizations without an owner person, capped at admin where there is one (the operator
-- re-mints the owner's key with POST /admin/v1/organizations/{id}/api-keys).
ALTER TABLE api_keys ADD COLUMN user_id text;
CREATE INDEX api_keys_holder ON api_keys (org_id, user_id) WHERE user_id IS NOT NULL;

-- ---------------------------------------------------------------------------------------
-- Decoded header values (issue 9, item 13): an RFC 2047 subject or RFC 2231 filename can
-- decode to CR/LF, other controls or a path such as ../../../../tmp/pwned.txt. Ingest now
-- stores them through agentpost.mail.sanitize (controls -> one space; filenames reduced to
-- a basename without leading dots). Rows stored before get the same treatment here, in
-- SQL's approximation of those rules; the raw messages in the blob store stay byte-exact.
-- Idempotent: a second run changes nothing.
UPDATE messages
   SET subject = btrim(regexp_replace(subject, '[ ]*[\x01-\x1f\x7f]+[ ]*', ' ', 'g'), ' ')
 WHERE subject ~ '[\x01-\x1f\x7f]';
UPDATE threads
   SET subject = btrim(regexp_replace(subject, '[ ]*[\x01-\x1f\x7f]+[ ]*', ' ', 'g'), ' ')
 WHERE subject ~ '[\x01-\x1f\x7f]';
UPDATE attachments
   SET filename = left(ltrim(btrim(regexp_replace(
           regexp_replace(filename, '[\x01-\x1f\x7f]+', ' ', 'g'), '^.*[/\\]', ''), ' '),
           '. '), 255)
 WHERE filename ~ '[\x01-\x1f\x7f/\\]' OR filename LIKE '.%';
-- (end of the decoded-header-values section)
