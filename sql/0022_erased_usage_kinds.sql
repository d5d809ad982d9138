-- Erased users' usage keeps each token kind too (cached input, cache write, reasoning: see
-- 0017_usage_token_kinds.sql), so the operator's report still adds up by kind after an erasure.
ALTER TABLE erased_usage
    ADD COLUMN cached_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens bigint NOT NULL DEFAULT 0;
