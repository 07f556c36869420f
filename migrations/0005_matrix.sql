-- Matrix: where each job's reply goes and how far it has been posted.
--
-- A row exists for every job whose channel has a Matrix room (or that came from a Matrix
-- message); the trigger below adds it in the job's own insert transaction, so a job can never
-- be committed without it. The bot's reply pump reads the open rows (done = 0), posts, edits and
-- reacts, and records what it did here, so a restarted gorp carries on where it stopped.
CREATE TABLE matrix_replies (
    job_id            TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    room_id           TEXT NOT NULL,
    -- The message that asked (Matrix jobs): status reactions go on it, the reply answers it.
    prompt_event_id   TEXT,
    sender            TEXT,
    -- The status reaction gorp last put on the prompt (key and event id).
    reaction_key      TEXT,
    reaction_event_id TEXT,
    -- gorp's reply message, edited while the job's output streams.
    reply_event_id    TEXT,
    edits             INTEGER NOT NULL DEFAULT 0,
    -- The last job_events.seq the reply shows.
    rendered_seq      INTEGER NOT NULL DEFAULT 0,
    -- The attempt whose restart the room was last told about.
    noted_attempt     INTEGER NOT NULL DEFAULT 0,
    -- 1 once the final answer is posted (or the room cannot be reached).
    done              INTEGER NOT NULL DEFAULT 0 CHECK (done IN (0, 1)),
    error             TEXT,
    updated_at        INTEGER NOT NULL
);
CREATE INDEX matrix_replies_open ON matrix_replies (job_id) WHERE done = 0;
CREATE INDEX matrix_replies_prompt ON matrix_replies (prompt_event_id)
    WHERE prompt_event_id IS NOT NULL;

CREATE TRIGGER jobs_matrix_reply AFTER INSERT ON jobs
WHEN (NEW.source = 'matrix' AND json_valid(NEW.reply_target)
      AND json_extract(NEW.reply_target, '$.room_id') IS NOT NULL)
  OR EXISTS (SELECT 1 FROM channels WHERE id = NEW.channel_id AND matrix_room_id IS NOT NULL)
BEGIN
    INSERT INTO matrix_replies (job_id, room_id, prompt_event_id, sender, updated_at)
    SELECT NEW.id,
           coalesce(m.room_id, (SELECT matrix_room_id FROM channels WHERE id = NEW.channel_id)),
           m.event_id, m.sender, NEW.created_at
    FROM (SELECT
            CASE WHEN NEW.source = 'matrix' AND json_valid(NEW.reply_target)
                 THEN json_extract(NEW.reply_target, '$.room_id') END AS room_id,
            CASE WHEN NEW.source = 'matrix' AND json_valid(NEW.reply_target)
                 THEN json_extract(NEW.reply_target, '$.event_id') END AS event_id,
            CASE WHEN NEW.source = 'matrix' AND json_valid(NEW.reply_target)
                 THEN json_extract(NEW.reply_target, '$.sender') END AS sender) AS m;
END;

-- Readable: what the bot posted for each job.
CREATE VIEW matrix_reply_log AS
SELECT r.job_id, c.name AS channel, j.source, j.state, r.room_id, r.prompt_event_id,
       r.reply_event_id, r.reaction_key, r.edits, r.done, r.error,
       strftime('%Y-%m-%d %H:%M:%f', r.updated_at / 1000.0, 'unixepoch') AS updated
FROM matrix_replies r JOIN jobs j ON j.id = r.job_id JOIN channels c ON c.id = j.channel_id;

-- The bot's connection, one row: written when it becomes ready, when syncing starts failing or
-- recovers, and when it stops (not on every sync).
CREATE TABLE matrix_bot (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    -- 'syncing' (ready), 'retrying' (the homeserver cannot be reached), 'stopped'
    state      TEXT NOT NULL CHECK (state IN ('syncing', 'retrying', 'stopped')),
    ready_at   INTEGER,
    error      TEXT,
    updated_at INTEGER NOT NULL
);
