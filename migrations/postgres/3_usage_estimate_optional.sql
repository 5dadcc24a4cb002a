-- `estimated_tokens` becomes optional: requests that nothing needed an estimate for
-- (`[limits] estimate = "when_needed"`, the default) store NULL.
ALTER TABLE usage_records ALTER COLUMN estimated_tokens DROP NOT NULL;
