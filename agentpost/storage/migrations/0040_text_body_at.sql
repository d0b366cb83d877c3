-- 0040: a plain body kept once, in its message's own bytes.
--
-- 0037 stopped sending a plain message's body twice, but the row still stored it twice:
-- the blob row's bytes (0035) and text_body, computed from them, each compressed,
-- written to TOAST, WAL-logged and, on PostgreSQL 15, written again as zeroed pages
-- when the TOAST table grows (perf, 100 KiB at 20 sessions: a quarter of the
-- backend's CPU per message; issue 12). Copies of the message (more recipients, IMAP
-- COPY) stored it again each.
--
-- text_body_at says "the body is the UTF-8 text of the raw blob's bytes from this
-- offset on" and text_body is then NULL; readers use ap_body_text(raw_blob_key,
-- text_body_at). The raw blob lives as long as a message names it (refcount), and an
-- inline blob's bytes never leave its row. Older rows keep text_body as they are.
ALTER TABLE messages ADD COLUMN text_body_at integer,
    ADD CONSTRAINT messages_text_body_at CHECK (text_body_at IS NULL
        OR (text_body IS NULL AND text_body_at >= 0));

-- The writer's check, made where the bytes are: the blob row exists, holds exactly
-- ``start + octets`` bytes (octet_length reads the TOAST header, not the data). The
-- ingest compared the body with those very bytes (the key is their SHA-256) before
-- asking; this refuses a row that would read back a different length. Never a silent
-- NULL: the delivery's transaction fails and the sender retries.
CREATE FUNCTION ap_blob_text_at(blob_key text, start integer, octets integer)
RETURNS integer LANGUAGE plpgsql STABLE STRICT AS $$
BEGIN
    PERFORM 1 FROM blobs b
     WHERE b.key = blob_key AND start >= 0 AND octets >= 0
       AND octet_length(b.data) = start + octets;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agentpost: blob % holds no text of % octets at %',
            blob_key, octets, start;
    END IF;
    RETURN start;
END
$$;

-- The reader's side. SQL (not plpgsql): no interpreter set-up per row when a SEARCH
-- reads every body of a folder.
CREATE FUNCTION ap_body_text(blob_key text, start integer)
RETURNS text LANGUAGE sql STABLE STRICT PARALLEL SAFE AS $$
    SELECT convert_from(substring(b.data FROM start + 1), 'UTF8')
      FROM blobs b WHERE b.key = blob_key
$$;
