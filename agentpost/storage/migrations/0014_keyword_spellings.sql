-- 0014: IMAP keywords as clients spell them (issue 10, item 3).
-- messages.labels holds every keyword of a message case-folded (i;ascii-casemap), API
-- labels and IMAP-only keywords alike (agentpost.mail.keywords says which is which), so
-- SEARCH KEYWORD and the API's label filters stay equality on the folded form. IMAP
-- shows a keyword in the spelling it was first seen in, per inbox: that spelling is
-- kept here, once, when a keyword is first stored (IMAP STORE/APPEND with the client's
-- spelling, an API label with its own lowercase one). Rows are never changed; an inbox
-- keeps at most storage.keywords.MAX_SPELLINGS_PER_INBOX of them (a keyword seen
-- after that shows folded). Keywords stored before this migration have no row: they
-- were all lowercase labels, which is how they keep showing.
CREATE TABLE keyword_spellings (
    org_id      text NOT NULL,
    inbox_id    text NOT NULL,
    keyword     text NOT NULL,
    spelling    text NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (org_id, inbox_id, keyword),
    FOREIGN KEY (org_id, inbox_id) REFERENCES inboxes (org_id, id) ON DELETE CASCADE,
    CHECK (octet_length(keyword) BETWEEN 1 AND 128),
    CHECK (octet_length(spelling) = octet_length(keyword))
);
