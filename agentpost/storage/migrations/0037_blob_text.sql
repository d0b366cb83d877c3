-- 0037: a message body read from the message's own bytes, inside PostgreSQL.
--
-- A plain message kept in PostgreSQL (blobs.data, 0035) reached the server twice in
-- the delivering transaction: its raw bytes for the blob row, and its body again as
-- the message row's text_body, both as literals the SQL lexer reads a byte at a time
-- (a quarter of the server's CPU per 100 KiB message, perf; issue 12). When the body
-- is exactly the UTF-8 text of the bytes after the header (checked by the ingest
-- before it asks for this), the row's value is computed here from the blob row that
-- the same transaction wrote or referenced a statement earlier.
--
-- Never a silent NULL: a missing row, or fewer bytes than asked for, is an error that
-- fails the delivery's transaction (the sender retries); bytes that are not UTF-8 are
-- refused by convert_from itself.
CREATE FUNCTION ap_blob_text(blob_key text, start integer, octets integer)
RETURNS text LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    body text;
BEGIN
    SELECT convert_from(substring(b.data FROM start + 1 FOR octets), 'UTF8') INTO body
      FROM blobs b
     WHERE b.key = blob_key AND start >= 0 AND octets >= 0
       AND octet_length(b.data) = start + octets;
    IF body IS NULL THEN
        RAISE EXCEPTION 'agentpost: blob % holds no text of % octets at %',
            blob_key, octets, start;
    END IF;
    RETURN body;
END
$$;
