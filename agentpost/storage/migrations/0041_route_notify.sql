-- 0041: every change that can alter where the MX routes an address NOTIFYs the route
-- channel ("agentpost_route_changed") in the changing transaction, so it reaches every
-- process at COMMIT and their route caches (agentpost.core.route_cache) start over.
-- Triggers rather than application calls: no code path (API, CLI, a manual UPDATE, an
-- ON DELETE CASCADE) can forget. Routing reads an inbox's org_id, id, environment_id
-- and email, the domains and shared domains, and the receive filter rules; an inbox's
-- other columns (its use, display name, ...) change without a notice.
CREATE FUNCTION agentpost_route_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One payload for all: PostgreSQL folds identical notices of one transaction.
    PERFORM pg_notify('agentpost_route_changed', '');
    RETURN NULL;
END $$;

CREATE TRIGGER inboxes_route_added
    AFTER INSERT OR DELETE ON inboxes FOR EACH ROW
    EXECUTE FUNCTION agentpost_route_changed();
CREATE TRIGGER inboxes_route_changed
    AFTER UPDATE ON inboxes FOR EACH ROW
    WHEN ((OLD.org_id, OLD.id, OLD.environment_id, OLD.email)
          IS DISTINCT FROM (NEW.org_id, NEW.id, NEW.environment_id, NEW.email))
    EXECUTE FUNCTION agentpost_route_changed();
CREATE TRIGGER domains_route_changed
    AFTER INSERT OR UPDATE OR DELETE ON domains FOR EACH ROW
    EXECUTE FUNCTION agentpost_route_changed();
CREATE TRIGGER shared_domains_route_changed
    AFTER INSERT OR UPDATE OR DELETE ON shared_domains FOR EACH ROW
    EXECUTE FUNCTION agentpost_route_changed();
CREATE TRIGGER filter_rules_route_changed
    AFTER INSERT OR UPDATE OR DELETE ON filter_rules FOR EACH ROW
    EXECUTE FUNCTION agentpost_route_changed();
CREATE TRIGGER inboxes_route_truncated
    AFTER TRUNCATE ON inboxes FOR EACH STATEMENT
    EXECUTE FUNCTION agentpost_route_changed();
CREATE TRIGGER domains_route_truncated
    AFTER TRUNCATE ON domains FOR EACH STATEMENT
    EXECUTE FUNCTION agentpost_route_changed();
CREATE TRIGGER shared_domains_route_truncated
    AFTER TRUNCATE ON shared_domains FOR EACH STATEMENT
    EXECUTE FUNCTION agentpost_route_changed();
CREATE TRIGGER filter_rules_route_truncated
    AFTER TRUNCATE ON filter_rules FOR EACH STATEMENT
    EXECUTE FUNCTION agentpost_route_changed();
