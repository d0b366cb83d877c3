-- 0042: a domain row NOTIFYs the route channel (0041) only when what routing reads of
-- it changes: its name, its organization, its verification. The domain checker
-- rewrites next_check_at (and the DNS findings) of every pending domain on each
-- round; each such UPDATE emptied every process's route cache for nothing.
DROP TRIGGER domains_route_changed ON domains;
CREATE TRIGGER domains_route_added
    AFTER INSERT OR DELETE ON domains FOR EACH ROW
    EXECUTE FUNCTION agentpost_route_changed();
CREATE TRIGGER domains_route_changed
    AFTER UPDATE ON domains FOR EACH ROW
    WHEN ((OLD.org_id, OLD.name, OLD.verified_at)
          IS DISTINCT FROM (NEW.org_id, NEW.name, NEW.verified_at))
    EXECUTE FUNCTION agentpost_route_changed();
