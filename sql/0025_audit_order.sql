-- The audit trail in time order. Its rows come from two writers (the activity log's batches and a
-- reload's own row), so id order can put a row a few milliseconds before an older one: pages are
-- read newest first on (at, id) instead. The same rows as activity_log_audit, which this replaces.
-- Building it reads the activity log once and blocks its writes meanwhile (about a second per
-- few million rows).
CREATE INDEX activity_log_audit_at ON activity_log (at DESC, id DESC)
    WHERE method <> 'GET' AND (action LIKE 'keys.%' OR action LIKE 'config.%' OR action LIKE 'account.%');
DROP INDEX activity_log_audit;
