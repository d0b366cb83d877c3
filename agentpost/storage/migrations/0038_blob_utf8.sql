-- 0038: whether a blob row's bytes (a message kept in PostgreSQL, 0035) are UTF-8
-- without NUL, as nearly all mail is.
--
-- Such bytes are read back as text (convert_from(data, 'UTF8'), exactly the same
-- bytes on a UTF-8 database) instead of bytea, which psycopg2 receives hex-encoded at
-- twice the size: a whole 200 KiB message read in 0.25 ms instead of 1.0 ms (issue 12;
-- an IMAP BODY[] or the API's /raw). Set by the writer, which checks the bytes anyway;
-- NULL (rows written before, blobs in the store) reads as bytea, as before.
ALTER TABLE blobs ADD COLUMN utf8 boolean;
