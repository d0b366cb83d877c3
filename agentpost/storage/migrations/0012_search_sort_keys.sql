-- 0012: what IMAP SEARCH and SORT compare, stored per message (issue 10, items 4 and 6).
-- Ingest now fills these from agentpost.mail.searchkeys:
--   sent_date          the Date field's own calendar date (SENTON/SENTBEFORE/SENTSINCE,
--                      RFC 3501 6.4.4: time and zone disregarded), not the UTC date;
--   from_text .. bcc_text  the whole decoded field (display names, comments, every
--                      address, group names) for SEARCH FROM/TO/CC/BCC; NULL: no field;
--   sort_subject       the RFC 5256 base subject (SORT SUBJECT);
--   sort_from/to/cc    the first address's mailbox (SORT FROM/TO/CC);
--   sort_display_from/to  its display name, else addr-spec (RFC 5957).
-- Rows stored before get SQL's approximation of the same, below.
ALTER TABLE messages
    ADD COLUMN sent_date date,
    ADD COLUMN from_text text,
    ADD COLUMN to_text text,
    ADD COLUMN cc_text text,
    ADD COLUMN bcc_text text,
    ADD COLUMN sort_subject text NOT NULL DEFAULT '',
    ADD COLUMN sort_from text NOT NULL DEFAULT '',
    ADD COLUMN sort_to text NOT NULL DEFAULT '',
    ADD COLUMN sort_cc text NOT NULL DEFAULT '',
    ADD COLUMN sort_display_from text NOT NULL DEFAULT '',
    ADD COLUMN sort_display_to text NOT NULL DEFAULT '';

-- -- Backfill (a section of its own, rerunnable, tested in tests/test_search_sort_keys.py).
-- The raw values of a header field, joined, controls made spaces. Encoded words stay
-- encoded in the stored raw pairs, so the decoded display names already stored with the
-- addresses are added after them (searchable, as they were before).
CREATE FUNCTION pg_temp.ap12_field_text(headers jsonb, field text, addresses jsonb)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN raw IS NULL OR raw NOT LIKE '%=?%' THEN raw
                ELSE raw || ' ' || coalesce(
                    (SELECT string_agg(a->>'name', ' ') FROM jsonb_array_elements(addresses) a
                      WHERE coalesce(a->>'name', '') <> ''), '')
           END
      FROM (SELECT string_agg(btrim(regexp_replace(h->>1, '[ ]*[\x01-\x1f\x7f]+[ ]*', ' ', 'g'), ' '),
                              ', ' ORDER BY n) AS raw
              FROM jsonb_array_elements(headers) WITH ORDINALITY AS x(h, n)
             WHERE lower(h->>0) = field) AS f
$$;
-- The zone of the (first) Date field as an interval: +hhmm/-hhmm or an RFC 5322 obs-zone
-- name; anything else (and -0000) counts as UTC, as the parser at ingest reads it.
CREATE FUNCTION pg_temp.ap12_zone(headers jsonb) RETURNS interval LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN z ~ '^[+-][0-9]{4}$' THEN
            (CASE WHEN left(z, 1) = '-' THEN -1 ELSE 1 END)
            * (substr(z, 2, 2)::int * interval '1 hour' + substr(z, 4, 2)::int * interval '1 minute')
        ELSE CASE upper(z) WHEN 'EDT' THEN interval '-4 hours' WHEN 'EST' THEN interval '-5 hours'
                           WHEN 'CDT' THEN interval '-5 hours' WHEN 'CST' THEN interval '-6 hours'
                           WHEN 'MDT' THEN interval '-6 hours' WHEN 'MST' THEN interval '-7 hours'
                           WHEN 'PDT' THEN interval '-7 hours' WHEN 'PST' THEN interval '-8 hours'
                           ELSE interval '0' END
    END
      FROM (SELECT substring(h->>1 FROM '([+-][0-9]{4}|[A-Za-z]{1,3})\s*(\([^()]*\)\s*)?$') AS z
              FROM jsonb_array_elements(headers) WITH ORDINALITY AS x(h, n)
             WHERE lower(h->>0) = 'date' ORDER BY n LIMIT 1) AS d
$$;
UPDATE messages SET
    sent_date = ((sent_at AT TIME ZONE 'UTC')
                 + coalesce(pg_temp.ap12_zone(headers), interval '0'))::date,
    from_text = pg_temp.ap12_field_text(headers, 'from', jsonb_build_array(from_address)),
    to_text = pg_temp.ap12_field_text(headers, 'to', to_addresses),
    cc_text = pg_temp.ap12_field_text(headers, 'cc', cc_addresses),
    bcc_text = pg_temp.ap12_field_text(headers, 'bcc', bcc_addresses),
    sort_subject = btrim(regexp_replace(regexp_replace(
        regexp_replace(subject, '\s+', ' ', 'g'),
        '^(\s*((re|fwd?|fw)\s*(\[[^]]*\])?\s*:|\[[^]]*\]))+\s*', '', 'i'),
        '(\s*\(fwd\))+\s*$', '', 'i')),
    sort_from = coalesce(split_part(from_address->>'email', '@', 1), ''),
    sort_to = coalesce(split_part(to_addresses->0->>'email', '@', 1), ''),
    sort_cc = coalesce(split_part(cc_addresses->0->>'email', '@', 1), ''),
    sort_display_from = coalesce(nullif(from_address->>'name', ''), from_address->>'email', ''),
    sort_display_to = coalesce(nullif(to_addresses->0->>'name', ''), to_addresses->0->>'email',
                               '');
DROP FUNCTION pg_temp.ap12_field_text(jsonb, text, jsonb);
DROP FUNCTION pg_temp.ap12_zone(jsonb);
-- (end of the backfill section)
