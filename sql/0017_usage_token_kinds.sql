-- Each reply's prompt split by kind, and its reasoning: prompt_tokens stays every prompt token the
-- upstream processed; cached_tokens (read from a prompt cache) and cache_write_tokens (written to
-- one) are parts of it, input_tokens is the rest (uncached input). reasoning_tokens are part of
-- completion_tokens (billed as output). Rows written before this migration count all of their
-- prompt as input.
ALTER TABLE usage
    ADD COLUMN cached_tokens integer NOT NULL DEFAULT 0 CHECK (cached_tokens >= 0),
    ADD COLUMN cache_write_tokens integer NOT NULL DEFAULT 0 CHECK (cache_write_tokens >= 0),
    ADD COLUMN reasoning_tokens integer NOT NULL DEFAULT 0 CHECK (reasoning_tokens >= 0),
    ADD COLUMN input_tokens integer GENERATED ALWAYS AS (prompt_tokens - cached_tokens - cache_write_tokens) STORED;
