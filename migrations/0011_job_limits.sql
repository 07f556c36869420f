-- Limits on one job.
--
-- `jobs.timeout_secs` caps the job's turn below `[acp] prompt_timeout_secs`, and
-- `jobs.max_cost_usd` its cost below the channel's per-job budget (both given when the job is
-- enqueued). `channels.budget_job_usd` and `budget_job_tokens` override `[budget]
-- job_max_cost_usd` and `job_max_tokens` for the channel (NULL: the config's). A job whose turn
-- passes its limit is stopped and ends `failed` with stop reason `budget`.
ALTER TABLE jobs ADD COLUMN timeout_secs INTEGER CHECK (timeout_secs IS NULL OR timeout_secs > 0);
ALTER TABLE jobs ADD COLUMN max_cost_usd REAL CHECK (max_cost_usd IS NULL OR max_cost_usd >= 0);
ALTER TABLE channels ADD COLUMN budget_job_usd REAL
    CHECK (budget_job_usd IS NULL OR budget_job_usd >= 0);
ALTER TABLE channels ADD COLUMN budget_job_tokens INTEGER
    CHECK (budget_job_tokens IS NULL OR budget_job_tokens > 0);
