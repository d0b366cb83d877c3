"""IMAP subscriptions as state of their own (migration 0023, RFC 3501 §6.3.6-6.3.9,
RFC 5258): transcripts over real sockets against the real store.

A subscription is a name, not a flag on a folder: it may name no folder (SUBSCRIBE
before CREATE, or after DELETE), LIST (SUBSCRIBED) then says ``\\NonExistent`` and
LSUB ``\\Noselect``; RENAME moves the subscriptions of the folder and its children;
CREATE does not subscribe; a new inbox's system folders start subscribed."""

from __future__ import annotations

import pytest_twisted

from tests.imap_client import Client, new_inbox, session

SYSTEM = [b'"INBOX"', b'"Sent"', b'"Drafts"', b'"Trash"', b'"Junk"']


def _names(lines: list[bytes]) -> list[bytes]:
    return [line.rsplit(b' "/" ', 1)[1] for line in lines]


@pytest_twisted.ensureDeferred
async def test_system_folders_start_subscribed_and_create_does_not_subscribe(server):
    inbox, key = await new_inbox(server, "subsystem")

    def work(c: Client) -> tuple[list[bytes], list[bytes]]:
        before = c.ok('LSUB "" "*"')
        c.ok("CREATE Projects/2026")
        return before, c.ok('LSUB "" "*"')

    before, after = await session(server.imap_port, inbox["email"], key, work)
    assert sorted(_names(before)) == sorted(SYSTEM), before
    assert after == before  # neither the folder nor its created parent


@pytest_twisted.ensureDeferred
async def test_subscribe_to_a_name_that_does_not_exist(server):
    inbox, key = await new_inbox(server, "subghost")

    def work(c: Client) -> dict[str, list[bytes]]:
        out = {"sub": c.cmd("SUBSCRIBE Later/Soon"),
               "list": c.ok('LIST (SUBSCRIBED) "" "Later*"'),
               "lsub": c.ok('LSUB "" "Later*"'),
               "plain": c.ok('LIST "" "Later*"'),
               "lsub_pct": c.ok('LSUB "" "%"')}
        c.ok("CREATE Later/Soon")
        out["created"] = c.ok('LIST (SUBSCRIBED) "" "Later*"')
        return out

    got = await session(server.imap_port, inbox["email"], key, work)
    assert got["sub"][-1] == b"t2 OK SUBSCRIBE completed", got["sub"]
    assert got["list"] == [b'* LIST (\\HasNoChildren \\NonExistent \\Subscribed) "/" '
                           b'"Later/Soon"'], got["list"]
    assert got["lsub"] == [b'* LSUB (\\HasNoChildren \\Noselect) "/" "Later/Soon"'], got
    assert got["plain"] == [], got["plain"]
    # RFC 3501 §6.3.9: "%" reaches the unsubscribed parent, listed \Noselect.
    assert b'* LSUB (\\HasNoChildren \\Noselect) "/" "Later"' in got["lsub_pct"], got
    assert got["created"] == [b'* LIST (\\HasNoChildren \\Subscribed) "/" "Later/Soon"'], got


@pytest_twisted.ensureDeferred
async def test_delete_keeps_the_subscription_until_unsubscribe(server):
    inbox, key = await new_inbox(server, "subdelete")

    def work(c: Client) -> dict[str, list[bytes]]:
        c.ok("CREATE Work")
        c.ok("SUBSCRIBE Work")
        c.ok("DELETE Work")
        out = {"list": c.ok('LIST (SUBSCRIBED) "" "*"'),
               "lsub": c.ok('LSUB "" "W*"'),
               "plain": c.ok('LIST "" "*"'),
               "returns": c.ok('LIST "" "*" RETURN (SUBSCRIBED)'),
               "status": c.cmd('LIST (SUBSCRIBED) "" "W*" RETURN (STATUS (MESSAGES))'),
               "unsub": c.cmd("UNSUBSCRIBE Work"),
               "again": c.cmd("UNSUBSCRIBE Work")}
        out["after"] = c.ok('LIST (SUBSCRIBED) "" "W*"')
        return out

    got = await session(server.imap_port, inbox["email"], key, work)
    assert b'* LIST (\\HasNoChildren \\NonExistent \\Subscribed) "/" "Work"' in got["list"]
    assert not any(b"\\Noselect" in line for line in got["list"]), got["list"]
    assert got["lsub"] == [b'* LSUB (\\HasNoChildren \\Noselect) "/" "Work"'], got["lsub"]
    assert not any(b'"Work"' in line for line in got["plain"] + got["returns"]), got
    assert not any(line.startswith(b"* STATUS") for line in got["status"]), got["status"]
    assert got["unsub"][-1].endswith(b"OK UNSUBSCRIBE completed"), got["unsub"]
    assert got["again"][-1].split(b" ")[1:3] == [b"NO", b"[NONEXISTENT]"], got["again"]
    assert got["after"] == [], got["after"]


@pytest_twisted.ensureDeferred
async def test_rename_moves_the_subscriptions_of_the_folder_and_its_children(server):
    inbox, key = await new_inbox(server, "subrename")

    def work(c: Client) -> dict[str, list[bytes]]:
        c.ok("CREATE Team/Notes")
        c.ok("CREATE Teamwork")
        for name in ("Team", "Team/Notes", "Team/Gone", "Teamwork"):
            c.ok(f"SUBSCRIBE {name}")
        return {"rename": c.cmd("RENAME Team Crew"),
                "lsub": c.ok('LSUB "" "*"'),
                "under": c.cmd("RENAME Crew Crew/Inner")}

    got = await session(server.imap_port, inbox["email"], key, work)
    assert got["rename"][-1].endswith(b"OK RENAME completed"), got["rename"]
    names = _names(got["lsub"])
    assert {b'"Crew"', b'"Crew/Notes"', b'"Crew/Gone"', b'"Teamwork"'} <= set(names), names
    assert not {b'"Team"', b'"Team/Notes"', b'"Team/Gone"'} & set(names), names
    assert got["under"][-1].split(b" ")[1] == b"NO", got["under"]


@pytest_twisted.ensureDeferred
async def test_inbox_subscription_is_case_insensitive(server):
    inbox, key = await new_inbox(server, "subinbox")

    def work(c: Client) -> tuple[list[bytes], list[bytes], list[bytes]]:
        c.ok("UNSUBSCRIBE inbox")
        gone = c.ok('LSUB "" "*"')
        c.ok("SUBSCRIBE iNbOx")
        back = c.ok('LSUB "" "*"')
        return gone, back, c.cmd("SUBSCRIBE bad*name")

    gone, back, bad = await session(server.imap_port, inbox["email"], key, work)
    assert b'"INBOX"' not in _names(gone), gone
    assert _names(back).count(b'"INBOX"') == 1 and b'"iNbOx"' not in _names(back), back
    assert bad[-1].split(b" ")[1] in (b"NO", b"BAD"), bad


@pytest_twisted.ensureDeferred
async def test_recursivematch_childinfo_for_parents_of_subscribed_children(server):
    """RFC 5258 §3.5, as Dovecot: CHILDINFO on a matched parent whose subscribed
    descendant the pattern does not match; none when the pattern lists it itself."""
    inbox, key = await new_inbox(server, "subchild")

    def work(c: Client) -> dict[str, list[bytes]]:
        c.ok("CREATE P/Q")
        c.ok("CREATE R/S")
        c.ok("SUBSCRIBE P/Q")
        c.ok("SUBSCRIBE R/S")
        c.ok("SUBSCRIBE R")
        return {"pct": c.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)'),
                "both": c.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" (P P/Q)'),
                "lsub": c.ok('LSUB "" "%"')}

    got = await session(server.imap_port, inbox["email"], key, work)
    assert b'* LIST (\\HasChildren) "/" "P" ("CHILDINFO" ("SUBSCRIBED"))' in got["pct"]
    assert b'* LIST (\\HasChildren \\Subscribed) "/" "R" ("CHILDINFO" ("SUBSCRIBED"))' \
        in got["pct"], got["pct"]
    assert got["both"] == [b'* LIST (\\HasNoChildren \\Subscribed) "/" "P/Q"'], got["both"]
    assert b'* LSUB (\\HasChildren \\Noselect) "/" "P"' in got["lsub"], got["lsub"]
    assert b'* LSUB (\\HasChildren) "/" "R"' in got["lsub"], got["lsub"]


@pytest_twisted.ensureDeferred
async def test_subscriptions_are_per_inbox(server):
    first, key1 = await new_inbox(server, "subone")
    second, key2 = await new_inbox(server, "subtwo")
    await session(server.imap_port, first["email"], key1,
                  lambda c: c.ok("SUBSCRIBE Private/Plans"))
    listed = await session(server.imap_port, second["email"], key2,
                           lambda c: c.ok('LIST (SUBSCRIBED) "" "*"'))
    assert sorted(_names(listed)) == sorted(SYSTEM), listed


@pytest_twisted.ensureDeferred
async def test_subscriptions_per_inbox_are_capped(server, monkeypatch):
    """Names need no folder, so their number is capped: over the cap SUBSCRIBE is
    NO [CANNOT]; subscribing again to a name held, or after UNSUBSCRIBE, still works."""
    from agentpost.storage import subscriptions

    monkeypatch.setattr(subscriptions, "MAX_SUBSCRIPTIONS_PER_INBOX", len(SYSTEM) + 2)
    inbox, key = await new_inbox(server, "subcap")

    def work(c: Client) -> list[list[bytes]]:
        return [c.cmd("SUBSCRIBE Sub1"), c.cmd("SUBSCRIBE Sub2"), c.cmd("SUBSCRIBE Sub3"),
                c.cmd("SUBSCRIBE Sub2"), c.cmd("UNSUBSCRIBE Sub1"), c.cmd("SUBSCRIBE Sub3"),
                c.ok('LSUB "" "Sub*"')]

    *replies, listed = await session(server.imap_port, inbox["email"], key, work)
    assert [r[-1].split(b" ")[1] for r in replies] == [b"OK", b"OK", b"NO", b"OK", b"OK",
                                                        b"OK"], replies
    assert replies[2][-1].split(b" ")[2] == b"[CANNOT]", replies[2]
    assert _names(listed) == [b'"Sub2"', b'"Sub3"'], listed


def test_migration_0023_keeps_every_existing_subscription(empty_dsn):
    """Migration 0023 on a database with folders: the subscribed ones are seeded as
    subscriptions (existing clients see no change), the unsubscribed ones are not, and
    the flag column is gone. Tenant rows are left out (replication role: no foreign-key
    checks), only the folders matter here."""
    import psycopg2

    from agentpost.storage.migrations import available_migrations

    migrations = available_migrations()
    target = next(m for m in migrations if m.version == 23)
    conn = psycopg2.connect(empty_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for m in migrations:
                if m.version < target.version:
                    cur.execute(m.sql)
            cur.execute("SET session_replication_role = replica")
            cur.execute(
                "INSERT INTO folders (org_id, environment_id, inbox_id, name, special_use, "
                "subscribed, created_at) VALUES "
                "('org_a', 'env_a', 'ibx_a', 'INBOX', '\\Inbox', true, now()), "
                "('org_a', 'env_a', 'ibx_a', 'Projects', NULL, false, now()), "
                "('org_a', 'env_a', 'ibx_a', 'Projects/2026', NULL, true, now()), "
                "('org_b', 'env_b', 'ibx_b', 'Projects', NULL, true, now())")
            cur.execute(target.sql)
            cur.execute("SELECT org_id, inbox_id, name FROM mailbox_subscriptions "
                        "ORDER BY org_id, name")
            seeded = cur.fetchall()
            cur.execute("SELECT column_name FROM information_schema.columns "
                        "WHERE table_name = 'folders' AND column_name = 'subscribed'")
            column = cur.fetchall()
    finally:
        conn.close()
    assert seeded == [("org_a", "ibx_a", "INBOX"), ("org_a", "ibx_a", "Projects/2026"),
                      ("org_b", "ibx_b", "Projects")]
    assert column == []
