-- What erased users consumed, as totals per UTC day, model and provider, naming nobody: after an
-- erasure the usage rows that named the user are gone, and the operator's usage report (every
-- user) adds these totals in, so it still adds up (gateway/store/erasure.py).
CREATE TABLE erased_usage (
    day               date NOT NULL,
    model             text NOT NULL,
    provider          text NOT NULL,
    requests          bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    total_tokens      bigint NOT NULL DEFAULT 0,
    cost_usd          numeric(16, 8) NOT NULL DEFAULT 0,
    PRIMARY KEY (day, model, provider)
);
