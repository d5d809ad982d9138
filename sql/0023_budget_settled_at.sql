-- When a subject's use last settled, so the webhook worker's budget scan (every WEBHOOK_POLL_S on
-- every instance) reads only the budgets of users and keys that spent since its last round, not
-- every key's every row. The usage settlement (gateway/store/usage.py) sets it on the subject's
-- lifetime row ('total'), which every settled reply updates for its user, its key and each of the
-- key's ancestors; the month rows keep theirs (so their updates change no indexed column and stay
-- HOT updates). Rows already here count as settled now: the worker's first round reads everything.
ALTER TABLE budget_usage ADD COLUMN settled_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX budget_usage_settled ON budget_usage (settled_at) WHERE period = 'total';
