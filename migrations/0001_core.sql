-- gorp core schema: channels, jobs, job events.
-- Every timestamp is UTC milliseconds since the Unix epoch; the views render them readably.

CREATE TABLE channels (
    id                INTEGER PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE
                      CHECK (length(name) BETWEEN 1 AND 64 AND name NOT GLOB '*[^a-z0-9_-]*'
                             AND substr(name, 1, 1) NOT IN ('_', '-')),
    -- Stable id used in the channel's webhook URL; never the ACP session id.
    webhook_id        TEXT NOT NULL UNIQUE,
    -- Per-channel overrides of [acp] agent_binary / agent_args (JSON array of strings).
    agent_binary      TEXT,
    agent_args        TEXT CHECK (agent_args IS NULL OR json_valid(agent_args)),
    permission_policy TEXT NOT NULL DEFAULT 'allow' CHECK (permission_policy IN ('allow', 'deny')),
    matrix_room_id    TEXT UNIQUE,
    -- The ACP session the conversation continues in (set by the executor).
    acp_session_id    TEXT,
    created_at        INTEGER NOT NULL
);

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    channel_id       INTEGER NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    source           TEXT NOT NULL CHECK (source IN ('webhook', 'matrix', 'schedule', 'cli')),
    prompt           TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- Higher runs first.
    priority         INTEGER NOT NULL DEFAULT 0,
    -- Number of times the job has been claimed; fences every transition out of 'running'.
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    run_at           INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    idempotency_key  TEXT,
    reply_target     TEXT,
    stop_reason      TEXT,
    error            TEXT,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    CHECK ((state = 'running') = (lease_owner IS NOT NULL))
);

-- One ACP session runs one prompt at a time: at most one running job per channel.
CREATE UNIQUE INDEX jobs_one_running_per_channel ON jobs (channel_id) WHERE state = 'running';
-- Idempotent enqueue: a key is unique per source.
CREATE UNIQUE INDEX jobs_idempotency ON jobs (source, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- The claim reads only queued rows, so finished history does not slow it down.
CREATE INDEX jobs_queued ON jobs (channel_id, priority DESC, run_at, created_at, id) WHERE state = 'queued';
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_channel_created ON jobs (channel_id, created_at);

-- The ordered output and lifecycle of each job. seq is global and increasing, so
-- "events after seq N" resumes any reader.
CREATE TABLE job_events (
    seq     INTEGER PRIMARY KEY,
    job_id  TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    text    TEXT,
    data    TEXT CHECK (data IS NULL OR json_valid(data)),
    at      INTEGER NOT NULL
);
CREATE INDEX job_events_job ON job_events (job_id, seq);

-- Readable history: one row per job, times as UTC text, output text joined from the events.
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
    j.stop_reason,
    j.error,
    j.prompt,
    (SELECT group_concat(e.text, '') FROM (
        SELECT text FROM job_events
        WHERE job_id = j.id AND kind = 'message' AND attempt = j.attempt
        ORDER BY seq) AS e) AS output
FROM jobs j JOIN channels c ON c.id = j.channel_id;

-- Readable event log.
CREATE VIEW job_event_log AS
SELECT
    e.seq,
    e.job_id,
    c.name AS channel,
    e.attempt,
    strftime('%Y-%m-%d %H:%M:%f', e.at / 1000.0, 'unixepoch') AS at,
    e.kind,
    e.text,
    e.data
FROM job_events e JOIN jobs j ON j.id = e.job_id JOIN channels c ON c.id = j.channel_id;
