"""Migration 0031: the message row's physical storage (issue 12).

The duplicate (folder_id, uid) index is gone while the unique one that serves the same
lookups stays, and the wide columns of new rows are compressed with lz4 where the
server supports it (a server without it keeps its default; the migration still applies).
"""

from tests.helpers import query as _one


def test_folder_uid_lookups_keep_exactly_one_index(db_dsn):
    """Only the unique constraint's index covers (folder_id, uid)."""
    rows = _one(db_dsn, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = "
                        "'messages' AND indexdef LIKE '%%(folder_id, uid)'")
    assert [r[0] for r in rows] == ["messages_folder_id_uid_key"]
    assert "UNIQUE" in rows[0][1]


def test_wide_message_columns_use_lz4_when_the_server_has_it(db_dsn):
    """text_body and the other wide columns say lz4 when PostgreSQL offers it; a narrow
    column keeps the default."""
    offered = _one(db_dsn, "SELECT enumvals FROM pg_settings "
                           "WHERE name = 'default_toast_compression'")[0][0]
    methods = dict(_one(db_dsn, "SELECT attname, attcompression FROM pg_attribute WHERE "
                                "attrelid = 'messages'::regclass AND attnum > 0 AND NOT "
                                "attisdropped"))
    wide = ["text_body", "html_body", "extracted_text", "headers", "imap_envelope",
            "imap_bodystructure", "imap_body", "imap_sections"]
    expected = "l" if "lz4" in offered else ""
    assert {name: methods[name] for name in wide} == dict.fromkeys(wide, expected)
    assert methods["subject"] == ""


def test_small_messages_bytes_use_lz4_when_the_server_has_it(db_dsn):
    """Migration 0036: blobs.data (a small message's bytes) is compressed with lz4 too,
    and a row written now says so (pg_column_compression) once it is large enough to be
    compressed at all."""
    offered = _one(db_dsn, "SELECT enumvals FROM pg_settings "
                           "WHERE name = 'default_toast_compression'")[0][0]
    [(method,)] = _one(db_dsn, "SELECT attcompression FROM pg_attribute WHERE attrelid = "
                               "'blobs'::regclass AND attname = 'data'")
    assert method == ("l" if "lz4" in offered else "")
    data = b"Subject: compressible\r\n\r\n" + b"the same line again\r\n" * 400
    [(used,)] = _one(db_dsn, "INSERT INTO blobs (key, size, refcount, created_at, data) "
                             "VALUES ('db/sha256/test-0036', %s, 0, now(), %s); "
                             "SELECT pg_column_compression(data) FROM blobs "
                             "WHERE key = 'db/sha256/test-0036'",
                     (len(data), data))  # never committed: query() does not commit
    assert used == ("lz4" if "lz4" in offered else "pglz")
