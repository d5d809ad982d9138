-- Replies of anonymous comparisons still waiting for a vote are looked up by message id (to mask
-- their model in message reads, thread reads and the usage report): only those rows are indexed.

CREATE INDEX comparisons_pending_a ON comparisons (message_a) WHERE anonymous AND winner IS NULL;
CREATE INDEX comparisons_pending_b ON comparisons (message_b) WHERE anonymous AND winner IS NULL;
