-- Warm agent sessions as leases, and per-job run facts (warm or cold, first output, usage).

-- One row per channel whose agent is (or should be) warm. The row is a lease: `holder` is the
-- gorp instance running the agent process, renewed until `lease_expires_at`; a row whose holder
-- is gone is taken over by the next gorp that starts.
CREATE TABLE warm_sessions (
    channel_id       INTEGER PRIMARY KEY REFERENCES channels (id) ON DELETE CASCADE,
    holder           TEXT,
    state            TEXT NOT NULL
                     -- Readers show a warm row as 'busy' while its channel has a running job.
                     CHECK (state IN ('starting', 'warm', 'stopped', 'failed')),
    acp_session_id   TEXT,
    pid              INTEGER,
    -- When the agent was last used by a job; it stays warm until expires_at.
    last_used_at     INTEGER,
    expires_at       INTEGER,
    -- When it must be warm (pre-warm for a scheduled job, or `gorp warm <channel>`).
    warm_at          INTEGER,
    lease_expires_at INTEGER,
    started_at       INTEGER,
    error            TEXT,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX warm_sessions_warm_at ON warm_sessions (warm_at) WHERE warm_at IS NOT NULL;

ALTER TABLE jobs ADD COLUMN warm INTEGER;              -- 1: ran on a warm agent, 0: cold start
ALTER TABLE jobs ADD COLUMN first_output_ms REAL;      -- start of attempt → first agent output
ALTER TABLE jobs ADD COLUMN input_tokens INTEGER;
ALTER TABLE jobs ADD COLUMN output_tokens INTEGER;
ALTER TABLE jobs ADD COLUMN cost_usd REAL;

DROP VIEW job_history;
CREATE VIEW job_history AS
SELECT
    j.id,
    c.name AS channel,
    j.source,
    j.state,
    j.priority,
    j.attempt AS attempts,
    j.max_attempts,
    strftime('%Y-%m-%d %H:%M:%f', j.created_at / 1000.0, 'unixepoch') AS created,
    strftime('%Y-%m-%d %H:%M:%f', j.started_at / 1000.0, 'unixepoch') AS started,
    strftime('%Y-%m-%d %H:%M:%f', j.finished_at / 1000.0, 'unixepoch') AS finished,
    (j.finished_at - j.started_at) / 1000.0 AS duration_secs,
    CASE j.warm WHEN 1 THEN 'warm' WHEN 0 THEN 'cold' END AS session,
    j.first_output_ms,
    j.input_tokens,
    j.output_tokens,
    j.cost_usd,
    j.stop_reason,
    j.error,
    j.prompt,
    (SELECT group_concat(e.text, '') FROM (
        SELECT text FROM job_events
        WHERE job_id = j.id AND kind = 'message' AND attempt = j.attempt
        ORDER BY seq) AS e) AS output
FROM jobs j JOIN channels c ON c.id = j.channel_id;

-- Readable warm pool.
CREATE VIEW warm_pool AS
SELECT
    c.name AS channel,
    CASE WHEN w.state = 'warm' AND EXISTS (
             SELECT 1 FROM jobs j WHERE j.channel_id = w.channel_id AND j.state = 'running')
         THEN 'busy' ELSE w.state END AS state,
    w.holder,
    w.pid,
    w.acp_session_id,
    strftime('%Y-%m-%d %H:%M:%f', w.last_used_at / 1000.0, 'unixepoch') AS last_used,
    strftime('%Y-%m-%d %H:%M:%f', w.expires_at / 1000.0, 'unixepoch') AS expires,
    strftime('%Y-%m-%d %H:%M:%f', w.warm_at / 1000.0, 'unixepoch') AS warm_at,
    w.error
FROM warm_sessions w JOIN channels c ON c.id = w.channel_id;
