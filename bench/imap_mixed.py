#!/usr/bin/env python3
"""Mixed IMAP load with a strict client: rates, latencies and *protocol errors*.

N clients share one account and, for T seconds, each runs a random mix of SELECT/EXAMINE,
FETCH (FLAGS, BODY.PEEK[HEADER], BODY[], ENVELOPE...), STORE (system flags and keywords,
+/-/replace, .SILENT), COPY/MOVE, EXPUNGE/UID EXPUNGE, APPEND (flags and keywords),
SEARCH, NOOP, a short IDLE and now and then LOGOUT + a new LOGIN, in sequence-number and
UID forms. One command at a time per connection (no pipelining), so every untagged
response belongs to exactly one command.

Each session keeps the view a strict client keeps (RFC 3501 §7.3-7.4, RFC 7162 §3.2.10):
message count, the UID of each sequence number once learnt, EXISTS/EXPUNGE/VANISHED
bookkeeping, and counts protocol errors by kind:

- ``BAD <CMD>``: a tagged BAD to a command this client sends well-formed;
- ``NO <CMD> [code]``: a NO a correct server does not give here (STORE/FETCH/COPY of
  messages still in the client's view, APPEND/SELECT of existing mailboxes, ...).
  ``NO [EXPUNGEISSUED]`` (RFC 5530) is counted apart as *tolerated*;
- ``EXPUNGE during <CMD>``: ``* n EXPUNGE``/``VANISHED`` while answering FETCH, STORE or
  SEARCH without UID (forbidden by RFC 3501 §7.4.1);
- ``EXPUNGE out of range``, ``FETCH out of range``, ``EXISTS decreased``,
  ``SEARCH out of range``, ``UID changed``: sequence numbers the view cannot have;
- ``FETCH incomplete``: an OK FETCH that left out a requested item of a message in view;
- ``STORE result wrong``: the FETCH a non-silent STORE sends lacks the flags just added
  (or still has the ones just removed);
- ``malformed``: unparsable responses, unknown tags, missing UID in a UID command's FETCH;
- ``data after BYE``: anything but the tagged completion after ``* BYE`` on LOGOUT;
- ``connection``: dropped connections, timeouts.

A few sample transcripts (the last lines of the session, C: client, S: server) are kept
for each kind. The report gives per-command counts and p50/p95 latency, completed
commands per second and the errors.

Other modes: ``--append-only`` (one client, sequential APPENDs: APPEND/s) and
``--load M`` (M messages APPENDed by ``--clients K`` connections: messages/s).

Servers: any IMAP server (``--host/--port/--tls/--starttls/--user/--password``), or
``--start-agentpost`` (a throw-away PostgreSQL + ``agentpost serve`` on free loopback
ports, via bench/imap_bench.py's harness, plain IMAP with ``allow_plaintext_login``),
or ``--start-dovecot`` (Dovecot from ``apt-get install dovecot-imapd`` with its own
config, user ``bench``/``bench`` and Maildir under a temp folder, on 127.0.0.1:10143).

Examples::

    .venv/bin/python bench/imap_mixed.py --start-agentpost --clients 10 --duration 60
    .venv/bin/python bench/imap_mixed.py --start-dovecot --clients 10 --duration 60
    .venv/bin/python bench/imap_mixed.py --start-dovecot --append-only --duration 20
    .venv/bin/python bench/imap_mixed.py --host 127.0.0.1 --port 2993 --tls --insecure \\
        --user demo@agentpost.local --password "$AGENTPOST_KEY" --clients 10

Only the standard library is needed against an existing server (``--start-agentpost``
needs the project's venv). The code is in the sibling package ``imapload`` (client and
view tracking, workload, server harnesses, reporting); this file is the entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # so that the sibling package imports (as for imap_bench.py)
    sys.path.insert(0, HERE)

from imapload.cli import main  # noqa: E402 - after the sys.path fix above

if __name__ == "__main__":
    sys.exit(main())
