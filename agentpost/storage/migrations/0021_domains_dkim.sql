-- 0021: organizations' own domains get DKIM, a custom MAIL FROM and a verification schedule.
--
-- dkim_mode 'ses': SES Easy DKIM (the tokens SES gave us; SES holds the keys).
-- dkim_mode 'own': our key pair; the private key is sealed with AES-256-GCM under the
--   master key ([secrets] key_file, agentpost.auth.sealing) with the org id and domain id
--   as associated data, so the column is useless without the key file and cannot be
--   moved to another tenant's row.
-- record_status: per DNS record key ('mx', 'spf', 'dkim', 'dmarc', 'mail_from_mx',
--   'mail_from_spf') the last check's 'pending' or 'verified'.
-- next_check_at: when the verification timer looks at an unverified domain again (backs
--   off as the domain ages); a round claims due rows with FOR UPDATE SKIP LOCKED.

ALTER TABLE domains
    ADD COLUMN mail_from_subdomain  text CHECK (mail_from_subdomain = lower(mail_from_subdomain)),
    ADD COLUMN dkim_mode            text NOT NULL DEFAULT 'none'
                                    CHECK (dkim_mode IN ('none', 'ses', 'own')),
    ADD COLUMN dkim_selector        text,
    ADD COLUMN dkim_algorithm       text CHECK (dkim_algorithm IN ('rsa', 'ed25519')),
    ADD COLUMN dkim_public_key      text,
    ADD COLUMN dkim_private_sealed  bytea,
    ADD COLUMN ses_dkim_tokens      text[] NOT NULL DEFAULT '{}',
    ADD COLUMN record_status        jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN check_count          integer NOT NULL DEFAULT 0,
    ADD COLUMN last_checked_at      timestamptz,
    ADD COLUMN last_check_error     text,
    ADD COLUMN next_check_at        timestamptz,
    ADD CONSTRAINT domains_own_key CHECK (
        dkim_mode <> 'own' OR (dkim_selector IS NOT NULL AND dkim_algorithm IS NOT NULL
                               AND dkim_public_key IS NOT NULL
                               AND dkim_private_sealed IS NOT NULL));

CREATE INDEX domains_due ON domains (next_check_at) WHERE verified_at IS NULL;
CREATE INDEX domains_org_id ON domains (org_id, id);
