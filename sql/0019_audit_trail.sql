-- The audit trail read back from the activity log (GET /api/admin/audit).
-- A configuration reload sent by a signal has no user behind it: such a row names none.
ALTER TABLE activity_log ALTER COLUMN user_id DROP NOT NULL;

-- The trail is the rows that change who may do what or what runs: keys created, revoked or changed,
-- the configuration reloaded, a user erased. Read newest first in keyset pages on id; this index
-- holds those rows alone (the log has one row per authenticated request).
CREATE INDEX activity_log_audit ON activity_log (id DESC)
    WHERE method <> 'GET' AND (action LIKE 'keys.%' OR action LIKE 'config.%' OR action LIKE 'account.%');
