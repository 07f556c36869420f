-- Schedules: cron rows that fire exactly once per slot.

CREATE TABLE schedules (
    id            INTEGER PRIMARY KEY,
    channel_id    INTEGER NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    -- A croner expression (5 or 6 fields, or an alias such as @daily); NULL for a one-off.
    cron          TEXT,
    -- IANA time zone the expression is read in.
    timezone      TEXT NOT NULL,
    prompt        TEXT NOT NULL,
    enabled       INTEGER NOT NULL DEFAULT 1,
    -- Missed slots while gorp was down: 'skip', 'once' (the latest one), 'all' (bounded).
    catch_up      TEXT NOT NULL DEFAULT 'once' CHECK (catch_up IN ('skip', 'once', 'all')),
    -- When the previous run is still queued or running: 'skip' (recorded) or 'queue'.
    overlap       TEXT NOT NULL DEFAULT 'skip' CHECK (overlap IN ('skip', 'queue')),
    -- The next slot (UTC ms); NULL once a one-off has fired.
    next_run_at   INTEGER,
    last_fired_at INTEGER,
    -- A one-off that has fired is done, not deleted.
    done          INTEGER NOT NULL DEFAULT 0,
    skipped       INTEGER NOT NULL DEFAULT 0,
    last_skip     TEXT,
    created_by    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    CHECK (cron IS NOT NULL OR done = 1 OR next_run_at IS NOT NULL)
);
CREATE INDEX schedules_due ON schedules (next_run_at) WHERE enabled = 1 AND done = 0;

ALTER TABLE jobs ADD COLUMN schedule_id INTEGER REFERENCES schedules (id) ON DELETE SET NULL;
ALTER TABLE jobs ADD COLUMN scheduled_for INTEGER;
-- Exactly one job per schedule slot.
CREATE UNIQUE INDEX jobs_schedule_slot ON jobs (schedule_id, scheduled_for) WHERE schedule_id IS NOT NULL;

CREATE VIEW schedule_list AS
SELECT
    s.id,
    c.name AS channel,
    coalesce(s.cron, 'once') AS cron,
    s.timezone,
    CASE WHEN s.done THEN 'done' WHEN s.enabled THEN 'active' ELSE 'paused' END AS status,
    strftime('%Y-%m-%d %H:%M:%S', s.next_run_at / 1000.0, 'unixepoch') AS next_run_utc,
    strftime('%Y-%m-%d %H:%M:%S', s.last_fired_at / 1000.0, 'unixepoch') AS last_fired_utc,
    s.catch_up,
    s.overlap,
    s.skipped,
    s.prompt
FROM schedules s JOIN channels c ON c.id = s.channel_id;
