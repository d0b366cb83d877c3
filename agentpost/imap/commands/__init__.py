"""IMAP commands, one module per family; :mod:`agentpost.imap.commands.table` lists them.

A handler is ``async def handler(session, command) -> str | None``: it writes untagged
responses through the session and returns the text of the tagged OK (None: "OK <NAME>
completed"), or raises IMAPError / a domain error / ParseError for NO and BAD. The
dispatcher (agentpost.imap.server) checks state, UID prefix and credentials before it
runs, and reports the selected mailbox's changes after, as the command's table row says.
"""
