-- 0031: a message row costs PostgreSQL less CPU to write (issue 12).
--
-- messages_folder_uid duplicated the index of the UNIQUE (folder_id, uid) constraint
-- column for column: every delivery paid for a second identical btree insert, and no
-- query can use it that cannot use the unique one.
DROP INDEX IF EXISTS messages_folder_uid;

-- A 4 KiB message's row (body, extracted text, headers, IMAP renderings) is over the
-- TOAST threshold, so every insert compresses its wide columns; pglz spends about a
-- third more backend CPU doing that than lz4, and compresses less. Only rows written
-- from now on change; PostgreSQL reads either method. A server built without lz4 (or
-- older than 14) keeps the default and says so.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE messages
        ALTER COLUMN text_body SET COMPRESSION lz4,
        ALTER COLUMN html_body SET COMPRESSION lz4,
        ALTER COLUMN extracted_text SET COMPRESSION lz4,
        ALTER COLUMN headers SET COMPRESSION lz4,
        ALTER COLUMN imap_envelope SET COMPRESSION lz4,
        ALTER COLUMN imap_bodystructure SET COMPRESSION lz4,
        ALTER COLUMN imap_body SET COMPRESSION lz4,
        ALTER COLUMN imap_sections SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR syntax_error OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 compression is not available here: message rows keep %',
        current_setting('default_toast_compression', true);
END
$$;
