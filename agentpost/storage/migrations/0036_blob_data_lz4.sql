-- 0036: small messages' bytes (blobs.data, 0035) are compressed with lz4, as the
-- message row's wide columns are since 0031.
--
-- A 4 KiB message's blob row is over the TOAST threshold, so each delivery compressed
-- its bytes with pglz: 3% of PostgreSQL's CPU in a one-session MX benchmark (perf),
-- for a method several times slower than lz4. Only rows written from now on change;
-- PostgreSQL reads either. A server without lz4 keeps its default and says so.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE blobs ALTER COLUMN data SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR syntax_error OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 compression is not available here: blob rows keep %',
        current_setting('default_toast_compression', true);
END
$$;
