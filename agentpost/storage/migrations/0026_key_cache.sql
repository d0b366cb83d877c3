-- 0026: every change that can alter what an API key may do NOTIFYs the key channel
-- ("agentpost_key_changed", payload: a key id) in the changing transaction, so it is
-- delivered at COMMIT to every process: the per-process key caches
-- (agentpost.auth.key_cache) drop their entries and long-lived sessions
-- (agentpost.auth.sessions) re-read the key. Triggers rather than application calls,
-- so no code path (admin API, CLI, a manual UPDATE) can forget to notify.
-- last_used_at bookkeeping does not notify (it changes nothing about the key's power).

CREATE FUNCTION agentpost_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
    org text;
    holder text;
    old_holder text;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    IF TG_TABLE_NAME = 'api_keys' THEN
        PERFORM pg_notify('agentpost_key_changed', r.id);
        IF TG_OP = 'UPDATE' AND OLD.id IS DISTINCT FROM NEW.id THEN
            PERFORM pg_notify('agentpost_key_changed', OLD.id);
        END IF;
    ELSIF TG_TABLE_NAME = 'api_key_environments' THEN
        PERFORM pg_notify('agentpost_key_changed', r.api_key_id);
        IF TG_OP = 'UPDATE' THEN
            PERFORM pg_notify('agentpost_key_changed', OLD.api_key_id);
        END IF;
    ELSIF TG_TABLE_NAME = 'organizations' THEN
        PERFORM pg_notify('agentpost_key_changed', k.id)
           FROM api_keys k WHERE k.org_id = r.id AND k.revoked_at IS NULL;
    ELSE
        -- org_memberships / env_memberships: the holder's keys follow the holder's
        -- roles, and holder-less "owner seat" keys follow whether the org has an owner.
        org := r.org_id;
        holder := r.user_id;
        old_holder := holder;
        IF TG_OP = 'UPDATE' THEN old_holder := OLD.user_id; END IF;
        PERFORM pg_notify('agentpost_key_changed', k.id)
           FROM api_keys k
          WHERE k.org_id = org AND k.revoked_at IS NULL
            AND (k.user_id = holder OR k.user_id IS NULL
                 OR k.user_id = old_holder);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER api_keys_deleted
    AFTER DELETE ON api_keys FOR EACH ROW
    EXECUTE FUNCTION agentpost_key_changed();

CREATE TRIGGER api_keys_changed
    AFTER UPDATE ON api_keys FOR EACH ROW
    WHEN ((OLD.org_id, OLD.id, OLD.secret_sha256, OLD.role, OLD.scopes, OLD.env_restricted,
           OLD.user_id, OLD.expires_at, OLD.revoked_at)
          IS DISTINCT FROM
          (NEW.org_id, NEW.id, NEW.secret_sha256, NEW.role, NEW.scopes, NEW.env_restricted,
           NEW.user_id, NEW.expires_at, NEW.revoked_at))
    EXECUTE FUNCTION agentpost_key_changed();

CREATE TRIGGER api_key_environments_changed
    AFTER INSERT OR UPDATE OR DELETE ON api_key_environments FOR EACH ROW
    EXECUTE FUNCTION agentpost_key_changed();

CREATE TRIGGER org_memberships_changed
    AFTER INSERT OR UPDATE OR DELETE ON org_memberships FOR EACH ROW
    EXECUTE FUNCTION agentpost_key_changed();

CREATE TRIGGER env_memberships_changed
    AFTER INSERT OR UPDATE OR DELETE ON env_memberships FOR EACH ROW
    EXECUTE FUNCTION agentpost_key_changed();

CREATE TRIGGER organizations_changed
    AFTER UPDATE ON organizations FOR EACH ROW
    WHEN (OLD.tier IS DISTINCT FROM NEW.tier)
    EXECUTE FUNCTION agentpost_key_changed();
