-- Usage: what each attempt of a job cost, as the agent reported it, one row per attempt.
--
-- Spend is summed from these rows (budgets, `gorp usage`, `usage_daily`), so it counts every
-- attempt (a failed one cost money too) and holds across restarts. A row outlives its job
-- (the retention cleaner deletes jobs, not their spend), so a month's budget stays whole.
ALTER TABLE jobs ADD COLUMN cache_read_tokens INTEGER;
ALTER TABLE jobs ADD COLUMN cache_write_tokens INTEGER;

CREATE TABLE usage (
    id                 INTEGER PRIMARY KEY,
    job_id             TEXT NOT NULL,
    attempt            INTEGER NOT NULL,
    channel_id         INTEGER NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    source             TEXT NOT NULL,
    -- When the attempt's turn ended (Unix ms).
    at                 INTEGER NOT NULL,
    input_tokens       INTEGER NOT NULL DEFAULT 0,
    output_tokens      INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens  INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd           REAL NOT NULL DEFAULT 0,
    -- How long the turn ran.
    agent_ms           INTEGER NOT NULL DEFAULT 0,
    UNIQUE (job_id, attempt)
);
CREATE INDEX usage_channel_at ON usage (channel_id, at);
CREATE INDEX usage_at ON usage (at);

-- Spend per UTC day, channel and source.
CREATE VIEW usage_daily AS
SELECT date(u.at / 1000, 'unixepoch') AS day,
       c.name AS channel,
       u.source,
       count(DISTINCT u.job_id) AS jobs,
       count(*) AS attempts,
       sum(u.input_tokens) AS input_tokens,
       sum(u.output_tokens) AS output_tokens,
       sum(u.cache_read_tokens) AS cache_read_tokens,
       sum(u.cache_write_tokens) AS cache_write_tokens,
       round(sum(u.cost_usd), 6) AS cost_usd,
       round(sum(u.agent_ms) / 1000.0, 1) AS agent_secs
FROM usage u JOIN channels c ON c.id = u.channel_id
GROUP BY day, c.name, u.source;
